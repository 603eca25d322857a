//! Launch wrappers for `cuda/rows.cu`: row gathers and scatters, residual adds and the F32 →
//! BF16 conversion the worker's GPU forward pass needs around its GEMMs.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::context::{grid, int, launch, need, GpuKernels};
use super::error::{CudaError, Result};

const THREADS: u32 = 256;
const MAX_BLOCKS: usize = 65_535;

fn elems(n: usize) -> u32 {
    n.div_ceil(THREADS as usize).clamp(1, MAX_BLOCKS) as u32
}

fn whole_rows(field: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !len.is_multiple_of(dim) {
        return Err(CudaError::invalid(
            field,
            format!("length {len} is not a whole number of rows of {dim}"),
        ));
    }
    Ok(len / dim)
}

impl GpuKernels {
    /// `out[i] = src[idx[i]]` for rows of `dim` floats (`idx.len()` rows); an index outside
    /// `src`'s rows gives a zero row.
    pub fn gather_rows(
        &self,
        src: &CudaView<f32>,
        dim: usize,
        idx: &CudaView<i32>,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let src_rows = whole_rows("src", src.len(), dim)?;
        let rows = idx.len();
        need("out", out.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [int("src rows", src_rows)?, int("rows", rows)?, int("dim", dim)?];
        let mut b = self.builder("gather_rows_f32")?;
        b.arg(src).arg(&args[0]).arg(idx).arg(out).arg(&args[1]).arg(&args[2]);
        launch(b, "gather_rows_f32", grid(elems(rows * dim), THREADS))
    }

    /// `out[idx[i]] = src[i]` for the `idx.len()` rows of `dim` floats in `src` (indices
    /// distinct; one outside `out`'s rows is skipped).
    pub fn scatter_rows(
        &self,
        src: &CudaView<f32>,
        dim: usize,
        idx: &CudaView<i32>,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let out_rows = whole_rows("out", out.len(), dim)?;
        let rows = idx.len();
        need("src", src.len(), rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [int("out rows", out_rows)?, int("rows", rows)?, int("dim", dim)?];
        let mut b = self.builder("scatter_rows_f32")?;
        b.arg(src).arg(idx).arg(out).arg(&args[0]).arg(&args[1]).arg(&args[2]);
        launch(b, "scatter_rows_f32", grid(elems(rows * dim), THREADS))
    }

    /// `out[idx[i]] += weights[i] * src[i]` (product rounded, then the sum, as the CPU's
    /// `o += w * v`), indices distinct within one call.
    pub fn scatter_add_rows(
        &self,
        src: &CudaView<f32>,
        dim: usize,
        idx: &CudaView<i32>,
        weights: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let out_rows = whole_rows("out", out.len(), dim)?;
        let rows = idx.len();
        need("src", src.len(), rows * dim)?;
        need("weights", weights.len(), rows)?;
        if rows == 0 {
            return Ok(());
        }
        let args = [int("out rows", out_rows)?, int("rows", rows)?, int("dim", dim)?];
        let mut b = self.builder("scatter_add_rows_f32")?;
        b.arg(src).arg(idx).arg(weights).arg(out);
        b.arg(&args[0]).arg(&args[1]).arg(&args[2]);
        launch(b, "scatter_add_rows_f32", grid(elems(rows * dim), THREADS))
    }

    /// `acc += x` elementwise.
    pub fn add_in_place(&self, acc: &mut CudaViewMut<f32>, x: &CudaView<f32>) -> Result<()> {
        let n = acc.len();
        need("x", x.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let mut b = self.builder("add_f32")?;
        b.arg(acc).arg(x).arg(&n_i);
        launch(b, "add_f32", grid(elems(n), THREADS))
    }

    /// BF16 bit patterns of `x` (round to nearest even, as `half::bf16::from_f32`) into `out`.
    pub fn to_bf16(&self, x: &CudaView<f32>, out: &mut CudaViewMut<u16>) -> Result<()> {
        let n = x.len();
        need("out", out.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let mut b = self.builder("f32_to_bf16")?;
        b.arg(x).arg(out).arg(&n_i);
        launch(b, "f32_to_bf16", grid(elems(n), THREADS))
    }
}
