//! Per-layer weight structs and their loading from a checkpoint, layer range by layer range.

use std::ops::Deref;
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::Result;

/// A bias-free linear layer `y = x · Wᵀ` with `W` stored `[out, in]` as f32.
#[derive(Clone, Debug)]
pub struct Linear {
    /// Row-major `[out, in]`.
    pub w: Vec<f32>,
    /// Output features.
    pub out: usize,
    /// Input features.
    pub inp: usize,
}

impl Linear {
    /// Applies the layer to `rows` input rows.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * self.out];
        if rows > 0 {
            kernels::matmul_t(x, &self.w, &mut y, rows, self.inp, self.out);
        }
        y
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.w.len() * 4
    }
}

/// Reads tensors of one checkpoint with the config's FP8 settings.
pub struct Loader<'a> {
    /// The checkpoint.
    pub ckpt: &'a Checkpoint,
    /// The model config.
    pub cfg: &'a ModelConfig,
}

impl Loader<'_> {
    /// A tensor of the given shape as f32.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.ckpt.read_f32(name, shape, self.cfg.fp8)
    }

    /// `{name}.weight` as a `[out, in]` linear layer.
    pub fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            w: self.tensor(&format!("{name}.weight"), &[out, inp])?,
            out,
            inp,
        })
    }

    /// A norm's `{name}.weight` vector.
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        self.tensor(name, &[len])
    }
}

/// The lightning indexer of a Full layer.
#[derive(Clone, Debug)]
pub struct IndexerWeights {
    /// `wq_b`: q_lora_rank → index_n_heads × index_head_dim.
    pub wq_b: Linear,
    /// `wk`: hidden → index_head_dim.
    pub wk: Linear,
    /// `k_norm` LayerNorm weight.
    pub k_norm_w: Vec<f32>,
    /// `k_norm` LayerNorm bias.
    pub k_norm_b: Vec<f32>,
    /// `weights_proj`: hidden → index_n_heads.
    pub weights_proj: Linear,
}

impl IndexerWeights {
    /// Loads the indexer under prefix `p` (`model.layers.{i}.self_attn.indexer`).
    pub fn load(l: &Loader<'_>, p: &str) -> Result<Self> {
        let c = l.cfg;
        let (h, d) = (c.index_n_heads, c.index_head_dim);
        Ok(IndexerWeights {
            wq_b: l.linear(&format!("{p}.wq_b"), h * d, c.q_lora_rank)?,
            wk: l.linear(&format!("{p}.wk"), d, c.hidden_size)?,
            k_norm_w: l.vector(&format!("{p}.k_norm.weight"), d)?,
            k_norm_b: l.vector(&format!("{p}.k_norm.bias"), d)?,
            weights_proj: l.linear(&format!("{p}.weights_proj"), h, c.hidden_size)?,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.wq_b.bytes() + self.wk.bytes() + self.weights_proj.bytes() + 8 * self.k_norm_w.len()
    }
}

/// MLA attention weights of one layer as one forward pass sees them: the projections
/// (shared, cheap to clone) and, when this view runs the layer as Full, its indexer.
///
/// A layer can be Full for some sequences and Shared for others (each request carries its
/// IndexCache pattern), so the model builds a Full and a Shared view of the same
/// projections per batch; both deref to [`AttentionCore`].
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    /// The projections.
    pub core: Arc<AttentionCore>,
    /// The indexer, when this view runs the layer as Full.
    pub indexer: Option<Arc<IndexerWeights>>,
}

impl Deref for AttentionWeights {
    type Target = AttentionCore;

    fn deref(&self) -> &AttentionCore {
        &self.core
    }
}

impl AttentionWeights {
    /// The same projections with `indexer` (Some = Full view, None = Shared view).
    pub fn view(&self, indexer: Option<Arc<IndexerWeights>>) -> Self {
        AttentionWeights {
            core: self.core.clone(),
            indexer,
        }
    }
}

/// MLA attention projections, with `kv_b_proj` split per head for the absorbed form.
#[derive(Clone, Debug)]
pub struct AttentionCore {
    /// `q_a_proj`.
    pub q_a: Linear,
    /// `q_a_layernorm` weight.
    pub q_a_norm: Vec<f32>,
    /// `q_b_proj`.
    pub q_b: Linear,
    /// `kv_a_proj_with_mqa`.
    pub kv_a: Linear,
    /// `kv_a_layernorm` weight.
    pub kv_a_norm: Vec<f32>,
    /// Per head, the key half of `kv_b_proj` transposed: `[kv_lora_rank, qk_nope_head_dim]`,
    /// so `q_nope · W_ukᵀᵀ` maps a query into latent space with one `matmul_t`.
    pub w_uk_t: Vec<Vec<f32>>,
    /// `kv_b_proj` whole, `[heads · (qk_nope_head_dim + v_head_dim), kv_lora_rank]`: the
    /// expanded prefill form multiplies keys through it; each head's value rows are `w_uv`.
    pub kv_b: Vec<f32>,
    /// `o_proj`.
    pub o: Linear,
}

impl AttentionCore {
    /// Head `head`'s value half of `kv_b_proj`: `[v_head_dim, kv_lora_rank]`.
    pub fn w_uv(&self, head: usize, nope_dim: usize, v_dim: usize) -> &[f32] {
        let r = self.kv_b.len() / (self.w_uk_t.len() * (nope_dim + v_dim)).max(1);
        &self.kv_b[(head * (nope_dim + v_dim) + nope_dim) * r..][..v_dim * r]
    }
}

impl AttentionWeights {
    fn load(l: &Loader<'_>, p: &str, with_indexer: bool) -> Result<Self> {
        let c = l.cfg;
        let (h, r, dn, dv) = (c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim, c.v_head_dim);
        let kv_b = l.tensor(&format!("{p}.kv_b_proj.weight"), &[h * (dn + dv), r])?;
        let mut w_uk_t = Vec::with_capacity(h);
        for head in 0..h {
            let base = head * (dn + dv) * r;
            let uk = &kv_b[base..base + dn * r];
            let mut t = vec![0.0; r * dn];
            for i in 0..dn {
                for j in 0..r {
                    t[j * dn + i] = uk[i * r + j];
                }
            }
            w_uk_t.push(t);
        }
        let core = AttentionCore {
            q_a: l.linear(&format!("{p}.q_a_proj"), c.q_lora_rank, c.hidden_size)?,
            q_a_norm: l.vector(&format!("{p}.q_a_layernorm.weight"), c.q_lora_rank)?,
            q_b: l.linear(&format!("{p}.q_b_proj"), h * c.qk_head_dim(), c.q_lora_rank)?,
            kv_a: l.linear(
                &format!("{p}.kv_a_proj_with_mqa"),
                r + c.qk_rope_head_dim,
                c.hidden_size,
            )?,
            kv_a_norm: l.vector(&format!("{p}.kv_a_layernorm.weight"), r)?,
            w_uk_t,
            kv_b,
            o: l.linear(&format!("{p}.o_proj"), c.hidden_size, h * dv)?,
        };
        Ok(AttentionWeights {
            core: Arc::new(core),
            indexer: if with_indexer {
                Some(Arc::new(IndexerWeights::load(l, &format!("{p}.indexer"))?))
            } else {
                None
            },
        })
    }
}

/// A SwiGLU MLP with gate and up fused into one `[2·inter, hidden]` matrix (gate rows first).
#[derive(Clone, Debug)]
pub struct SwiGlu {
    /// Fused gate and up projections.
    pub gate_up: Linear,
    /// Down projection.
    pub down: Linear,
}

impl SwiGlu {
    fn load(l: &Loader<'_>, p: &str, inter: usize) -> Result<Self> {
        let d = l.cfg.hidden_size;
        let mut gate_up = l.linear(&format!("{p}.gate_proj"), inter, d)?;
        let up = l.linear(&format!("{p}.up_proj"), inter, d)?;
        gate_up.w.extend_from_slice(&up.w);
        gate_up.out = 2 * inter;
        Ok(SwiGlu {
            gate_up,
            down: l.linear(&format!("{p}.down_proj"), d, inter)?,
        })
    }

    /// Experts stored fused, as HF holds them in memory: `gate_up_proj` `[E, 2·inter, hidden]`
    /// (gate rows first) and `down_proj` `[E, hidden, inter]`.
    fn load_fused_experts(l: &Loader<'_>, p: &str, experts: usize, inter: usize) -> Result<Vec<Self>> {
        let d = l.cfg.hidden_size;
        let gate_up = l.tensor(&format!("{p}.gate_up_proj"), &[experts, 2 * inter, d])?;
        let down = l.tensor(&format!("{p}.down_proj"), &[experts, d, inter])?;
        Ok((0..experts)
            .map(|j| SwiGlu {
                gate_up: Linear {
                    w: gate_up[j * 2 * inter * d..(j + 1) * 2 * inter * d].to_vec(),
                    out: 2 * inter,
                    inp: d,
                },
                down: Linear {
                    w: down[j * d * inter..(j + 1) * d * inter].to_vec(),
                    out: d,
                    inp: inter,
                },
            })
            .collect())
    }

    /// `down(silu(gate(x)) · up(x))` for `rows` rows.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let inter = self.down.inp;
        let gu = self.gate_up.forward(x, rows);
        let mut act = vec![0.0; rows * inter];
        act.par_chunks_exact_mut(inter)
            .zip(gu.par_chunks_exact(2 * inter))
            .for_each(|(out, row)| {
                out.copy_from_slice(&row[..inter]);
                kernels::silu_mul(out, &row[inter..]);
            });
        self.down.forward(&act, rows)
    }
}

/// Routed experts with group-limited sigmoid routing, plus the shared experts.
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// Router `mlp.gate.weight`: `[n_routed_experts, hidden]`.
    pub router: Vec<f32>,
    /// `e_score_correction_bias`: steers the choice, never the weights.
    pub bias: Vec<f32>,
    /// Routed experts.
    pub experts: Vec<SwiGlu>,
    /// Shared experts (one fused MLP), when `n_shared_experts > 0`.
    pub shared: Option<SwiGlu>,
}

/// A layer's MLP.
#[derive(Clone, Debug)]
pub enum Mlp {
    /// Dense SwiGLU.
    Dense(SwiGlu),
    /// Mixture of experts.
    Moe(MoeWeights),
}

/// One decoder layer.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `input_layernorm`.
    pub input_norm: Vec<f32>,
    /// Attention (and indexer).
    pub attn: AttentionWeights,
    /// `post_attention_layernorm`.
    pub post_norm: Vec<f32>,
    /// MLP.
    pub mlp: Mlp,
}

impl LayerWeights {
    /// Loads layer `i`; the indexer only when `with_indexer` (a Full layer).
    pub fn load(l: &Loader<'_>, i: usize, with_indexer: bool) -> Result<Self> {
        let c = l.cfg;
        let p = format!("model.layers.{i}");
        let mlp = if c.moe_layers[i] {
            let e = c.n_routed_experts;
            let fused = format!("{p}.mlp.experts.gate_up_proj");
            let experts = if !l.ckpt.has(&format!("{p}.mlp.experts.0.gate_proj.weight")) && l.ckpt.has(&fused) {
                SwiGlu::load_fused_experts(l, &format!("{p}.mlp.experts"), e, c.moe_intermediate_size)?
            } else {
                (0..e)
                    .map(|j| SwiGlu::load(l, &format!("{p}.mlp.experts.{j}"), c.moe_intermediate_size))
                    .collect::<Result<Vec<_>>>()?
            };
            let shared = if c.n_shared_experts > 0 {
                Some(SwiGlu::load(
                    l,
                    &format!("{p}.mlp.shared_experts"),
                    c.moe_intermediate_size * c.n_shared_experts,
                )?)
            } else {
                None
            };
            Mlp::Moe(MoeWeights {
                router: l.tensor(&format!("{p}.mlp.gate.weight"), &[e, c.hidden_size])?,
                bias: l.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), e)?,
                experts,
                shared,
            })
        } else {
            Mlp::Dense(SwiGlu::load(l, &format!("{p}.mlp"), c.intermediate_size)?)
        };
        Ok(LayerWeights {
            input_norm: l.vector(&format!("{p}.input_layernorm.weight"), c.hidden_size)?,
            attn: AttentionWeights::load(l, &format!("{p}.self_attn"), with_indexer)?,
            post_norm: l.vector(&format!("{p}.post_attention_layernorm.weight"), c.hidden_size)?,
            mlp,
        })
    }
}
