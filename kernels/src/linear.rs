//! Dense projections: `x · Wᵀ` for PyTorch `nn.Linear` weights stored `[out, in]` row-major.
//!
//! Prefill-sized products go to the `gemm` crate (packed, register-blocked, AVX-512 on this
//! hardware). Decode is a matrix–vector product, bound by streaming the weight from memory,
//! so it gets a row-parallel kernel that reads each weight once; a few rows (small decode
//! batches, the indexer's per-head products) share one pass over the weight the same way.

use rayon::prelude::*;

use crate::disjoint::DisjointRows;
use crate::simd::{self, multiversion, Simd};

/// Up to this many rows `matmul_t` streams the weight through the 4×2 dot kernel instead of
/// calling `gemm`, which first packs the whole transposed weight: at small m that copy costs
/// more than the product. Measured with `kernel-bench` (k = n = 4096, 2 threads): m=2 is
/// 1.6× faster than `gemm`, m=8 1.4×, m=32 still 1.1×.
const SMALL_M_MAX: usize = 32;

/// Inner-dimension block of the small-m kernel: 512 floats of up to 32 input rows are 64 KiB,
/// which stays in L1/L2 while weight rows stream past.
const SMALL_M_K_BLOCK: usize = 512;

/// Below this many multiply-adds a GEMM is done on the calling thread: waking the pool
/// costs more than it saves.
const GEMM_PARALLEL_MIN_MACS: usize = 1 << 18;

/// Output rows per rayon task in `gemv_t`: 64 rows of a 4096-wide weight are 1 MiB, enough
/// work to amortize task overhead while leaving dozens of tasks to balance.
const GEMV_ROWS_PER_TASK: usize = 64;

/// Weights with at most this many rows (output features) are packed whole by `gemm` on the
/// calling thread before its workers start (its `m ≤ 2·mc` rule, with `mc` at most 8
/// micro-kernel heights of 64 rows for f32 on AVX-512).
const PREPACKED_WEIGHT_MAX_ROWS: usize = 1024;

/// Products of at least this many input rows split such weights by columns instead.
const SPLIT_MIN_ROWS: usize = 256;

/// Column parts are multiples of the 16-float vector, so each part's packing stays aligned
/// with `gemm`'s micro-kernel.
const SPLIT_ALIGN: usize = 16;

/// Below this many weights a GEMV stays on the calling thread.
const GEMV_PARALLEL_MIN: usize = 1 << 16;

/// `out[m×n] = x[m×k] · w[n×k]ᵀ`, where `w` is an `nn.Linear` weight `[out_features,
/// in_features]`. Overwrites `out`. Multithreaded on the current rayon pool.
pub fn matmul_t(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize) {
    matmul_t_with(x, w, out, m, k, n, true);
}

/// [`matmul_t`] with explicit control over threading. Kernels that already run inside a
/// rayon task pass `parallel = false` so the product stays on that task's thread.
pub(crate) fn matmul_t_with(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, parallel: bool) {
    debug_assert_eq!(x.len(), m * k, "matmul_t: x is not m×k");
    debug_assert_eq!(w.len(), n * k, "matmul_t: w is not n×k");
    debug_assert_eq!(out.len(), m * n, "matmul_t: out is not m×n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    if m == 1 {
        if parallel {
            gemv_t(x, w, out, k, n);
        } else {
            gemv_rows(x, w, out, k);
        }
        return;
    }
    if m <= SMALL_M_MAX {
        small_m(x, w, out, m, k, n, parallel);
        return;
    }
    // Real checks, not debug ones: `gemm` reads and writes through raw pointers.
    assert!(
        x.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_t: shapes"
    );
    let threads = rayon::current_num_threads();
    let parallel = parallel && m * n * k >= GEMM_PARALLEL_MIN_MACS;
    if parallel && threads > 1 && n <= PREPACKED_WEIGHT_MAX_ROWS && m >= SPLIT_MIN_ROWS {
        // `gemm` packs a weight this small whole on the calling thread before its workers
        // start; per-thread column slices pack their own part at the same time instead.
        let parts = threads.min(n.div_ceil(SPLIT_ALIGN));
        let per = n.div_ceil(parts).next_multiple_of(SPLIT_ALIGN);
        let dst = DisjointRows::new(out, n);
        (0..n.div_ceil(per)).into_par_iter().for_each(|p| {
            let j0 = p * per;
            let cols = per.min(n - j0);
            // SAFETY: part p writes only columns j0..j0 + cols of each of the m rows of
            // `out` (row stride n), disjoint from every other part; `x` and `w` are read
            // within their asserted lengths.
            unsafe {
                gemm_rows_major(
                    dst.columns(j0).as_ptr(),
                    n,
                    x,
                    &w[j0 * k..(j0 + cols) * k],
                    (m, k, cols),
                    gemm::Parallelism::None,
                )
            };
        });
        return;
    }
    let par = if parallel {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `out` holds m×n floats and `x`, `w` their m×k and n×k (asserted above).
    unsafe { gemm_rows_major(out.as_mut_ptr(), n, x, w, (m, k, n), par) };
}

/// `dst[m×n] = x[m×k] · w[n×k]ᵀ` through `gemm`, `dst` row-major with row stride
/// `dst_stride` (a column slice of a wider output when `dst_stride > n`).
///
/// # Safety
/// `dst` must be valid for writes of every `dst[i * dst_stride + j]`, i < m, j < n, and no
/// other thread may access those elements meanwhile; `x` and `w` must hold at least m×k
/// and n×k floats.
unsafe fn gemm_rows_major(
    dst: *mut f32,
    dst_stride: usize,
    x: &[f32],
    w: &[f32],
    (m, k, n): (usize, usize, usize),
    par: gemm::Parallelism,
) {
    assert!(x.len() >= m * k && w.len() >= n * k, "matmul_t: shapes");
    // SAFETY: lhs is x, m×k row-major; rhs is the k×n view wᵀ of the n×k row-major w
    // (moving along a column of the view, i.e. along k, is stride 1; moving to the next
    // column, i.e. the next output feature, is stride k); dst as the caller guarantees.
    // `read_dst = false` so `dst` is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// A strided single-threaded GEMM view: `rows × cols` elements, element `(i, j)` at
/// `i * row_stride + j * col_stride`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Strided {
    /// Step between rows.
    pub row_stride: usize,
    /// Step between columns.
    pub col_stride: usize,
}

impl Strided {
    /// Row-major with `row_stride` elements per row.
    pub(crate) fn rows(row_stride: usize) -> Self {
        Strided {
            row_stride,
            col_stride: 1,
        }
    }

    /// Smallest slice length that holds a `rows × cols` view.
    fn span(self, rows: usize, cols: usize) -> usize {
        (rows - 1) * self.row_stride + (cols - 1) * self.col_stride + 1
    }
}

/// What [`gemm_strided`] does with its product.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Product {
    /// `dst = factor · lhs · rhs`.
    Overwrite(f32),
    /// `dst += lhs · rhs`.
    Accumulate,
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (scaled, or added to `dst`: see [`Product`]) on the
/// calling thread, every operand a strided view into a slice (so per-head slices of
/// interleaved activations need no copies).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided(
    dst: &mut [f32],
    dst_v: Strided,
    lhs: &[f32],
    lhs_v: Strided,
    rhs: &[f32],
    rhs_v: Strided,
    (m, n, k): (usize, usize, usize),
    product: Product,
) {
    let (accumulate, factor) = match product {
        Product::Overwrite(f) => (false, f),
        Product::Accumulate => (true, 1.0),
    };
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_v.row_stride + j * dst_v.col_stride] = 0.0;
                }
            }
        }
        return;
    }
    // Real checks, not debug ones: `gemm` reads and writes through raw pointers.
    assert!(
        dst.len() >= dst_v.span(m, n) && lhs.len() >= lhs_v.span(m, k) && rhs.len() >= rhs_v.span(k, n),
        "gemm_strided: a view reaches past its slice"
    );
    // SAFETY: every element the views address lies inside its slice (asserted above);
    // `dst` is exclusively borrowed and does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_v.col_stride as isize,
            dst_v.row_stride as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_v.col_stride as isize,
            lhs_v.row_stride as isize,
            rhs.as_ptr(),
            rhs_v.col_stride as isize,
            rhs_v.row_stride as isize,
            if accumulate { 1.0f32 } else { 0.0f32 },
            factor,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out[n] = w[n×k] · x[k]`: one input vector against an `nn.Linear` weight. Rows of the
/// output are split across rayon tasks; the kernel streams `w` once, so it is bound by
/// memory bandwidth rather than arithmetic.
pub fn gemv_t(x: &[f32], w: &[f32], out: &mut [f32], k: usize, n: usize) {
    debug_assert_eq!(x.len(), k, "gemv_t: x is not k long");
    debug_assert_eq!(w.len(), n * k, "gemv_t: w is not n×k");
    debug_assert_eq!(out.len(), n, "gemv_t: out is not n long");
    if n * k < GEMV_PARALLEL_MIN {
        gemv_rows(x, w, out, k);
        return;
    }
    out.par_chunks_mut(GEMV_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(task, o)| {
            let first = task * GEMV_ROWS_PER_TASK;
            gemv_rows(x, &w[first * k..(first + o.len()) * k], o, k);
        });
}

multiversion! {
    /// Serial GEMV over `out.len()` consecutive rows of `w`.
    fn gemv_rows(x: &[f32], w: &[f32], out: &mut [f32], k: usize) => gemv_rows_impl
}

#[inline(always)]
fn gemv_rows_impl<S: Simd>(s: S, x: &[f32], w: &[f32], out: &mut [f32], k: usize) {
    if k == 0 {
        out.fill(0.0);
        return;
    }
    // Four rows at a time share each load of `x`, so the loop is bound by the weight stream.
    let mut rows = w.chunks_exact(k);
    let mut outs = out.chunks_exact_mut(4);
    for o in &mut outs {
        let r: [&[f32]; 4] = std::array::from_fn(|_| rows.next().unwrap_or(&[]));
        o.copy_from_slice(&simd::dot4(s, r, x));
    }
    for o in outs.into_remainder() {
        *o = simd::dot(s, rows.next().unwrap_or(&[]), x);
    }
}

/// `out = x · wᵀ` for a few rows of `x`. Each task takes a tile of weight rows, which stays
/// in L2 while every input row passes over it, and produces that tile's `outᵀ` (small and
/// contiguous, so tasks need not share `out`); the tiles are then transposed into `out`.
fn small_m(x: &[f32], w: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, parallel: bool) {
    let tile = |w: &[f32]| -> Vec<f32> {
        let mut out_t = vec![0.0f32; w.len() / k * m];
        small_m_rows(x, w, &mut out_t, m, k);
        out_t
    };
    let tiles: Vec<Vec<f32>> = if parallel && n * k >= GEMV_PARALLEL_MIN {
        w.par_chunks(GEMV_ROWS_PER_TASK * k).map(tile).collect()
    } else {
        vec![tile(w)]
    };
    let mut j = 0;
    for out_t in &tiles {
        for col in out_t.chunks_exact(m) {
            for (i, &v) in col.iter().enumerate() {
                out[i * n + j] = v;
            }
            j += 1;
        }
    }
}

multiversion! {
    /// `out_t[j·m + i] = x[i] · w[j]` for every row `j` of `w` and `i < m`.
    fn small_m_rows(x: &[f32], w: &[f32], out_t: &mut [f32], m: usize, k: usize) => small_m_rows_impl
}

#[inline(always)]
fn small_m_rows_impl<S: Simd>(s: S, x: &[f32], w: &[f32], out_t: &mut [f32], m: usize, k: usize) {
    // Four input rows × two weight rows per pass: six loads feed eight FMAs. A short last
    // group repeats its final row (same addresses, so only the discarded FMAs are wasted).
    // The inner dimension goes in blocks so the block of every input row stays in L1 while
    // the weight rows pass over it.
    let n = out_t.len() / m;
    out_t.fill(0.0);
    for k0 in (0..k).step_by(SMALL_M_K_BLOCK) {
        let k1 = (k0 + SMALL_M_K_BLOCK).min(k);
        let group = |g: usize| -> [&[f32]; 4] {
            let mut xs: [&[f32]; 4] = [&[]; 4];
            for (u, xr) in xs.iter_mut().enumerate() {
                let i = (g + u).min(m - 1);
                *xr = &x[i * k + k0..i * k + k1];
            }
            xs
        };
        let wrow = |j: usize| &w[j * k + k0..j * k + k1];
        let mut j = 0;
        while j + 2 <= n {
            // Short strided segments defeat the hardware prefetcher: fetch the next pair's.
            if j + 4 <= n {
                simd::prefetch(wrow(j + 2));
                simd::prefetch(wrow(j + 3));
            }
            for g in (0..m).step_by(4) {
                let mut acc = [[s.zero(); 2]; 4];
                let mut tail = [[0.0f32; 2]; 4];
                simd::dot_4x2_acc(s, group(g), [wrow(j), wrow(j + 1)], &mut acc, &mut tail);
                for u in 0..(m - g).min(4) {
                    for v in 0..2 {
                        out_t[(j + v) * m + g + u] += s.hsum(acc[u][v]) + tail[u][v];
                    }
                }
            }
            j += 2;
        }
        if j < n {
            for g in (0..m).step_by(4) {
                let d = simd::dot4(s, group(g), wrow(j));
                for u in 0..(m - g).min(4) {
                    out_t[j * m + g + u] += d[u];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::for_each_isa;
    use crate::test_util::{assert_close, Rng};

    fn reference(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for l in 0..k {
                    acc += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                out[i * n + j] = acc as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_reference_on_odd_shapes() {
        let mut rng = Rng::new(1);
        for &(m, k, n) in &[
            (1, 1, 1),
            (1, 7, 5),
            (2, 33, 17),
            (3, 1, 9),
            (3, 65, 31),
            (5, 129, 70),
            (4, 40, 200),
            (7, 300, 300),
            (16, 64, 1100),
            (17, 100, 3),
            (64, 64, 64),
            (70, 300, 90),
            // Split by columns across threads (at least 256 rows, at most 1024 columns),
            // parts of uneven width.
            (300, 70, 1000),
            (260, 130, 17),
            (400, 64, 576),
        ] {
            let x = rng.vec(m * k);
            let w = rng.vec(n * k);
            let mut out = vec![f32::NAN; m * n];
            let expected = reference(&x, &w, m, k, n);
            matmul_t(&x, &w, &mut out, m, k, n);
            assert_close(&out, &expected, 1e-4, 1e-5);
            let mut serial = vec![f32::NAN; m * n];
            matmul_t_with(&x, &w, &mut serial, m, k, n, false);
            assert_close(&serial, &expected, 1e-4, 1e-5);
        }
    }

    #[test]
    fn every_isa_matches_reference() {
        let mut rng = Rng::new(3);
        for_each_isa(|level| {
            for &(m, k, n) in &[(1, 37, 300), (1, 300, 301), (3, 70, 5), (6, 33, 130)] {
                let x = rng.vec(m * k);
                let w = rng.vec(n * k);
                let mut out = vec![f32::NAN; m * n];
                matmul_t(&x, &w, &mut out, m, k, n);
                assert_close(&out, &reference(&x, &w, m, k, n), 1e-4, 1e-5);
                assert!(out.iter().all(|v| v.is_finite()), "{level:?}");
            }
        });
    }

    #[test]
    fn matmul_with_empty_inner_dim_writes_zeros() {
        let mut out = vec![f32::NAN; 6];
        matmul_t(&[], &[], &mut out, 2, 0, 3);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn gemv_matches_reference_serial_and_parallel() {
        let mut rng = Rng::new(2);
        for &(k, n) in &[(1, 1), (3, 5), (16, 4), (63, 7), (255, 129), (300, 301)] {
            let x = rng.vec(k);
            let w = rng.vec(n * k);
            let mut out = vec![f32::NAN; n];
            gemv_t(&x, &w, &mut out, k, n);
            assert_close(&out, &reference(&x, &w, 1, k, n), 1e-4, 1e-5);
        }
    }
}
