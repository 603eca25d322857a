//! Row normalizations: RMSNorm (every DeepSeek block) and LayerNorm (the DSA indexer's key
//! norm).
//!
//! Statistics are accumulated in `f64`: a row can be 7168 wide, and the result then matches
//! PyTorch's pairwise `f32` reduction more closely than a naive serial `f32` sum would. The
//! elementwise part runs in `f32` in the same order as the Hugging Face reference.

use rayon::prelude::*;

/// Below this many elements the rows are normalized on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Applies `f` to every (input row, output row) pair, in parallel when the work is large.
fn for_each_row(x: &[f32], out: &mut [f32], dim: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    debug_assert_eq!(x.len(), out.len(), "norm: x and out differ in length");
    debug_assert!(dim > 0 && x.len().is_multiple_of(dim), "norm: x is not rows × dim");
    if dim == 0 {
        return;
    }
    if x.len() < PARALLEL_MIN {
        x.chunks_exact(dim)
            .zip(out.chunks_exact_mut(dim))
            .for_each(|(xr, or)| f(xr, or));
    } else {
        x.par_chunks_exact(dim)
            .zip(out.par_chunks_exact_mut(dim))
            .for_each(|(xr, or)| f(xr, or));
    }
}

/// RMSNorm over rows of length `weight.len()`:
/// `out = x · 1/sqrt(mean(x²) + eps) · weight`, as Hugging Face's
/// `x * torch.rsqrt(variance + eps)` followed by `weight * x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for_each_row(x, out, weight.len(), |xr, or| {
        let sum_sq: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let mean_sq = (sum_sq / xr.len() as f64) as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = (v * inv) * w;
        }
    });
}

/// LayerNorm over rows of length `weight.len()` (`torch.nn.LayerNorm`, biased variance):
/// `out = (x - mean) / sqrt(var + eps) · weight + bias`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(weight.len(), bias.len(), "layer_norm: weight and bias differ");
    for_each_row(x, out, weight.len(), |xr, or| {
        let n = xr.len() as f64;
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n;
        // Two-pass variance: E[x²] - E[x]² cancels catastrophically for offset inputs.
        let var = xr.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var as f32 + eps).sqrt();
        let mean = mean as f32;
        for (((o, &v), &w), &b) in or.iter_mut().zip(xr).zip(weight).zip(bias) {
            *o = (v - mean) * inv * w + b;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, Rng};

    fn rms_reference(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            out.extend(row.iter().zip(w).map(|(&v, &g)| (v as f64 * inv * g as f64) as f32));
        }
        out
    }

    fn ln_reference(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
        let d = w.len();
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for i in 0..d {
                let v = (row[i] as f64 - mean) * inv * w[i] as f64 + b[i] as f64;
                out.push(v as f32);
            }
        }
        out
    }

    #[test]
    fn rms_norm_matches_reference() {
        let mut rng = Rng::new(10);
        // The last shape is large enough to take the parallel path.
        for &(rows, d) in &[(1, 1), (1, 7), (3, 33), (5, 129), (40, 2000)] {
            let x = rng.vec(rows * d);
            let w = rng.vec(d);
            let mut out = vec![f32::NAN; rows * d];
            rms_norm(&x, &w, 1e-6, &mut out);
            assert_close(&out, &rms_reference(&x, &w, 1e-6), 1e-5, 1e-6);
        }
    }

    #[test]
    fn layer_norm_matches_reference_with_offset_inputs() {
        let mut rng = Rng::new(11);
        for &(rows, d) in &[(1, 1), (2, 5), (3, 128), (40, 2000)] {
            // A large common offset exercises the two-pass variance.
            let x: Vec<f32> = rng.vec(rows * d).iter().map(|v| v + 100.0).collect();
            let w = rng.vec(d);
            let b = rng.vec(d);
            let mut out = vec![f32::NAN; rows * d];
            layer_norm(&x, &w, &b, 1e-5, &mut out);
            assert_close(&out, &ln_reference(&x, &w, &b, 1e-5), 1e-4, 1e-4);
        }
    }
}
