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
                library: "cuBLAS (libcublas.so.12)",
                hint: "install the CUDA toolkit's cuBLAS or PyPI's nvidia-cublas-cu12 and put it on LD_LIBRARY_PATH"
                    .into(),
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
