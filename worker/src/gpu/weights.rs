//! Device copies of one layer range's weights, made from the host weights
//! [`crate::model::weights`] loads (so checkpoint formats, FP8 dequantization and fused expert
//! tensors are handled once), then dropped on the host.
//!
//! Fused host tensors are split where the device forward wants contiguous outputs:
//! `q_b_proj` into its per-head nope and rope rows, `kv_a_proj_with_mqa` into the latent and
//! rope-key rows, SwiGLU's fused gate/up into gate and up. The math is unchanged (each output
//! element is the same dot product).

use half::bf16;
use kernels::cuda::{CudaSlice, CudaView, CudaViewMut, Gemm, GpuKernels, StridedGemm};

use super::model::{dev, GpuWeightDtype};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::model::weights::{AttentionCore, IndexerWeights, LayerWeights, Linear, Mlp, MoeWeights, SwiGlu};

/// A weight matrix on the device.
pub enum DevMatrix {
    /// BF16 bit patterns (cuBLAS BF16×BF16→F32).
    Bf16(CudaSlice<u16>),
    /// F32 (no TF32).
    F32(CudaSlice<f32>),
}

/// A bias-free linear layer `[out, in]` on the device.
pub struct DevLinear {
    w: DevMatrix,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
}

/// An activation in F32 with, when some weight it meets is BF16, its BF16 copy.
pub struct Act<'a> {
    /// F32 values, rows × width.
    pub f32: CudaView<'a, f32>,
    /// BF16 copy (same length).
    pub bf16: CudaView<'a, u16>,
}

impl DevLinear {
    /// Uploads `w` (`[out, in]` row-major) in `dtype`.
    pub fn upload(k: &GpuKernels, w: &[f32], out: usize, inp: usize, dtype: GpuWeightDtype) -> Result<Self> {
        let w = match dtype {
            GpuWeightDtype::Bf16 => {
                let bits: Vec<u16> = w.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
                DevMatrix::Bf16(dev(k.upload(&bits))?)
            }
            GpuWeightDtype::F32 => DevMatrix::F32(dev(k.upload(w))?),
        };
        Ok(DevLinear { w, out, inp })
    }

    /// Uploads a host [`Linear`].
    pub fn from_host(k: &GpuKernels, l: &Linear, dtype: GpuWeightDtype) -> Result<Self> {
        Self::upload(k, &l.w, l.out, l.inp, dtype)
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        match &self.w {
            DevMatrix::Bf16(w) => w.len() * 2,
            DevMatrix::F32(w) => w.len() * 4,
        }
    }

    /// `y = alpha · x · Wᵀ + beta · y` over `rows` rows.
    pub fn forward(
        &self,
        g: &Gemm,
        x: &Act<'_>,
        rows: usize,
        y: &mut CudaViewMut<f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        let s = StridedGemm {
            alpha,
            beta,
            ..StridedGemm::linear(rows, self.out, self.inp)
        };
        match &self.w {
            DevMatrix::Bf16(w) => dev(g.strided_bf16(&x.bf16, &w.slice(..), y, &s)),
            DevMatrix::F32(w) => dev(g.strided_f32(&x.f32, &w.slice(..), y, &s)),
        }
    }
}

/// SwiGLU with separate gate, up and down projections.
pub struct DevSwiGlu {
    pub gate: DevLinear,
    pub up: DevLinear,
    pub down: DevLinear,
}

impl DevSwiGlu {
    fn from_host(k: &GpuKernels, m: &SwiGlu, dtype: GpuWeightDtype) -> Result<Self> {
        let inter = m.down.inp;
        let d = m.gate_up.inp;
        let (gate, up) = m.gate_up.w.split_at(inter * d);
        Ok(DevSwiGlu {
            gate: DevLinear::upload(k, gate, inter, d, dtype)?,
            up: DevLinear::upload(k, up, inter, d, dtype)?,
            down: DevLinear::from_host(k, &m.down, dtype)?,
        })
    }

    fn bytes(&self) -> usize {
        self.gate.bytes() + self.up.bytes() + self.down.bytes()
    }
}

/// The MoE block: router and bias in F32, experts in the weight dtype.
pub struct DevMoe {
    pub router: DevLinear,
    pub bias: CudaSlice<f32>,
    pub experts: Vec<DevSwiGlu>,
    pub shared: Option<DevSwiGlu>,
}

/// A layer's MLP on the device.
pub enum DevMlp {
    Dense(DevSwiGlu),
    Moe(DevMoe),
}

/// The lightning indexer: projections in the weight dtype, `weights_proj` in F32 (never
/// quantized), LayerNorm parameters in F32.
pub struct DevIndexer {
    pub wq_b: DevLinear,
    pub wk: DevLinear,
    pub k_norm_w: CudaSlice<f32>,
    pub k_norm_b: CudaSlice<f32>,
    pub weights_proj: DevLinear,
}

impl DevIndexer {
    /// Uploads a host indexer.
    pub fn from_host(k: &GpuKernels, ix: &IndexerWeights, dtype: GpuWeightDtype) -> Result<Self> {
        Ok(DevIndexer {
            wq_b: DevLinear::from_host(k, &ix.wq_b, dtype)?,
            wk: DevLinear::from_host(k, &ix.wk, dtype)?,
            k_norm_w: dev(k.upload(&ix.k_norm_w))?,
            k_norm_b: dev(k.upload(&ix.k_norm_b))?,
            weights_proj: DevLinear::from_host(k, &ix.weights_proj, GpuWeightDtype::F32)?,
        })
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        self.wq_b.bytes()
            + self.wk.bytes()
            + self.weights_proj.bytes()
            + 4 * (self.k_norm_w.len() + self.k_norm_b.len())
    }
}

/// One decoder layer on the device (its indexer lives with the model, loaded per pattern).
pub struct DevLayer {
    pub input_norm: CudaSlice<f32>,
    pub post_norm: CudaSlice<f32>,
    pub q_a: DevLinear,
    pub q_a_norm: CudaSlice<f32>,
    /// `q_b_proj` rows of every head's nope part: `[heads · nope, q_lora_rank]`.
    pub q_nope: DevLinear,
    /// `q_b_proj` rows of every head's rope part: `[heads · rope, q_lora_rank]`.
    pub q_pe: DevLinear,
    /// `kv_a_proj_with_mqa` latent rows: `[kv_lora_rank, hidden]`.
    pub kv_ckv: DevLinear,
    /// `kv_a_proj_with_mqa` rope-key rows: `[rope, hidden]`.
    pub kv_pe: DevLinear,
    pub kv_a_norm: CudaSlice<f32>,
    /// `kv_b_proj` whole in F32, `[heads · (nope + v), kv_lora_rank]`: the absorbed form
    /// reads W_uk and W_uv out of it per head.
    pub kv_b: CudaSlice<f32>,
    pub o: DevLinear,
    pub mlp: DevMlp,
}

impl DevLayer {
    /// Uploads host layer weights.
    pub fn from_host(k: &GpuKernels, cfg: &ModelConfig, lw: &LayerWeights, dtype: GpuWeightDtype) -> Result<Self> {
        let a: &AttentionCore = &lw.attn;
        let (h, dn, dr, r) = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.kv_lora_rank,
        );
        let (qlr, d) = (cfg.q_lora_rank, cfg.hidden_size);
        let (nope, pe) = split_heads(&a.q_b.w, h, dn, dr, qlr);
        let (ckv_w, pe_w) = a.kv_a.w.split_at(r * d);
        let mlp = match &lw.mlp {
            Mlp::Dense(m) => DevMlp::Dense(DevSwiGlu::from_host(k, m, dtype)?),
            Mlp::Moe(m) => DevMlp::Moe(moe_from_host(k, cfg, m, dtype)?),
        };
        Ok(DevLayer {
            input_norm: dev(k.upload(&lw.input_norm))?,
            post_norm: dev(k.upload(&lw.post_norm))?,
            q_a: DevLinear::from_host(k, &a.q_a, dtype)?,
            q_a_norm: dev(k.upload(&a.q_a_norm))?,
            q_nope: DevLinear::upload(k, &nope, h * dn, qlr, dtype)?,
            q_pe: DevLinear::upload(k, &pe, h * dr, qlr, dtype)?,
            kv_ckv: DevLinear::upload(k, ckv_w, r, d, dtype)?,
            kv_pe: DevLinear::upload(k, pe_w, dr, d, dtype)?,
            kv_a_norm: dev(k.upload(&a.kv_a_norm))?,
            kv_b: dev(k.upload(&a.kv_b))?,
            o: DevLinear::from_host(k, &a.o, dtype)?,
            mlp,
        })
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        let f = |s: &CudaSlice<f32>| s.len() * 4;
        let mlp = match &self.mlp {
            DevMlp::Dense(m) => m.bytes(),
            DevMlp::Moe(m) => {
                m.router.bytes()
                    + f(&m.bias)
                    + m.experts.iter().map(DevSwiGlu::bytes).sum::<usize>()
                    + m.shared.as_ref().map_or(0, DevSwiGlu::bytes)
            }
        };
        f(&self.input_norm)
            + f(&self.post_norm)
            + self.q_a.bytes()
            + f(&self.q_a_norm)
            + self.q_nope.bytes()
            + self.q_pe.bytes()
            + self.kv_ckv.bytes()
            + self.kv_pe.bytes()
            + f(&self.kv_a_norm)
            + f(&self.kv_b)
            + self.o.bytes()
            + mlp
    }
}

/// Splits a `[heads · (a + b), cols]` row-major matrix whose rows are per head `[a | b]`
/// into the `a` rows of every head (`[heads · a, cols]`) and the `b` rows (`[heads · b, cols]`).
fn split_heads(w: &[f32], heads: usize, a: usize, b: usize, cols: usize) -> (Vec<f32>, Vec<f32>) {
    let mut first = Vec::with_capacity(heads * a * cols);
    let mut second = Vec::with_capacity(heads * b * cols);
    for head in 0..heads {
        let base = head * (a + b) * cols;
        first.extend_from_slice(&w[base..base + a * cols]);
        second.extend_from_slice(&w[base + a * cols..base + (a + b) * cols]);
    }
    (first, second)
}

fn moe_from_host(k: &GpuKernels, cfg: &ModelConfig, m: &MoeWeights, dtype: GpuWeightDtype) -> Result<DevMoe> {
    Ok(DevMoe {
        router: DevLinear::upload(k, &m.router, cfg.n_routed_experts, cfg.hidden_size, GpuWeightDtype::F32)?,
        bias: dev(k.upload(&m.bias))?,
        experts: m
            .experts
            .iter()
            .map(|e| DevSwiGlu::from_host(k, e, dtype))
            .collect::<Result<Vec<_>>>()?,
        shared: m
            .shared
            .as_ref()
            .map(|s| DevSwiGlu::from_host(k, s, dtype))
            .transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_b_split_keeps_each_heads_nope_and_rope_rows() {
        // 3 heads of [nope 2 | rope 1] rows, 4 columns; value = row * 10 + column.
        let (heads, dn, dr, cols) = (3, 2, 1, 4);
        let w: Vec<f32> = (0..heads * (dn + dr) * cols)
            .map(|i| ((i / cols) * 10 + i % cols) as f32)
            .collect();
        let (nope, pe) = split_heads(&w, heads, dn, dr, cols);
        let rows = |m: &[f32]| m.chunks(cols).map(|r| r[0] as usize / 10).collect::<Vec<_>>();
        assert_eq!(rows(&nope), vec![0, 1, 3, 4, 6, 7]);
        assert_eq!(rows(&pe), vec![2, 5, 8]);
        assert!(nope.chunks(cols).all(|r| (0..cols).all(|c| r[c] as usize % 10 == c)));
    }
}
