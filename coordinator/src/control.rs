//! Operator controls the scheduler obeys: the active IndexCache pattern (stamped on each
//! request when it is submitted, so a sequence keeps the pattern it started with) and which
//! workers are drained (no sequence is admitted while any stage of the one pipeline is).

use std::sync::{Arc, Mutex, RwLock};

/// The active pattern and how many times it was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivePattern {
    /// One F/S per layer.
    pub pattern: Arc<str>,
    /// 0 for the start-up pattern, +1 per change.
    pub epoch: u64,
}

/// Shared by the scheduler handle and the admin service.
#[derive(Debug)]
pub struct ClusterControl {
    pattern: RwLock<ActivePattern>,
    drained: Mutex<Vec<bool>>,
    /// Stage addresses, for messages.
    stage_addrs: Vec<String>,
}

impl ClusterControl {
    /// Starts with `pattern` active and no worker drained.
    pub fn new(pattern: &str, stage_addrs: Vec<String>) -> Self {
        ClusterControl {
            pattern: RwLock::new(ActivePattern {
                pattern: Arc::from(pattern),
                epoch: 0,
            }),
            drained: Mutex::new(vec![false; stage_addrs.len()]),
            stage_addrs,
        }
    }

    /// The active pattern.
    pub fn pattern(&self) -> ActivePattern {
        self.pattern.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes `pattern` active for requests submitted from now on; returns the new epoch.
    pub fn set_pattern(&self, pattern: &str) -> ActivePattern {
        let mut p = self.pattern.write().unwrap_or_else(|p| p.into_inner());
        p.pattern = Arc::from(pattern);
        p.epoch += 1;
        p.clone()
    }

    /// Drains (`true`) or undrains stage `stage`; returns whether it changed.
    pub fn set_drained(&self, stage: usize, drained: bool) -> bool {
        let mut d = self.drained.lock().unwrap_or_else(|p| p.into_inner());
        match d.get_mut(stage) {
            Some(x) if *x != drained => {
                *x = drained;
                true
            }
            _ => false,
        }
    }

    /// Drained flag per stage.
    pub fn drained(&self) -> Vec<bool> {
        self.drained.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why new sequences cannot start now (a drained worker), if they cannot.
    pub fn admission_blocked(&self) -> Option<String> {
        let drained: Vec<String> = self
            .drained()
            .iter()
            .enumerate()
            .filter(|(_, d)| **d)
            .map(|(i, _)| format!("stage {i} ({})", self.stage_addrs.get(i).map_or("?", String::as_str)))
            .collect();
        if drained.is_empty() {
            return None;
        }
        Some(format!(
            "worker {} is drained, so the pipeline takes no new requests until `irctl undrain`",
            drained.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_epochs_and_drain_flags() {
        let c = ClusterControl::new("FFFF", vec!["a:1".into(), "b:2".into()]);
        assert_eq!(c.pattern().epoch, 0);
        let p = c.set_pattern("FSFS");
        assert_eq!((&*p.pattern, p.epoch), ("FSFS", 1));
        assert!(c.admission_blocked().is_none());
        assert!(c.set_drained(1, true));
        assert!(!c.set_drained(1, true), "draining twice changes nothing");
        let why = c.admission_blocked().unwrap();
        assert!(why.contains("stage 1 (b:2)") && why.contains("undrain"), "{why}");
        assert!(c.set_drained(1, false));
        assert!(c.admission_blocked().is_none());
        assert!(!c.set_drained(5, true), "unknown stages are ignored");
    }
}
