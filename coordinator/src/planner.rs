//! The stage planner: splits the layers into contiguous stages, knowing the IndexCache
//! pattern. Full layers cost more (they run the indexer, whose share grows with context);
//! a boundary just before a Shared layer needs a relay of top-k indices, which costs bytes
//! and latency, so among equally balanced plans the one with fewer relays wins.

use std::ops::Range;

use crate::error::CoordinatorError;

/// Planner weights.
#[derive(Clone, Copy, Debug)]
pub struct CostModel {
    /// Extra cost of a Full layer relative to a Shared one (1.0 = twice as expensive).
    pub full_extra: f64,
    /// Cost of a relay boundary, in layer units.
    pub relay: f64,
}

impl Default for CostModel {
    fn default() -> Self {
        // At 32K context the indexer is roughly half of a Full layer's time on CPU (see
        // docs/PERFORMANCE.md); a relay is cheap next to a layer.
        CostModel {
            full_extra: 0.5,
            relay: 0.05,
        }
    }
}

/// Stage boundaries as layer ranges.
pub type Plan = Vec<Range<usize>>;

/// Validates a hand-pinned `--split` (interior boundaries) for `layers` layers.
pub fn pinned(split: &[usize], layers: usize) -> Result<Plan, CoordinatorError> {
    let mut edges = vec![0];
    for &b in split {
        let prev = *edges.last().unwrap_or(&0);
        if b <= prev || b >= layers {
            return Err(CoordinatorError::invalid(
                "split",
                format!("boundaries must be strictly increasing within 1..{layers}, got {split:?}"),
            ));
        }
        edges.push(b);
    }
    edges.push(layers);
    Ok(edges.windows(2).map(|w| w[0]..w[1]).collect())
}

/// The most balanced split of `pattern` (true = Full) into `stages` stages.
pub fn balance(pattern: &[bool], stages: usize, cost: CostModel) -> Result<Plan, CoordinatorError> {
    let n = pattern.len();
    if stages == 0 || stages > n {
        return Err(CoordinatorError::invalid(
            "stages",
            format!("must be between 1 and the number of layers ({n}), got {stages}"),
        ));
    }
    let layer_cost: Vec<f64> = pattern
        .iter()
        .map(|f| if *f { 1.0 + cost.full_extra } else { 1.0 })
        .collect();
    let mut prefix = vec![0.0; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + layer_cost[i];
    }
    // best[k][i]: (max stage cost, relay cost) for the first i layers in k stages.
    let inf = (f64::INFINITY, f64::INFINITY);
    let mut best = vec![vec![inf; n + 1]; stages + 1];
    let mut choice = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = (0.0, 0.0);
    for k in 1..=stages {
        for i in k..=n {
            for j in (k - 1)..i {
                let (prev_max, prev_relay) = best[k - 1][j];
                if !prev_max.is_finite() {
                    continue;
                }
                let relay = if j > 0 && !pattern[j] { cost.relay } else { 0.0 };
                let cand = (prev_max.max(prefix[i] - prefix[j]), prev_relay + relay);
                let (bm, br) = best[k][i];
                let better =
                    cand.0 + cand.1 < bm + br - 1e-12 || ((cand.0 + cand.1 - (bm + br)).abs() <= 1e-12 && cand.1 < br);
                if better {
                    best[k][i] = cand;
                    choice[k][i] = j;
                }
            }
        }
    }
    let mut plan = Vec::with_capacity(stages);
    let mut i = n;
    for k in (1..=stages).rev() {
        let j = choice[k][i];
        plan.push(j..i);
        i = j;
    }
    plan.reverse();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(s: &str) -> Vec<bool> {
        s.chars().map(|c| c == 'F').collect()
    }

    #[test]
    fn all_full_splits_evenly() {
        let p = balance(&pat("FFFFFFFF"), 4, CostModel::default()).unwrap();
        assert_eq!(p, vec![0..2, 2..4, 4..6, 6..8]);
    }

    #[test]
    fn prefers_boundaries_before_full_layers_when_balance_allows() {
        // FSSSFSSS: splitting at 4 is balanced and needs no relay.
        let p = balance(&pat("FSSSFSSS"), 2, CostModel::default()).unwrap();
        assert_eq!(p, vec![0..4, 4..8]);
    }

    #[test]
    fn full_layers_weigh_more() {
        // Two Full layers up front: with full_extra = 1 the first stage takes fewer layers.
        let cost = CostModel {
            full_extra: 1.0,
            relay: 0.0,
        };
        let p = balance(&pat("FFSSSS"), 2, cost).unwrap();
        assert_eq!(p, vec![0..2, 2..6]);
    }

    #[test]
    fn pinned_split_is_validated() {
        assert_eq!(pinned(&[3, 5], 8).unwrap(), vec![0..3, 3..5, 5..8]);
        assert!(pinned(&[5, 3], 8).unwrap_err().to_string().contains("split"));
        assert!(pinned(&[0], 8).is_err());
        assert!(pinned(&[8], 8).is_err());
        assert!(balance(&pat("FS"), 3, CostModel::default())
            .unwrap_err()
            .to_string()
            .contains("stages"));
    }
}
