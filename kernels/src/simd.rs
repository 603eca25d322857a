//! Runtime ISA dispatch and the explicit-SIMD building blocks the hot kernels share.
//!
//! The workspace is compiled for baseline x86-64 (SSE2, no FMA) so its binaries run on any
//! x86-64 machine. Hot kernels are written once, generic over a [`Simd`] token, and
//! [`multiversion!`] instantiates them inside functions compiled with AVX-512 or AVX2+FMA,
//! picking the best at run time. Explicit intrinsics rather than auto-vectorization: LLVM's
//! SLP vectorizer reliably handled these loops in isolation but silently fell back to
//! scalar code once they were inlined into the larger attention kernel.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

mod dot;
pub(crate) use dot::{dot, dot4, dot_4x2_acc, prefetch};

/// Widest instruction set the running CPU supports, as far as these kernels care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// Whatever the compile target guarantees.
    Baseline,
    /// AVX2 with FMA (x86-64-v3 class).
    Avx2,
    /// AVX-512F (x86-64-v4 class).
    Avx512,
}

#[cfg(test)]
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Detects the ISA; `is_x86_feature_detected!` caches its answer, so this is a few loads.
#[inline]
pub(crate) fn isa() -> Isa {
    #[allow(unused_mut)]
    let mut best = Isa::Baseline;
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            best = Isa::Avx2;
            if is_x86_feature_detected!("avx512f") {
                best = Isa::Avx512;
            }
        }
    }
    #[cfg(test)]
    {
        // Tests may cap (never raise) the level to exercise the narrower code paths.
        let cap = match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
            0 => Isa::Baseline,
            1 => Isa::Avx2,
            _ => Isa::Avx512,
        };
        best = best.min(cap);
    }
    best
}

/// Runs `f` once per ISA level this CPU supports, with dispatch capped at that level.
/// Serialized, since the cap is process-wide.
#[cfg(test)]
pub(crate) fn for_each_isa(mut f: impl FnMut(Isa)) {
    use std::sync::atomic::Ordering;
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for (code, level) in [(0u8, Isa::Baseline), (1, Isa::Avx2), (2, Isa::Avx512)] {
        FORCED.store(code, Ordering::Relaxed);
        if isa() == level {
            f(level);
        }
    }
    FORCED.store(u8::MAX, Ordering::Relaxed);
}

/// Vector operations on `f32`, implemented by zero-sized tokens whose existence proves the
/// CPU supports the instructions. Every method is `#[inline(always)]` so that it lands in
/// the target-feature function created by [`multiversion!`] and compiles to one instruction.
pub(crate) trait Simd: Copy {
    /// One vector register of `f32`.
    type V: Copy;
    /// Lanes per vector.
    const LANES: usize;
    /// All lanes zero.
    fn zero(self) -> Self::V;
    /// All lanes `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads the first `LANES` elements of `s` (panics if shorter).
    fn load(self, s: &[f32]) -> Self::V;
    /// Stores into the first `LANES` elements of `s` (panics if shorter).
    fn store(self, s: &mut [f32], v: Self::V);
    /// `a * b + c`, fused.
    fn fmadd(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise sum.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise product.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `max(a, 0)` (ReLU).
    fn relu(self, a: Self::V) -> Self::V;
    /// Sum of all lanes.
    fn hsum(self, v: Self::V) -> f32;
}

/// Token for AVX-512F.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct V4(());

#[cfg(target_arch = "x86_64")]
impl V4 {
    /// # Safety
    /// The CPU must support AVX-512F.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        V4(())
    }
}

// SAFETY (all `unsafe` blocks in this impl): a `V4` exists only if the CPU has AVX-512F;
// loads and stores stay in bounds because the slice length is asserted first.
#[cfg(target_arch = "x86_64")]
impl Simd for V4 {
    type V = __m512;
    const LANES: usize = 16;
    #[inline(always)]
    fn zero(self) -> __m512 {
        unsafe { _mm512_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m512 {
        assert!(s.len() >= 16);
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m512) {
        assert!(s.len() >= 16);
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fmadd(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn relu(self, a: __m512) -> __m512 {
        unsafe { _mm512_max_ps(a, _mm512_setzero_ps()) }
    }
    #[inline(always)]
    fn hsum(self, v: __m512) -> f32 {
        unsafe { _mm512_reduce_add_ps(v) }
    }
}

/// Token for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct V3(());

#[cfg(target_arch = "x86_64")]
impl V3 {
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        V3(())
    }
}

// SAFETY (all `unsafe` blocks in this impl): a `V3` exists only if the CPU has AVX2 and
// FMA; loads and stores stay in bounds because the slice length is asserted first.
#[cfg(target_arch = "x86_64")]
impl Simd for V3 {
    type V = __m256;
    const LANES: usize = 8;
    #[inline(always)]
    fn zero(self) -> __m256 {
        unsafe { _mm256_setzero_ps() }
    }
    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m256 {
        assert!(s.len() >= 8);
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m256) {
        assert!(s.len() >= 8);
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn fmadd(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn relu(self, a: __m256) -> __m256 {
        unsafe { _mm256_max_ps(a, _mm256_setzero_ps()) }
    }
    #[inline(always)]
    fn hsum(self, v: __m256) -> f32 {
        unsafe {
            let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let d = _mm_add_ps(q, _mm_movehl_ps(q, q));
            _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)))
        }
    }
}

/// Portable token: four-lane arrays that LLVM lowers to SSE2 (no FMA on that target, so
/// `fmadd` is a separate multiply and add).
#[derive(Clone, Copy)]
pub(crate) struct Portable;

impl Simd for Portable {
    type V = [f32; 4];
    const LANES: usize = 4;
    #[inline(always)]
    fn zero(self) -> [f32; 4] {
        [0.0; 4]
    }
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; 4] {
        [x; 4]
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> [f32; 4] {
        [s[0], s[1], s[2], s[3]]
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: [f32; 4]) {
        s[..4].copy_from_slice(&v);
    }
    #[inline(always)]
    fn fmadd(self, a: [f32; 4], b: [f32; 4], c: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn add(self, a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; 4], b: [f32; 4]) -> [f32; 4] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn relu(self, a: [f32; 4]) -> [f32; 4] {
        a.map(|v| if v > 0.0 { v } else { 0.0 })
    }
    #[inline(always)]
    fn hsum(self, v: [f32; 4]) -> f32 {
        (v[0] + v[2]) + (v[1] + v[3])
    }
}

/// Defines `fn $name(args) -> ret` that runs `$imp(token, args)` compiled for the best ISA
/// the CPU has. `$imp` must be `#[inline(always)]` and generic over `S: Simd`.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $imp:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                fn v4($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: only called after `isa()` detected AVX-512F.
                    $imp(unsafe { $crate::simd::V4::new_unchecked() }, $($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn v3($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: only called after `isa()` detected AVX2 and FMA.
                    $imp(unsafe { $crate::simd::V3::new_unchecked() }, $($arg),*)
                }
                match $crate::simd::isa() {
                    // SAFETY: `isa()` checked at run time that the CPU has these features.
                    $crate::simd::Isa::Avx512 => return unsafe { v4($($arg),*) },
                    // SAFETY: as above.
                    $crate::simd::Isa::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::simd::Isa::Baseline => {}
                }
            }
            $imp($crate::simd::Portable, $($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Below this `x - max` the exponential is flushed to zero: `exp(-86)` is 4e-38, near the
/// smallest normal `f32`, and the exponent-bit trick below must not leave the normal range.
const EXP_FLUSH: f32 = -86.0;

/// `exp(x)` for `x <= 0` (including `-inf`, which gives 0), branch-free so loops over it
/// vectorize: range reduction by ln 2, a degree-6 polynomial on [-ln2/2, ln2/2], and the
/// power of two put into the exponent bits. Relative error below 2e-7.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let flush = x < EXP_FLUSH;
    let x = if flush { EXP_FLUSH } else { x };
    // Round to nearest by the 1.5·2²³ trick: `t`'s low mantissa bits then hold n as a
    // two's-complement integer, read off with a bit cast. Plain adds and bit casts
    // vectorize; `round()` and the saturating `as i32` do not.
    const SHIFTER: f32 = 12_582_912.0;
    // `mul_add` is one FMA instruction in the AVX2 and AVX-512 builds of the callers (on the
    // portable path a slower library call); Rust never contracts `a * b + c` by itself.
    let t = x.mul_add(LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    // Taylor coefficients 1/k!; on |r| <= 0.347 the truncation error is below 1e-7.
    let p: f32 = 1.0 / 720.0;
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let bits = (p.to_bits() as i32).wrapping_add(n_int << 23);
    let v = f32::from_bits(bits as u32);
    if flush {
        0.0
    } else {
        v
    }
}
