//! Dense projections through cuBLAS: `out = x · wᵀ` for `nn.Linear` weights (`[out, in]`
//! row-major), in F32 (bit-comparable math to kernels::matmul_t up to summation order; no
//! TF32) and in BF16 with F32 accumulation and F32 output.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result as blas, sys, CudaBlas};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::context::{int, need, GpuKernels};
use super::device::guarded;
use super::error::{CudaError, Result};

/// A cuBLAS handle on the kernels' stream.
pub struct Gemm {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

fn cublas_err(context: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Cublas {
        context: context.to_string(),
        message: e.to_string(),
    }
}

impl GpuKernels {
    /// Creates a cuBLAS handle bound to [`GpuKernels::stream`]. Fails with
    /// [`CudaError::LibraryMissing`] (no panic) when libcublas cannot be loaded.
    pub fn gemm(&self) -> Result<Gemm> {
        // SAFETY: only tries to dlopen the candidate names.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::LibraryMissing {
                library: "cuBLAS (libcublas.so.13 or .so.12)",
                hint: "install the CUDA toolkit's cuBLAS or PyPI's nvidia-cublas and put it on LD_LIBRARY_PATH".into(),
            });
        }
        let stream = self.stream().clone();
        guarded("creating a cuBLAS handle", || {
            CudaBlas::new(stream.clone())
                .map(|blas| Gemm { blas, stream })
                .map_err(|e| cublas_err("creating a handle", e))
        })
    }
}

/// Shapes of one `out[m×n] = x[m×k] · w[n×k]ᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    /// Rows of x and out.
    pub m: usize,
    /// Inner dimension.
    pub k: usize,
    /// Rows of w, columns of out.
    pub n: usize,
}

/// How each batch entry's `w` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[n × k]` row-major (`nn.Linear`'s `[out, in]`): `out = x · wᵀ`.
    OutIn,
    /// `[k × n]` row-major: `out = x · w`.
    InOut,
}

/// A strided batch of `out_b = alpha · x_b · op(w_b) + beta · out_b` for `b < batch`, every
/// matrix row-major with its own row stride (`*_ld`, in elements) and batch stride
/// (`*_stride`): per-head projections read straight out of a `rows × heads × dim` tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StridedGemm {
    /// Rows of x and out.
    pub m: usize,
    /// Columns of out.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Batch entries.
    pub batch: usize,
    /// Elements from one row of x to the next.
    pub x_ld: usize,
    /// Elements from one batch entry of x to the next.
    pub x_stride: usize,
    /// How w is stored.
    pub w_layout: WeightLayout,
    /// Elements from one row of w to the next.
    pub w_ld: usize,
    /// Elements from one batch entry of w to the next.
    pub w_stride: usize,
    /// Elements from one row of out to the next.
    pub out_ld: usize,
    /// Elements from one batch entry of out to the next.
    pub out_stride: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the existing `out` (0: overwrite, 1: accumulate).
    pub beta: f32,
}

impl StridedGemm {
    /// The same batch on the host, plainly (f64 sums): the reference the GPU is tested
    /// against and the definition of the strides.
    pub fn reference(&self, x: &[f32], w: &[f32], out: &mut [f32]) {
        for b in 0..self.batch {
            for i in 0..self.m {
                for j in 0..self.n {
                    let mut acc = 0.0f64;
                    for kk in 0..self.k {
                        let wv = match self.w_layout {
                            WeightLayout::OutIn => w[b * self.w_stride + j * self.w_ld + kk],
                            WeightLayout::InOut => w[b * self.w_stride + kk * self.w_ld + j],
                        };
                        acc += x[b * self.x_stride + i * self.x_ld + kk] as f64 * wv as f64;
                    }
                    let o = &mut out[b * self.out_stride + i * self.out_ld + j];
                    *o = (self.alpha as f64 * acc + self.beta as f64 * *o as f64) as f32;
                }
            }
        }
    }

    /// One contiguous `out[m×n] = alpha · x[m×k] · w[n×k]ᵀ + beta · out`.
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        StridedGemm {
            m,
            n,
            k,
            batch: 1,
            x_ld: k,
            x_stride: 0,
            w_layout: WeightLayout::OutIn,
            w_ld: k,
            w_stride: 0,
            out_ld: n,
            out_stride: 0,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

impl Gemm {
    /// F32: `out = x · wᵀ` (kernels::matmul_t).
    pub fn matmul_t_f32(
        &self,
        x: &CudaView<f32>,
        w: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        shape: GemmShape,
    ) -> Result<()> {
        self.gemm_ex(x, w, out, shape, sys::cudaDataType::CUDA_R_32F)
    }

    /// BF16 inputs (raw `u16` bit patterns), F32 accumulation and output: `out = x · wᵀ`.
    pub fn matmul_t_bf16(
        &self,
        x: &CudaView<u16>,
        w: &CudaView<u16>,
        out: &mut CudaViewMut<f32>,
        shape: GemmShape,
    ) -> Result<()> {
        self.gemm_ex(x, w, out, shape, sys::cudaDataType::CUDA_R_16BF)
    }

    /// F32 strided batch (see [`StridedGemm`]).
    pub fn strided_f32(
        &self,
        x: &CudaView<f32>,
        w: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        s: &StridedGemm,
    ) -> Result<()> {
        self.strided_ex(x, w, out, s, sys::cudaDataType::CUDA_R_32F)
    }

    /// BF16 inputs (raw `u16` bit patterns), F32 accumulation and output, strided batch (see
    /// [`StridedGemm`]).
    pub fn strided_bf16(
        &self,
        x: &CudaView<u16>,
        w: &CudaView<u16>,
        out: &mut CudaViewMut<f32>,
        s: &StridedGemm,
    ) -> Result<()> {
        self.strided_ex(x, w, out, s, sys::cudaDataType::CUDA_R_16BF)
    }

    fn strided_ex<T>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<T>,
        out: &mut CudaViewMut<f32>,
        s: &StridedGemm,
        in_type: sys::cudaDataType,
    ) -> Result<()> {
        if s.m == 0 || s.n == 0 || s.batch == 0 {
            return Ok(());
        }
        if s.k == 0 {
            return Err(CudaError::invalid("k", "must be at least 1"));
        }
        // Leading dimensions must cover a row; buffers must cover the last element touched.
        let (w_row, w_rows) = match s.w_layout {
            WeightLayout::OutIn => (s.k, s.n),
            WeightLayout::InOut => (s.n, s.k),
        };
        for (field, ld, row) in [
            ("x_ld", s.x_ld, s.k),
            ("w_ld", s.w_ld, w_row),
            ("out_ld", s.out_ld, s.n),
        ] {
            if ld < row {
                return Err(CudaError::invalid(
                    field,
                    format!("{ld} is shorter than a row of {row}"),
                ));
            }
        }
        let last = |stride: usize, ld: usize, rows: usize, row: usize| (s.batch - 1) * stride + (rows - 1) * ld + row;
        need("x", x.len(), last(s.x_stride, s.x_ld, s.m, s.k))?;
        need("w", w.len(), last(s.w_stride, s.w_ld, w_rows, w_row))?;
        need("out", out.len(), last(s.out_stride, s.out_ld, s.m, s.n))?;
        let (m, k, n) = (int("m", s.m)?, int("k", s.k)?, int("n", s.n)?);
        let (x_ld, w_ld, out_ld) = (int("x_ld", s.x_ld)?, int("w_ld", s.w_ld)?, int("out_ld", s.out_ld)?);
        let batch = int("batch", s.batch)?;
        let stride = |v: usize| v as std::ffi::c_longlong;
        let stream = &self.stream;
        let (xp, _rx) = x.device_ptr(stream);
        let (wp, _rw) = w.device_ptr(stream);
        let (op, _ro) = out.device_ptr_mut(stream);
        // Column-major view as in gemm_ex: outᵀ (n×m) = op(w)·xᵀ. A row-major [n×k] w reads as
        // column-major k×n (transposed); a row-major [k×n] w reads as column-major n×k (as is).
        let w_op = match s.w_layout {
            WeightLayout::OutIn => sys::cublasOperation_t::CUBLAS_OP_T,
            WeightLayout::InOut => sys::cublasOperation_t::CUBLAS_OP_N,
        };
        // SAFETY: pointers come from live buffers whose extents were checked above.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                w_op,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                &s.alpha as *const f32 as *const c_void,
                wp as *const c_void,
                in_type,
                w_ld,
                stride(s.w_stride),
                xp as *const c_void,
                in_type,
                x_ld,
                stride(s.x_stride),
                &s.beta as *const f32 as *const c_void,
                op as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                out_ld,
                stride(s.out_stride),
                batch,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cublas_err("running GemmStridedBatchedEx", e))
    }

    fn gemm_ex<T>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<T>,
        out: &mut CudaViewMut<f32>,
        s: GemmShape,
        in_type: sys::cudaDataType,
    ) -> Result<()> {
        need("x", x.len(), s.m * s.k)?;
        need("w", w.len(), s.n * s.k)?;
        need("out", out.len(), s.m * s.n)?;
        if s.m == 0 || s.n == 0 {
            return Ok(());
        }
        let (m, k, n) = (int("m", s.m)?, int("k", s.k)?, int("n", s.n)?);
        let stream = &self.stream;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (xp, _rx) = x.device_ptr(stream);
        let (wp, _rw) = w.device_ptr(stream);
        let (op, _ro) = out.device_ptr_mut(stream);
        // cuBLAS is column-major: row-major out[m×n] is column-major outᵀ (n×m, ld n), and
        // outᵀ = w·xᵀ where row-major w[n×k] reads as column-major k×n (ld k, so transposed)
        // and row-major x[m×k] as column-major k×m (ld k, used as is).
        // SAFETY: pointers come from live buffers whose lengths were checked above.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                &alpha as *const f32 as *const c_void,
                wp as *const c_void,
                in_type,
                k,
                xp as *const c_void,
                in_type,
                k,
                &beta as *const f32 as *const c_void,
                op as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                n,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| cublas_err("running GemmEx", e))
    }
}
