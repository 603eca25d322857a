//! `config.json` for the two DSA architectures, parsed with errors that name the field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Result, WorkerError};

/// The supported Hugging Face architectures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// `DeepseekV32ForCausalLM` (`model_type: deepseek_v32`): NeoX-style indexer RoPE.
    DeepseekV32,
    /// `GlmMoeDsaForCausalLM` (`model_type: glm_moe_dsa`): interleaved indexer RoPE.
    GlmMoeDsa,
}

impl Architecture {
    /// The `model_type` string in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::DeepseekV32 => "deepseek_v32",
            Architecture::GlmMoeDsa => "glm_moe_dsa",
        }
    }

    /// The `architectures[0]` string in `config.json`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::DeepseekV32 => "DeepseekV32ForCausalLM",
            Architecture::GlmMoeDsa => "GlmMoeDsaForCausalLM",
        }
    }

    /// Parses a `model_type` value.
    pub fn from_model_type(s: &str) -> Option<Self> {
        match s {
            "deepseek_v32" => Some(Architecture::DeepseekV32),
            "glm_moe_dsa" => Some(Architecture::GlmMoeDsa),
            _ => None,
        }
    }

    /// The lightning indexer's RoPE layout: getting this wrong silently degrades selection.
    pub fn indexer_rope_style(self) -> kernels::RopeStyle {
        match self {
            Architecture::DeepseekV32 => kernels::RopeStyle::NeoX,
            Architecture::GlmMoeDsa => kernels::RopeStyle::Interleaved,
        }
    }
}

/// YaRN parameters (`rope_scaling` / `rope_parameters` with type `yarn`).
#[derive(Clone, Debug, PartialEq)]
pub struct YarnConfig {
    /// Context extension factor.
    pub factor: f64,
    /// Pre-training context length.
    pub original_max_position_embeddings: f64,
    /// Extrapolation boundary (rotations).
    pub beta_fast: f64,
    /// Interpolation boundary (rotations).
    pub beta_slow: f64,
    /// Numerator of the cos/sin scaling.
    pub mscale: Option<f64>,
    /// Denominator of the cos/sin scaling; also scales the softmax (squared).
    pub mscale_all_dim: Option<f64>,
    /// Explicit cos/sin scaling, overriding the mscale ratio.
    pub attention_factor: Option<f64>,
    /// Round the correction range to whole dimensions.
    pub truncate: bool,
}

/// Rotary embedding configuration shared by MLA and the indexer.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base wavelength.
    pub theta: f64,
    /// YaRN scaling, when configured.
    pub yarn: Option<YarnConfig>,
}

/// FP8 block quantization as declared in `quantization_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8BlockConfig {
    /// Block rows.
    pub block_rows: usize,
    /// Block columns.
    pub block_cols: usize,
}

/// The model hyper-parameters the engine needs.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// Which architecture.
    pub arch: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size d.
    pub hidden_size: usize,
    /// Dense MLP intermediate size.
    pub intermediate_size: usize,
    /// Expert intermediate size.
    pub moe_intermediate_size: usize,
    /// Decoder layers (an MTP layer past these is skipped).
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Query low-rank dimension.
    pub q_lora_rank: usize,
    /// Latent KV dimension (c_kv).
    pub kv_lora_rank: usize,
    /// Per-head non-rotary query/key dimension.
    pub qk_nope_head_dim: usize,
    /// Rotary dimension (MLA and indexer).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
    /// Routed experts.
    pub n_routed_experts: usize,
    /// Shared experts (fused into one MLP of `n_shared_experts × moe_intermediate_size`).
    pub n_shared_experts: usize,
    /// Experts per token.
    pub num_experts_per_tok: usize,
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept per token.
    pub topk_group: usize,
    /// Renormalize the chosen experts' weights.
    pub norm_topk_prob: bool,
    /// Scale of the routed output.
    pub routed_scaling_factor: f32,
    /// Per-layer MLP kind: `true` = MoE.
    pub moe_layers: Vec<bool>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Context limit.
    pub max_position_embeddings: usize,
    /// Indexer heads.
    pub index_n_heads: usize,
    /// Indexer head dimension.
    pub index_head_dim: usize,
    /// Keys kept per query row.
    pub index_topk: usize,
    /// Rotary configuration.
    pub rope: RopeConfig,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// FP8 block quantization, when the checkpoint uses it.
    pub fp8: Option<Fp8BlockConfig>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// The raw JSON, for the IndexCache pattern sources.
    pub raw: Map<String, Value>,
    /// Where it was read from.
    pub path: PathBuf,
}

/// Reads fields of a JSON object, turning absence or a wrong type into a named error.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a Path,
    prefix: &'a str,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> WorkerError {
        WorkerError::Config {
            file: self.file.to_path_buf(),
            field: format!("{}{}", self.prefix, field),
            message: message.into(),
        }
    }

    fn get(&self, field: &str) -> Option<&'a Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.usize_opt(field)?
            .ok_or_else(|| self.err(field, "required field is missing"))
    }

    /// A required dimension: must be at least 1.
    fn dim(&self, field: &str) -> Result<usize> {
        let v = self.usize(field)?;
        if v == 0 {
            return Err(self.err(field, "must be at least 1"));
        }
        Ok(v)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn str_opt(&self, field: &str) -> Result<Option<&'a str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| self.err(field, format!("expected token ids, found {v}")))
                })
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(field, format!("expected a token id, found {v}"))),
        }
    }
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|error| WorkerError::Io {
            path: path.clone(),
            error,
        })?;
        Self::from_json_str(&text, &path)
    }

    /// Parses `config.json` text; `path` is used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| WorkerError::Config {
            file: path.to_path_buf(),
            field: "(document)".into(),
            message: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(raw) = value else {
            return Err(WorkerError::Config {
                file: path.to_path_buf(),
                field: "(document)".into(),
                message: "expected a JSON object".into(),
            });
        };
        let f = Fields {
            obj: &raw,
            file: path,
            prefix: "",
        };
        let model_type = f
            .str_opt("model_type")?
            .ok_or_else(|| f.err("model_type", "required field is missing"))?;
        let arch = Architecture::from_model_type(model_type).ok_or_else(|| {
            f.err(
                "model_type",
                format!("unsupported model type {model_type:?}; supported: \"deepseek_v32\", \"glm_moe_dsa\""),
            )
        })?;
        if let Some(act) = f.str_opt("hidden_act")? {
            if act != "silu" {
                return Err(f.err("hidden_act", format!("only \"silu\" is supported, found {act:?}")));
            }
        }
        if f.bool_or("attention_bias", false)? {
            return Err(f.err(
                "attention_bias",
                "attention biases are not supported (DSA checkpoints have none)",
            ));
        }
        let num_hidden_layers = f.dim("num_hidden_layers")?;
        let n_routed_experts = f.dim("n_routed_experts")?;
        let n_group = f.usize_opt("n_group")?.unwrap_or(1).max(1);
        let topk_group = f.usize_opt("topk_group")?.unwrap_or(1).max(1);
        if n_routed_experts % n_group != 0 {
            return Err(f.err(
                "n_group",
                format!("n_routed_experts ({n_routed_experts}) must be divisible by n_group ({n_group})"),
            ));
        }
        if topk_group > n_group {
            return Err(f.err(
                "topk_group",
                format!("must be at most n_group ({n_group}), found {topk_group}"),
            ));
        }
        let num_experts_per_tok = f.dim("num_experts_per_tok")?;
        if num_experts_per_tok > topk_group * (n_routed_experts / n_group) {
            return Err(f.err(
                "num_experts_per_tok",
                format!(
                    "must be at most topk_group × experts per group ({}), found {num_experts_per_tok}",
                    topk_group * (n_routed_experts / n_group)
                ),
            ));
        }
        let first_k_dense = f.usize_opt("first_k_dense_replace")?.unwrap_or(3);
        let moe_layers = match f.get("mlp_layer_types") {
            Some(Value::Array(items)) => {
                if items.len() != num_hidden_layers {
                    return Err(f.err(
                        "mlp_layer_types",
                        format!(
                            "has {} entries, expected num_hidden_layers = {num_hidden_layers}",
                            items.len()
                        ),
                    ));
                }
                items
                    .iter()
                    .map(|v| match v.as_str() {
                        Some("sparse") => Ok(true),
                        Some("dense") => Ok(false),
                        _ => Err(f.err(
                            "mlp_layer_types",
                            format!("entries must be \"dense\" or \"sparse\", found {v}"),
                        )),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            Some(v) => return Err(f.err("mlp_layer_types", format!("expected a list, found {v}"))),
            None => (0..num_hidden_layers).map(|i| i >= first_k_dense).collect(),
        };
        let qk_rope_head_dim = f.dim("qk_rope_head_dim")?;
        if qk_rope_head_dim % 2 != 0 {
            return Err(f.err("qk_rope_head_dim", format!("must be even, found {qk_rope_head_dim}")));
        }
        let index_head_dim = f.dim("index_head_dim")?;
        if index_head_dim < qk_rope_head_dim {
            return Err(f.err(
                "index_head_dim",
                format!("must be at least qk_rope_head_dim ({qk_rope_head_dim}), found {index_head_dim}"),
            ));
        }
        let fp8 = parse_quantization(&f)?;
        let cfg = ModelConfig {
            arch,
            vocab_size: f.dim("vocab_size")?,
            hidden_size: f.dim("hidden_size")?,
            intermediate_size: f.dim("intermediate_size")?,
            moe_intermediate_size: f.dim("moe_intermediate_size")?,
            num_hidden_layers,
            num_attention_heads: f.dim("num_attention_heads")?,
            q_lora_rank: f.dim("q_lora_rank")?,
            kv_lora_rank: f.dim("kv_lora_rank")?,
            qk_nope_head_dim: f.dim("qk_nope_head_dim")?,
            qk_rope_head_dim,
            v_head_dim: f.dim("v_head_dim")?,
            n_routed_experts,
            n_shared_experts: f.usize_opt("n_shared_experts")?.unwrap_or(1),
            num_experts_per_tok,
            n_group,
            topk_group,
            norm_topk_prob: f.bool_or("norm_topk_prob", true)?,
            routed_scaling_factor: f.f64_opt("routed_scaling_factor")?.unwrap_or(1.0) as f32,
            moe_layers,
            rms_norm_eps: f.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_position_embeddings: f.dim("max_position_embeddings")?,
            index_n_heads: f.dim("index_n_heads")?,
            index_head_dim,
            index_topk: f.dim("index_topk")?,
            rope: parse_rope(&f)?,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            fp8,
            bos_token_id: f.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.token_ids("eos_token_id")?,
            raw: raw.clone(),
            path: path.to_path_buf(),
        };
        Ok(cfg)
    }

    /// Query/key head dimension (nope + rope).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// MLA softmax scale: `qk_head_dim^-0.5`, times YaRN's mscale² when `mscale_all_dim` is set.
    pub fn softmax_scale(&self) -> f32 {
        let mut scale = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.rope.yarn {
            if let Some(m) = y.mscale_all_dim.filter(|m| *m != 0.0) {
                let ms = yarn_mscale(y.factor, m);
                scale *= ms * ms;
            }
        }
        scale as f32
    }

    /// A config error attributed to this config file.
    pub fn field_error(&self, field: &str, message: impl Into<String>) -> WorkerError {
        WorkerError::Config {
            file: self.path.clone(),
            field: field.to_string(),
            message: message.into(),
        }
    }
}

/// YaRN's magnitude correction `0.1·m·ln(s) + 1` (1 when s ≤ 1).
pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * m * scale.ln() + 1.0
    }
}

fn parse_rope(f: &Fields<'_>) -> Result<RopeConfig> {
    // Newer configs nest everything in `rope_parameters`; published DeepSeek configs use
    // `rope_scaling` with a top-level `rope_theta`.
    let (key, params) = match (f.get("rope_parameters"), f.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(p)) => ("rope_scaling", Some(p)),
        (None, None) => ("rope_scaling", None),
    };
    let top_theta = f.f64_opt("rope_theta")?;
    let Some(params) = params else {
        return Ok(RopeConfig {
            theta: top_theta.unwrap_or(10000.0),
            yarn: None,
        });
    };
    let Value::Object(obj) = params else {
        return Err(f.err(key, format!("expected an object, found {params}")));
    };
    let prefix = format!("{key}.");
    let p = Fields {
        obj,
        file: f.file,
        prefix: &prefix,
    };
    let theta = p.f64_opt("rope_theta")?.or(top_theta).unwrap_or(10000.0);
    let kind = p.str_opt("rope_type")?.or(p.str_opt("type")?).unwrap_or("default");
    match kind {
        "default" => Ok(RopeConfig { theta, yarn: None }),
        "yarn" => {
            let max_pos = f.usize("max_position_embeddings")? as f64;
            let orig = p.f64_opt("original_max_position_embeddings")?.unwrap_or(max_pos);
            let factor = p.f64_opt("factor")?.unwrap_or(max_pos / orig);
            if factor <= 0.0 {
                return Err(p.err("factor", format!("must be positive, found {factor}")));
            }
            let nonzero = |v: Option<f64>, d: f64| v.filter(|x| *x != 0.0).unwrap_or(d);
            Ok(RopeConfig {
                theta,
                yarn: Some(YarnConfig {
                    factor,
                    original_max_position_embeddings: orig,
                    beta_fast: nonzero(p.f64_opt("beta_fast")?, 32.0),
                    beta_slow: nonzero(p.f64_opt("beta_slow")?, 1.0),
                    mscale: p.f64_opt("mscale")?,
                    mscale_all_dim: p.f64_opt("mscale_all_dim")?,
                    attention_factor: p.f64_opt("attention_factor")?,
                    truncate: p.bool_or("truncate", true)?,
                }),
            })
        }
        other => Err(p.err(
            "rope_type",
            format!("unsupported RoPE type {other:?}; supported: \"default\", \"yarn\""),
        )),
    }
}

fn parse_quantization(f: &Fields<'_>) -> Result<Option<Fp8BlockConfig>> {
    let Some(q) = f.get("quantization_config") else {
        return Ok(None);
    };
    let Value::Object(obj) = q else {
        return Err(f.err("quantization_config", format!("expected an object, found {q}")));
    };
    let p = Fields {
        obj,
        file: f.file,
        prefix: "quantization_config.",
    };
    let method = p.str_opt("quant_method")?.unwrap_or("");
    if method != "fp8" {
        return Err(p.err(
            "quant_method",
            format!("only \"fp8\" block quantization is supported, found {method:?}"),
        ));
    }
    if let Some(fmt) = p.str_opt("fmt")? {
        if fmt != "e4m3" {
            return Err(p.err("fmt", format!("only \"e4m3\" is supported, found {fmt:?}")));
        }
    }
    let block = match p.get("weight_block_size") {
        Some(Value::Array(v)) if v.len() == 2 && v.iter().all(|x| x.as_u64().is_some_and(|n| n > 0)) => {
            Fp8BlockConfig {
                block_rows: v[0].as_u64().unwrap_or(128) as usize,
                block_cols: v[1].as_u64().unwrap_or(128) as usize,
            }
        }
        None => Fp8BlockConfig {
            block_rows: 128,
            block_cols: 128,
        },
        Some(v) => {
            return Err(p.err(
                "weight_block_size",
                format!("expected [rows, cols] of positive integers, found {v}"),
            ))
        }
    };
    Ok(Some(block))
}
