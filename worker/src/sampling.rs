//! Token selection: greedy, or temperature / top-k / top-p sampling with a seeded generator.

use crate::error::{Result, WorkerError};

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Seed for reproducible sampling; `None` draws one from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks ranges, naming the field and the limit.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(WorkerError::invalid(
                "temperature",
                format!("must be a finite number ≥ 0 (0 = greedy), got {}", self.temperature),
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(WorkerError::invalid(
                "top_p",
                format!("must be in (0, 1], got {}", self.top_p),
            ));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and identical on every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator from a 64-bit seed.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Index of the largest logit; ties go to the lowest id.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.temperature == 0.0 {
        return argmax(logits);
    }
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, by_logit);
        idx.truncate(p.top_k);
    }
    idx.sort_unstable_by(by_logit);
    let max = logits[idx[0] as usize];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i as usize] - max) / p.temperature) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    for q in &mut probs {
        *q /= total;
    }
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return idx[i];
        }
        u -= q;
    }
    idx[probs.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_ties_take_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 0.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 3,
            seed: Some(7),
        };
        let mut top3: Vec<u32> = (0..50).collect();
        top3.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
        top3.truncate(3);
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let x = sample(&logits, &p, &mut a);
            assert_eq!(x, sample(&logits, &p, &mut b));
            assert!(top3.contains(&x));
            seen.insert(x);
        }
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // One dominant token holds > 90% of the mass: top_p = 0.5 must always pick it.
        let logits = [10.0, 0.0, 0.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            top_k: 0,
            seed: Some(1),
        };
        let mut rng = Rng::new(1);
        for _ in 0..100 {
            assert_eq!(sample(&logits, &p, &mut rng), 0);
        }
    }

    #[test]
    fn sampling_matches_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln()]; // probabilities 1/3, 2/3
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: Some(3),
        };
        let mut rng = Rng::new(3);
        let ones = (0..30000).filter(|_| sample(&logits, &p, &mut rng) == 1).count();
        let frac = ones as f64 / 30000.0;
        assert!((frac - 2.0 / 3.0).abs() < 0.015, "{frac}");
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("temperature"));
        let p = SamplingParams {
            top_p: 1.5,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().to_string().contains("top_p"));
    }
}
