//! The embedded default model: a small deterministic checkpoint of either architecture in the
//! published format (config.json, safetensors, byte-level tokenizer.json), written on demand.
//! The demo, the tests and the benchmarks use it; [`SyntheticSpec`] also sizes larger ones.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::checkpoint::writer::{write_checkpoint, TensorData};
use crate::config::Architecture;
use crate::error::{Result, WorkerError};
use crate::sampling::Rng;

/// Shape of a synthetic checkpoint.
#[derive(Clone, Debug)]
pub struct SyntheticSpec {
    /// Architecture.
    pub arch: Architecture,
    /// Vocabulary (at least 258: 256 bytes + BOS + EOS).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// q_lora_rank.
    pub q_lora_rank: usize,
    /// kv_lora_rank.
    pub kv_lora_rank: usize,
    /// qk_nope_head_dim.
    pub nope_dim: usize,
    /// qk_rope_head_dim.
    pub rope_dim: usize,
    /// v_head_dim.
    pub v_dim: usize,
    /// Dense MLP width.
    pub intermediate_size: usize,
    /// Expert width.
    pub moe_intermediate_size: usize,
    /// Routed experts.
    pub experts: usize,
    /// Experts per token.
    pub experts_per_tok: usize,
    /// Expert groups.
    pub n_group: usize,
    /// Groups kept.
    pub topk_group: usize,
    /// Leading dense layers.
    pub first_k_dense: usize,
    /// Indexer heads.
    pub index_heads: usize,
    /// Indexer head dim.
    pub index_dim: usize,
    /// Keys kept per row.
    pub index_topk: usize,
    /// Context limit.
    pub max_positions: usize,
    /// IndexCache pattern written as `indexer_types` (None: all Full, no key).
    pub pattern: Option<String>,
    /// Seed of the weights.
    pub seed: u64,
}

impl SyntheticSpec {
    /// The embedded default model of `arch`: small enough to load instantly.
    pub fn default_for(arch: Architecture) -> Self {
        SyntheticSpec {
            arch,
            vocab_size: 512,
            hidden_size: 128,
            layers: 6,
            heads: 4,
            q_lora_rank: 64,
            kv_lora_rank: 64,
            nope_dim: 32,
            rope_dim: 16,
            v_dim: 32,
            intermediate_size: 256,
            moe_intermediate_size: 64,
            experts: 8,
            experts_per_tok: 2,
            n_group: 2,
            topk_group: 1,
            first_k_dense: 1,
            index_heads: 4,
            index_dim: 32,
            index_topk: 64,
            max_positions: 8192,
            pattern: Some("FSSFSS".into()),
            seed: 20261128,
        }
    }
}

/// Where the embedded default model of `arch` lives once written.
pub fn default_model_dir(arch: Architecture) -> PathBuf {
    std::env::temp_dir().join(format!("indexrelay-default-{}-v1", arch.model_type()))
}

/// Writes the embedded default model (once) and returns its directory.
pub fn ensure_default_model(arch: Architecture) -> Result<PathBuf> {
    let dir = default_model_dir(arch);
    if !dir.join("config.json").exists() {
        // Write to a sibling and rename, so a crash never leaves a half-written model behind.
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        write_synthetic_model(&tmp, &SyntheticSpec::default_for(arch))?;
        if std::fs::rename(&tmp, &dir).is_err() {
            // Another process won the race; its copy is identical.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
    Ok(dir)
}

struct Gen {
    rng: Rng,
    tensors: BTreeMap<String, TensorData>,
}

impl Gen {
    fn normal(&mut self) -> f32 {
        // Box–Muller: deterministic given the seed.
        let u1 = self.rng.next_f64().max(1e-12);
        let u2 = self.rng.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn add(&mut self, name: String, shape: Vec<usize>, std: f32, mean: f32) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| mean + std * self.normal()).collect();
        self.tensors.insert(name, TensorData::f32(shape, &data));
    }

    fn linear(&mut self, name: String, out: usize, inp: usize) {
        self.add(format!("{name}.weight"), vec![out, inp], 1.0 / (inp as f32).sqrt(), 0.0);
    }

    fn norm(&mut self, name: String, len: usize) {
        self.add(name, vec![len], 0.1, 1.0);
    }

    fn mlp(&mut self, p: &str, d: usize, inter: usize) {
        self.linear(format!("{p}.gate_proj"), inter, d);
        self.linear(format!("{p}.up_proj"), inter, d);
        self.linear(format!("{p}.down_proj"), d, inter);
    }
}

/// Writes a deterministic random checkpoint with `spec`'s shape into `dir`.
pub fn write_synthetic_model(dir: &Path, spec: &SyntheticSpec) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|error| WorkerError::Io {
        path: dir.to_path_buf(),
        error,
    })?;
    let s = spec;
    let d = s.hidden_size;
    let pattern: Vec<bool> = match &s.pattern {
        Some(p) => p.chars().map(|c| c == 'F').collect(),
        None => vec![true; s.layers],
    };
    let mut g = Gen {
        rng: Rng::new(s.seed),
        tensors: BTreeMap::new(),
    };
    g.add("model.embed_tokens.weight".into(), vec![s.vocab_size, d], 1.0, 0.0);
    for i in 0..s.layers {
        let p = format!("model.layers.{i}");
        g.norm(format!("{p}.input_layernorm.weight"), d);
        g.norm(format!("{p}.post_attention_layernorm.weight"), d);
        let a = format!("{p}.self_attn");
        g.linear(format!("{a}.q_a_proj"), s.q_lora_rank, d);
        g.norm(format!("{a}.q_a_layernorm.weight"), s.q_lora_rank);
        g.linear(
            format!("{a}.q_b_proj"),
            s.heads * (s.nope_dim + s.rope_dim),
            s.q_lora_rank,
        );
        g.linear(format!("{a}.kv_a_proj_with_mqa"), s.kv_lora_rank + s.rope_dim, d);
        g.norm(format!("{a}.kv_a_layernorm.weight"), s.kv_lora_rank);
        g.linear(
            format!("{a}.kv_b_proj"),
            s.heads * (s.nope_dim + s.v_dim),
            s.kv_lora_rank,
        );
        g.linear(format!("{a}.o_proj"), d, s.heads * s.v_dim);
        if pattern.get(i).copied().unwrap_or(true) {
            g.linear(format!("{a}.indexer.wq_b"), s.index_heads * s.index_dim, s.q_lora_rank);
            g.linear(format!("{a}.indexer.wk"), s.index_dim, d);
            g.norm(format!("{a}.indexer.k_norm.weight"), s.index_dim);
            g.add(format!("{a}.indexer.k_norm.bias"), vec![s.index_dim], 0.1, 0.0);
            g.linear(format!("{a}.indexer.weights_proj"), s.index_heads, d);
        }
        if i < s.first_k_dense {
            g.mlp(&format!("{p}.mlp"), d, s.intermediate_size);
        } else {
            g.linear(format!("{p}.mlp.gate"), s.experts, d);
            g.add(
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![s.experts],
                0.05,
                0.0,
            );
            for j in 0..s.experts {
                g.mlp(&format!("{p}.mlp.experts.{j}"), d, s.moe_intermediate_size);
            }
            g.mlp(&format!("{p}.mlp.shared_experts"), d, s.moe_intermediate_size);
        }
    }
    g.norm("model.norm.weight".into(), d);
    g.linear("lm_head".into(), s.vocab_size, d);
    write_checkpoint(dir, g.tensors, 1)?;

    let mut cfg = json!({
        "architectures": [s.arch.hf_class()],
        "model_type": s.arch.model_type(),
        "vocab_size": s.vocab_size,
        "hidden_size": d,
        "intermediate_size": s.intermediate_size,
        "moe_intermediate_size": s.moe_intermediate_size,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.heads,
        "q_lora_rank": s.q_lora_rank,
        "kv_lora_rank": s.kv_lora_rank,
        "qk_nope_head_dim": s.nope_dim,
        "qk_rope_head_dim": s.rope_dim,
        "v_head_dim": s.v_dim,
        "n_routed_experts": s.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": s.experts_per_tok,
        "n_group": s.n_group,
        "topk_group": s.topk_group,
        "norm_topk_prob": true,
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": s.first_k_dense,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": s.max_positions,
        "rope_theta": 10000.0,
        "index_n_heads": s.index_heads,
        "index_head_dim": s.index_dim,
        "index_topk": s.index_topk,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    });
    if let (Some(p), Value::Object(obj)) = (&s.pattern, &mut cfg) {
        let types: Vec<Value> = p
            .chars()
            .map(|c| Value::String(if c == 'F' { "full" } else { "shared" }.into()))
            .collect();
        obj.insert("indexer_types".into(), Value::Array(types));
    }
    write_json(&dir.join("config.json"), &cfg)?;
    write_json(&dir.join("tokenizer.json"), &byte_level_tokenizer(s.vocab_size))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap_or_default()).map_err(|error| WorkerError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// GPT-2's reversible byte → printable-char map used by byte-level BPE.
fn byte_to_char() -> Vec<char> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    map
}

/// A byte-level BPE tokenizer: ids 0–255 are bytes, 256 BOS, 257 EOS; the rest of the
/// vocabulary is unused padding (the model still scores it).
fn byte_level_tokenizer(vocab_size: usize) -> Value {
    let mut vocab = Map::new();
    for (b, c) in byte_to_char().into_iter().enumerate() {
        vocab.insert(c.to_string(), json!(b));
    }
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let mut added = vec![special(256, "<bos>"), special(257, "<eos>")];
    for id in 258..vocab_size {
        added.push(special(id, &format!("<reserved_{id}>")));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [256], "tokens": ["<bos>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}
