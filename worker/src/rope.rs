//! Rotary position tables (default and YaRN), computed the way HF transformers does in f32.

use crate::config::{yarn_mscale, RopeConfig};

/// Inverse frequencies and the cos/sin scaling for one rotary dimension.
#[derive(Clone, Debug)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    attention_factor: f32,
}

impl RopeTable {
    /// Builds the table for rotary dimension `dim` (even).
    pub fn new(cfg: &RopeConfig, dim: usize) -> Self {
        let half = dim / 2;
        let pos_freqs: Vec<f64> = (0..half).map(|i| cfg.theta.powf((2 * i) as f64 / dim as f64)).collect();
        let Some(y) = &cfg.yarn else {
            return RopeTable {
                inv_freq: pos_freqs.iter().map(|p| (1.0 / p) as f32).collect(),
                attention_factor: 1.0,
            };
        };
        let correction_dim = |rotations: f64| {
            dim as f64 * (y.original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * cfg.theta.ln())
        };
        let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
        if y.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let low = low.max(0.0);
        let high = high.min(dim as f64 - 1.0);
        let span = if low == high { 0.001 } else { high - low };
        let inv_freq = pos_freqs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let extrapolation = 1.0 - ramp;
                let interp = 1.0 / (y.factor * p);
                let extrap = 1.0 / p;
                (interp * (1.0 - extrapolation) + extrap * extrapolation) as f32
            })
            .collect();
        let attention_factor = match (y.attention_factor, y.mscale, y.mscale_all_dim) {
            (Some(a), _, _) => a,
            (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => yarn_mscale(y.factor, m) / yarn_mscale(y.factor, ma),
            _ => yarn_mscale(y.factor, 1.0),
        };
        RopeTable {
            inv_freq,
            attention_factor: attention_factor as f32,
        }
    }

    /// Number of frequencies (half the rotary dimension).
    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }

    /// Fills `cos`/`sin` (each `half_dim` long) for `position`.
    pub fn cos_sin(&self, position: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = position as f32;
        for (i, f) in self.inv_freq.iter().enumerate() {
            // f32 product as in HF, then an accurate cos/sin of that f32 angle.
            let angle = (p * f) as f64;
            cos[i] = angle.cos() as f32 * self.attention_factor;
            sin[i] = angle.sin() as f32 * self.attention_factor;
        }
    }
}
