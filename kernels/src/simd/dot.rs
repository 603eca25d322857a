//! Dot-product building blocks on top of the [`Simd`] tokens, plus a prefetch hint.
//!
//! Plain index loops throughout rather than `array::from_fn` or iterator closures: a closure
//! that LLVM leaves out of line is compiled without the caller's target features, so the
//! intrinsics inside it become function calls.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::Simd;

/// Hints the CPU to pull every cache line of `s` into L2 ahead of use. A no-op off x86-64.
#[inline(always)]
pub(crate) fn prefetch(s: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in s.chunks(16) {
        // SAFETY: prefetching is only a hint; it never faults, even on a bad address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}

/// Dot product with four vector accumulators: enough independent FMA chains to cover the
/// FMA latency, since the loop is bound by its two loads per FMA.
#[inline(always)]
pub(crate) fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let w = S::LANES;
    let mut acc = [s.zero(); 4];
    let mut ca = a.chunks_exact(4 * w);
    let mut cb = b.chunks_exact(4 * w);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for (u, accu) in acc.iter_mut().enumerate() {
            *accu = s.fmadd(s.load(&x[u * w..]), s.load(&y[u * w..]), *accu);
        }
    }
    let mut ca = ca.remainder().chunks_exact(w);
    let mut cb = cb.remainder().chunks_exact(w);
    for (x, y) in (&mut ca).zip(&mut cb) {
        acc[0] = s.fmadd(s.load(x), s.load(y), acc[0]);
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    s.hsum(s.add(s.add(acc[0], acc[1]), s.add(acc[2], acc[3]))) + tail
}

/// Four dot products `a[i] · b` sharing each load of `b`. Two accumulators per product make
/// eight independent FMA chains.
#[inline(always)]
pub(crate) fn dot4<S: Simd>(s: S, a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    let n = b.len();
    debug_assert!(a.iter().all(|r| r.len() == n));
    let a = [&a[0][..n], &a[1][..n], &a[2][..n], &a[3][..n]];
    let w = S::LANES;
    let mut lo = [s.zero(); 4];
    let mut hi = [s.zero(); 4];
    let step = 2 * w;
    let full = n / step * step;
    let mut i = 0;
    while i < full {
        let (y0, y1) = (s.load(&b[i..]), s.load(&b[i + w..]));
        for r in 0..4 {
            lo[r] = s.fmadd(s.load(&a[r][i..]), y0, lo[r]);
            hi[r] = s.fmadd(s.load(&a[r][i + w..]), y1, hi[r]);
        }
        i += step;
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        let mut tail = 0.0f32;
        for j in full..n {
            tail += a[r][j] * b[j];
        }
        out[r] = s.hsum(s.add(lo[r], hi[r])) + tail;
    }
    out
}

/// Accumulates the 4 × 2 dot products `a[i] · b[j]` into vector accumulators `acc[i][j]`
/// (elements past the last full vector go to `tail[i][j]`). Eight independent FMA chains
/// cover the FMA latency, and six loads per eight FMAs keep the loop off the load ports;
/// fourteen live vectors fit AVX2's sixteen registers.
#[inline(always)]
pub(crate) fn dot_4x2_acc<S: Simd>(
    s: S,
    a: [&[f32]; 4],
    b: [&[f32]; 2],
    acc: &mut [[S::V; 2]; 4],
    tail: &mut [[f32; 2]; 4],
) {
    let n = b[0].len();
    debug_assert!(b[1].len() == n && a.iter().all(|r| r.len() == n));
    let a = [&a[0][..n], &a[1][..n], &a[2][..n], &a[3][..n]];
    let b = [&b[0][..n], &b[1][..n]];
    let w = S::LANES;
    let full = n / w * w;
    let mut i = 0;
    while i < full {
        let (b0, b1) = (s.load(&b[0][i..]), s.load(&b[1][i..]));
        for r in 0..4 {
            let x = s.load(&a[r][i..]);
            acc[r][0] = s.fmadd(x, b0, acc[r][0]);
            acc[r][1] = s.fmadd(x, b1, acc[r][1]);
        }
        i += w;
    }
    for r in 0..4 {
        for j in full..n {
            tail[r][0] += a[r][j] * b[0][j];
            tail[r][1] += a[r][j] * b[1][j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{for_each_isa, multiversion};
    use crate::test_util::Rng;

    multiversion! {
        fn both(a: &[f32], b: &[f32], c: &[f32], d: &[f32], e: &[f32]) -> (f32, [f32; 4]) => both_impl
    }

    #[inline(always)]
    fn both_impl<S: Simd>(s: S, a: &[f32], b: &[f32], c: &[f32], d: &[f32], e: &[f32]) -> (f32, [f32; 4]) {
        (dot(s, a, b), dot4(s, [a, c, d, e], b))
    }

    #[test]
    fn dot_kernels_match_reference_at_every_isa_and_length() {
        let mut rng = Rng::new(70);
        for_each_isa(|level| {
            for n in [0, 1, 3, 8, 15, 16, 17, 31, 33, 64, 65, 100, 257] {
                let v: Vec<Vec<f32>> = (0..5).map(|_| rng.vec(n)).collect();
                let r =
                    |x: &[f32]| -> f32 { x.iter().zip(&v[1]).map(|(p, q)| *p as f64 * *q as f64).sum::<f64>() as f32 };
                let (d, d4) = both(&v[0], &v[1], &v[2], &v[3], &v[4]);
                let expected = [r(&v[0]), r(&v[2]), r(&v[3]), r(&v[4])];
                assert!((d - expected[0]).abs() < 1e-4, "{level:?} n={n}");
                for i in 0..4 {
                    assert!((d4[i] - expected[i]).abs() < 1e-4, "{level:?} n={n} i={i}");
                }
            }
        });
    }
}
