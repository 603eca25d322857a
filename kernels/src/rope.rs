//! Rotary position embedding applied to one vector in place.
//!
//! The caller supplies the per-frequency `cos`/`sin` for the token's position (including any
//! YaRN scaling), so this kernel knows nothing about how frequencies are derived.

/// How the rotated coordinates pair up inside a rope vector of dimension `d = 2·cos.len()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])` (GPT-J / DeepSeek-V3 reference layout).
    Interleaved,
    /// Rotate-half pairs `(x[i], x[i + d/2])` (GPT-NeoX / Hugging Face `rotate_half`).
    NeoX,
}

/// Rotates each pair `(a, b)` of `x` by frequency `i`: `(a·cos - b·sin, b·cos + a·sin)`.
///
/// `x` is one vector of rope dimension `2·cos.len()`. Interleaved output stays interleaved;
/// that is consistent because callers only take dot products between vectors rotated with
/// the same style.
pub fn apply_rope(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = cos.len();
    debug_assert_eq!(sin.len(), half, "apply_rope: cos and sin differ in length");
    debug_assert_eq!(x.len(), 2 * half, "apply_rope: x is not 2·cos.len() long");
    match style {
        RopeStyle::Interleaved => {
            for ((pair, &c), &s) in x.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = b * c + a * s;
            }
        }
        RopeStyle::NeoX => {
            let (lo, hi) = x.split_at_mut(half);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(cos).zip(sin) {
                let (va, vb) = (*a, *b);
                *a = va * c - vb * s;
                *b = vb * c + va * s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, Rng};

    fn angles(rng: &mut Rng, half: usize) -> (Vec<f32>, Vec<f32>) {
        let theta: Vec<f64> = (0..half).map(|_| rng.f32() as f64 * 3.0).collect();
        (
            theta.iter().map(|t| t.cos() as f32).collect(),
            theta.iter().map(|t| t.sin() as f32).collect(),
        )
    }

    #[test]
    fn interleaved_rotates_adjacent_pairs() {
        let mut rng = Rng::new(20);
        for half in [1, 3, 32] {
            let (cos, sin) = angles(&mut rng, half);
            let x = rng.vec(2 * half);
            let mut y = x.clone();
            apply_rope(&mut y, &cos, &sin, RopeStyle::Interleaved);
            let mut expected = vec![0.0f32; 2 * half];
            for i in 0..half {
                let (a, b, c, s) = (x[2 * i] as f64, x[2 * i + 1] as f64, cos[i] as f64, sin[i] as f64);
                expected[2 * i] = (a * c - b * s) as f32;
                expected[2 * i + 1] = (b * c + a * s) as f32;
            }
            assert_close(&y, &expected, 1e-5, 1e-6);
        }
    }

    #[test]
    fn neox_rotates_halves() {
        let mut rng = Rng::new(21);
        for half in [1, 5, 32] {
            let (cos, sin) = angles(&mut rng, half);
            let x = rng.vec(2 * half);
            let mut y = x.clone();
            apply_rope(&mut y, &cos, &sin, RopeStyle::NeoX);
            let mut expected = vec![0.0f32; 2 * half];
            for i in 0..half {
                let (a, b, c, s) = (x[i] as f64, x[i + half] as f64, cos[i] as f64, sin[i] as f64);
                expected[i] = (a * c - b * s) as f32;
                expected[i + half] = (b * c + a * s) as f32;
            }
            assert_close(&y, &expected, 1e-5, 1e-6);
        }
    }

    #[test]
    fn styles_agree_on_dot_products_after_permutation() {
        // Rotation preserves relative-position dot products in both layouts: q·k depends only
        // on the angle difference, so permuting interleaved pairs into halves gives the same
        // value.
        let mut rng = Rng::new(22);
        let half = 8;
        let (cq, sq) = angles(&mut rng, half);
        let (ck, sk) = angles(&mut rng, half);
        let q = rng.vec(2 * half);
        let k = rng.vec(2 * half);
        let to_halves = |v: &[f32]| -> Vec<f32> {
            let mut o: Vec<f32> = v.iter().step_by(2).copied().collect();
            o.extend(v.iter().skip(1).step_by(2));
            o
        };
        let (mut qi, mut ki) = (q.clone(), k.clone());
        apply_rope(&mut qi, &cq, &sq, RopeStyle::Interleaved);
        apply_rope(&mut ki, &ck, &sk, RopeStyle::Interleaved);
        let (mut qn, mut kn) = (to_halves(&q), to_halves(&k));
        apply_rope(&mut qn, &cq, &sq, RopeStyle::NeoX);
        apply_rope(&mut kn, &ck, &sk, RopeStyle::NeoX);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&qi, &ki) - dot(&qn, &kn)).abs() < 1e-5);
    }
}
