//! Elementwise activations and softmax variants.

use rayon::prelude::*;

/// Below this many elements `silu_mul` stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// Elements per rayon task in `silu_mul`: `exp` is not vectorized, so this is a few tens of
/// microseconds of work per task.
const CHUNK: usize = 1 << 13;

/// Logistic sigmoid `1 / (1 + e^-x)`; saturates cleanly to 0 and 1 (no NaN) for large |x|.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU gate: `gate[i] = silu(gate[i]) · up[i]` with `silu(x) = x / (1 + e^-x)`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    debug_assert_eq!(gate.len(), up.len(), "silu_mul: gate and up differ in length");
    fn run(g: &mut [f32], u: &[f32]) {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }
    if gate.len() < PARALLEL_MIN {
        run(gate, up);
    } else {
        gate.par_chunks_mut(CHUNK)
            .zip(up.par_chunks(CHUNK))
            .for_each(|(g, u)| run(g, u));
    }
}

/// Softmax in place, subtracting the maximum first so `exp` cannot overflow.
///
/// Exponentials are `f32`; their sum is accumulated in `f64` so a vocabulary-sized row does
/// not lose its small terms. A row whose maximum is `-inf` (everything masked) becomes NaN,
/// as in PyTorch.
pub fn softmax_in_place(x: &mut [f32]) {
    if x.is_empty() {
        return;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Numerically stable log-softmax: `out = x - max - ln Σ exp(x - max)`, the sum in `f64`.
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(x.len(), out.len(), "log_softmax: x and out differ in length");
    if x.is_empty() {
        return;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let shift = max as f64 + sum.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - shift) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, Rng};

    #[test]
    fn sigmoid_matches_formula_and_saturates() {
        for &x in &[-3.0f32, -0.5, 0.0, 0.25, 4.0] {
            let e = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - e).abs() < 1e-7);
        }
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
    }

    #[test]
    fn silu_mul_matches_reference() {
        let mut rng = Rng::new(30);
        // The large size takes the parallel path with a partial last chunk.
        for n in [1, 17, 100_003] {
            let g: Vec<f32> = rng.vec(n).iter().map(|v| v * 8.0).collect();
            let u = rng.vec(n);
            let mut out = g.clone();
            silu_mul(&mut out, &u);
            let expected: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| (g as f64 / (1.0 + (-(g as f64)).exp()) * u as f64) as f32)
                .collect();
            assert_close(&out, &expected, 1e-5, 1e-6);
        }
    }

    #[test]
    fn softmax_matches_reference_and_survives_large_logits() {
        let mut rng = Rng::new(31);
        for n in [1, 3, 1000] {
            let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 50.0 + 1000.0).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            let expected: Vec<f32> = x.iter().map(|&v| ((v as f64 - max).exp() / sum) as f32).collect();
            let mut y = x.clone();
            softmax_in_place(&mut y);
            assert_close(&y, &expected, 1e-5, 1e-7);
        }
    }

    #[test]
    fn log_softmax_matches_reference() {
        let mut rng = Rng::new(32);
        for n in [1, 2, 129, 5000] {
            let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 30.0).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            let expected: Vec<f32> = x.iter().map(|&v| (v as f64 - lse) as f32).collect();
            let mut out = vec![f32::NAN; n];
            log_softmax(&x, &mut out);
            assert_close(&out, &expected, 1e-6, 1e-5);
        }
        // A -inf logit stays -inf without poisoning the others.
        let mut out = [0.0f32; 2];
        log_softmax(&[f32::NEG_INFINITY, 0.0], &mut out);
        assert_eq!(out, [f32::NEG_INFINITY, 0.0]);
    }
}
