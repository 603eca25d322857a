//! Runtime ISA dispatch and the vectorizable building blocks the hot kernels share.
//!
//! The workspace is compiled for baseline x86-64 (SSE2, no FMA) so the binaries run anywhere.
//! The inner loops below are written over fixed-width lane arrays so LLVM's vectorizer turns
//! them into SIMD code; [`multiversion!`] then compiles each hot kernel a second and third
//! time with AVX2+FMA and AVX-512 enabled and picks the best copy at run time. The helpers
//! are `#[inline(always)]` so they inherit the target features of the function they land in.

/// Widest instruction set the running CPU supports, as far as these kernels care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F (x86-64-v4 class).
    Avx512,
    /// AVX2 with FMA (x86-64-v3 class).
    Avx2Fma,
    /// Whatever the compile target guarantees.
    Baseline,
}

/// Detects the ISA; `is_x86_feature_detected!` caches its answer, so this is a few loads.
#[inline]
pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            return Isa::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
    }
    Isa::Baseline
}

/// Defines `fn $name(args) -> ret` that calls `$imp::<FMA>(args)` compiled for the best ISA.
///
/// `$imp` must be `#[inline(always)]` and generic over `const FMA: bool`: with FMA it uses
/// fused multiply-adds (`f32::mul_add` would be a slow libm call on a target without FMA).
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    $imp::<true>($($arg),*)
                }
                match $crate::simd::isa() {
                    // SAFETY: `isa()` checked at run time that the CPU has these features.
                    $crate::simd::Isa::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Isa::Avx2Fma => return unsafe { v3($($arg),*) },
                    $crate::simd::Isa::Baseline => {}
                }
            }
            $imp::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Lanes per accumulator: one AVX-512 register, two AVX2 registers.
pub(crate) const LANES: usize = 16;

/// `a * b + c`, fused when the enclosing function was compiled with FMA.
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Horizontal sum as a halving tree, which LLVM turns into shuffles instead of 15 serial adds.
#[inline(always)]
pub(crate) fn hsum(v: [f32; LANES]) -> f32 {
    let mut h8 = [0.0f32; 8];
    for i in 0..8 {
        h8[i] = v[i] + v[i + 8];
    }
    let mut h4 = [0.0f32; 4];
    for i in 0..4 {
        h4[i] = h8[i] + h8[i + 4];
    }
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// Dot product with four independent lane accumulators (hides FMA latency; the loop is
/// bound by its two loads per FMA).
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [[0.0f32; LANES]; 4];
    let mut ca = a.chunks_exact(4 * LANES);
    let mut cb = b.chunks_exact(4 * LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for (u, accu) in acc.iter_mut().enumerate() {
            let (x, y) = (&x[u * LANES..][..LANES], &y[u * LANES..][..LANES]);
            for l in 0..LANES {
                accu[l] = fmadd::<FMA>(x[l], y[l], accu[l]);
            }
        }
    }
    let (ra, rb) = (ca.remainder(), cb.remainder());
    let mut ca = ra.chunks_exact(LANES);
    let mut cb = rb.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[0][l] = fmadd::<FMA>(x[l], y[l], acc[0][l]);
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail = fmadd::<FMA>(*x, *y, tail);
    }
    let mut sum = [0.0f32; LANES];
    for l in 0..LANES {
        sum[l] = (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]);
    }
    hsum(sum) + tail
}

/// Four dot products `a[i] · b` sharing the loads of `b` (1.25 loads per FMA instead of 2).
#[inline(always)]
pub(crate) fn dot4<const FMA: bool>(a: [&[f32]; 4], b: &[f32]) -> [f32; 4] {
    let n = b.len();
    debug_assert!(a.iter().all(|r| r.len() == n));
    let a = [&a[0][..n], &a[1][..n], &a[2][..n], &a[3][..n]];
    let mut acc = [[0.0f32; LANES]; 4];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        let y = &b[i..i + LANES];
        for (r, accr) in acc.iter_mut().enumerate() {
            let x = &a[r][i..i + LANES];
            for l in 0..LANES {
                accr[l] = fmadd::<FMA>(x[l], y[l], accr[l]);
            }
        }
        i += LANES;
    }
    let mut out = [0.0f32; 4];
    for r in 0..4 {
        let mut tail = 0.0f32;
        for j in full..n {
            tail = fmadd::<FMA>(a[r][j], b[j], tail);
        }
        out[r] = hsum(acc[r]) + tail;
    }
    out
}
