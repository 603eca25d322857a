//! Launch wrappers for the elementwise and per-row kernels: norms, RoPE, SwiGLU, MoE routing
//! and sampling. Buffers are cudarc views; every wrapper checks lengths against the shapes
//! (errors name the field) before launching.

use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};

use super::context::{grid, int, launch, need, GpuKernels};
use super::error::{CudaError, Result};
use crate::rope::RopeStyle;

/// Threads per block of the per-row kernels (norms).
const ROW_THREADS: u32 = 256;
/// Threads per block of the elementwise kernels.
const ELEM_THREADS: u32 = 256;
/// Most blocks an elementwise kernel launches (grid-stride loops cover the rest).
const ELEM_MAX_BLOCKS: usize = 65_535;
/// Limits of moe.cu.
const MOE_MAX_EXPERTS: usize = 512;
const MOE_MAX_TOPK: usize = 32;
const MOE_WARPS: usize = 4;
/// Most sampling candidates sample_rows_f32 sorts in shared memory.
pub const SAMPLE_MAX_CANDIDATES: usize = 2048;

fn elem_grid(n: usize) -> u32 {
    n.div_ceil(ELEM_THREADS as usize).clamp(1, ELEM_MAX_BLOCKS) as u32
}

fn rows_of(field: &'static str, len: usize, dim: usize) -> Result<usize> {
    if dim == 0 || !len.is_multiple_of(dim) {
        return Err(CudaError::invalid(
            field,
            format!("length {len} is not a whole number of rows of {dim}"),
        ));
    }
    Ok(len / dim)
}

/// Where the rope part sits inside a batch of vectors (see `cuda/rope.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeLayout {
    /// Vectors to rotate.
    pub n_vecs: usize,
    /// Vectors per token row (heads); each row has its own cos/sin.
    pub vecs_per_row: usize,
    /// Floats from one vector to the next.
    pub stride: usize,
    /// Offset of the rope part inside a vector.
    pub offset: usize,
    /// Rope pairs per vector (`cos`/`sin` row length).
    pub half: usize,
}

/// MoE routing configuration (the model config's fields).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeRouting {
    /// Expert groups (`n_group`).
    pub n_group: usize,
    /// Groups kept per token (`topk_group`).
    pub topk_group: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Renormalize the chosen weights (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// Weight multiplier (`routed_scaling_factor`).
    pub routed_scaling_factor: f32,
}

impl GpuKernels {
    /// RMSNorm of rows of `weight.len()` (kernels::rms_norm).
    pub fn rms_norm(
        &self,
        x: &CudaView<f32>,
        weight: &CudaView<f32>,
        eps: f32,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let dim = weight.len();
        let rows = rows_of("x", x.len(), dim)?;
        need("out", out.len(), x.len())?;
        let (rows_i, dim_i) = (int("rows", rows)?, int("dim", dim)?);
        let mut b = self.builder("rms_norm_f32")?;
        b.arg(x).arg(weight).arg(out).arg(&rows_i).arg(&dim_i).arg(&eps);
        launch(b, "rms_norm_f32", grid(rows as u32, ROW_THREADS))
    }

    /// LayerNorm of rows of `weight.len()` (kernels::layer_norm).
    pub fn layer_norm(
        &self,
        x: &CudaView<f32>,
        weight: &CudaView<f32>,
        bias: &CudaView<f32>,
        eps: f32,
        out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let dim = weight.len();
        let rows = rows_of("x", x.len(), dim)?;
        need("bias", bias.len(), dim)?;
        need("out", out.len(), x.len())?;
        let (rows_i, dim_i) = (int("rows", rows)?, int("dim", dim)?);
        let mut b = self.builder("layer_norm_f32")?;
        b.arg(x)
            .arg(weight)
            .arg(bias)
            .arg(out)
            .arg(&rows_i)
            .arg(&dim_i)
            .arg(&eps);
        launch(b, "layer_norm_f32", grid(rows as u32, ROW_THREADS))
    }

    /// Rotary embedding in place on the rope parts of `x` (kernels::apply_rope for every
    /// vector), `cos`/`sin` holding one row of `layout.half` values per token row.
    pub fn rope(
        &self,
        x: &mut CudaViewMut<f32>,
        cos: &CudaView<f32>,
        sin: &CudaView<f32>,
        layout: RopeLayout,
        style: RopeStyle,
    ) -> Result<()> {
        let l = layout;
        if l.vecs_per_row == 0 {
            return Err(CudaError::invalid("vecs_per_row", "must be at least 1"));
        }
        if l.offset + 2 * l.half > l.stride {
            return Err(CudaError::invalid(
                "offset",
                format!(
                    "rope part {}..{} does not fit a vector of stride {}",
                    l.offset,
                    l.offset + 2 * l.half,
                    l.stride
                ),
            ));
        }
        if l.n_vecs == 0 || l.half == 0 {
            return Ok(());
        }
        let rows = l.n_vecs.div_ceil(l.vecs_per_row);
        need("x", x.len(), (l.n_vecs - 1) * l.stride + l.offset + 2 * l.half)?;
        need("cos", cos.len(), rows * l.half)?;
        need("sin", sin.len(), rows * l.half)?;
        int("n_vecs * half", l.n_vecs * l.half)?;
        let args = [
            int("n_vecs", l.n_vecs)?,
            int("vecs_per_row", l.vecs_per_row)?,
            int("stride", l.stride)?,
            int("offset", l.offset)?,
            int("half", l.half)?,
            (style == RopeStyle::Interleaved) as i32,
        ];
        let mut b = self.builder("rope_f32")?;
        b.arg(x).arg(cos).arg(sin);
        for a in &args {
            b.arg(a);
        }
        launch(b, "rope_f32", grid(elem_grid(l.n_vecs * l.half), ELEM_THREADS))
    }

    /// SwiGLU gate in place: `gate = silu(gate) * up` (kernels::silu_mul).
    pub fn silu_mul(&self, gate: &mut CudaViewMut<f32>, up: &CudaView<f32>) -> Result<()> {
        let n = gate.len();
        need("up", up.len(), n)?;
        let n_i = n as i64;
        let mut b = self.builder("silu_mul_f32")?;
        b.arg(gate).arg(up).arg(&n_i);
        launch(b, "silu_mul_f32", grid(elem_grid(n), ELEM_THREADS))
    }

    /// Routes every token (rows of `bias.len()` router logits) as the worker's
    /// `model::moe::route`: writes `top_k` expert ids and weights per token.
    pub fn moe_route(
        &self,
        logits: &CudaView<f32>,
        bias: &CudaView<f32>,
        cfg: &MoeRouting,
        experts_out: &mut CudaViewMut<i32>,
        weights_out: &mut CudaViewMut<f32>,
    ) -> Result<()> {
        let e = bias.len();
        let tokens = rows_of("logits", logits.len(), e)?;
        if e > MOE_MAX_EXPERTS {
            return Err(CudaError::invalid(
                "experts",
                format!("{e} exceeds the GPU limit {MOE_MAX_EXPERTS}"),
            ));
        }
        if cfg.n_group == 0 || cfg.n_group > 32 || e % cfg.n_group != 0 {
            return Err(CudaError::invalid(
                "n_group",
                format!("{} must be in 1..=32 and divide the {e} experts", cfg.n_group),
            ));
        }
        if cfg.topk_group == 0 || cfg.topk_group > cfg.n_group {
            return Err(CudaError::invalid(
                "topk_group",
                format!("{} must be in 1..={}", cfg.topk_group, cfg.n_group),
            ));
        }
        if cfg.top_k == 0 || cfg.top_k > MOE_MAX_TOPK.min(e) {
            return Err(CudaError::invalid(
                "top_k",
                format!("{} must be in 1..={}", cfg.top_k, MOE_MAX_TOPK.min(e)),
            ));
        }
        need("experts_out", experts_out.len(), tokens * cfg.top_k)?;
        need("weights_out", weights_out.len(), tokens * cfg.top_k)?;
        let args = [
            int("tokens", tokens)?,
            e as i32,
            cfg.n_group as i32,
            cfg.topk_group as i32,
            cfg.top_k as i32,
            cfg.norm_topk_prob as i32,
        ];
        let mut b = self.builder("moe_route_f32")?;
        b.arg(logits).arg(bias);
        for a in &args {
            b.arg(a);
        }
        b.arg(&cfg.routed_scaling_factor).arg(experts_out).arg(weights_out);
        launch(
            b,
            "moe_route_f32",
            grid(tokens.div_ceil(MOE_WARPS) as u32, (MOE_WARPS * 32) as u32),
        )
    }

    /// Greedy token per row of `vocab` logits (the worker's `sampling::argmax`).
    pub fn argmax_rows(&self, logits: &CudaView<f32>, vocab: usize, out: &mut CudaViewMut<i32>) -> Result<()> {
        let rows = rows_of("logits", logits.len(), vocab)?;
        need("out", out.len(), rows)?;
        let vocab_i = int("vocab", vocab)?;
        let mut b = self.builder("argmax_rows_f32")?;
        b.arg(logits).arg(&vocab_i).arg(out);
        launch(b, "argmax_rows_f32", grid(rows as u32, 1024))
    }
}
