//! Bad checkpoints and bad requests give clear errors naming the file, field or tensor, and
//! nothing panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use worker::checkpoint::writer::{write_checkpoint, TensorData};
use worker::checkpoint::Checkpoint;
use worker::{Engine, EngineOptions, GenerationRequest, Model, SamplingParams};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(name)
}

/// A writable copy of a fixture checkpoint whose tensors pass through `edit` first.
fn copy_fixture(name: &str, edit: impl FnOnce(&mut BTreeMap<String, TensorData>)) -> tempfile::TempDir {
    let src = fixture(name);
    let ckpt = Checkpoint::open(&src).unwrap();
    let mut tensors = BTreeMap::new();
    for n in ckpt.names().map(str::to_string).collect::<Vec<_>>() {
        let shape = ckpt.shape(&n).unwrap().to_vec();
        let data = ckpt.read_f32(&n, &shape, None).unwrap();
        tensors.insert(n, TensorData::f32(shape, &data));
    }
    edit(&mut tensors);
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), tensors, 1).unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path, pattern: Option<&str>) -> String {
    match Model::load(dir, pattern) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_and_malformed_config() {
    let dir = tempfile::tempdir().unwrap();
    let e = load_err(dir.path(), None);
    assert!(e.contains("config.json"), "{e}");
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = load_err(dir.path(), None);
    assert!(e.contains("config.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn unknown_model_type_and_missing_field_are_named() {
    let dir = copy_fixture("glm_pattern", |_| {});
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "llama".into());
    });
    let e = load_err(dir.path(), None);
    assert!(
        e.contains("model_type") && e.contains("llama") && e.contains("deepseek_v32"),
        "{e}"
    );
    edit_config(dir.path(), |c| {
        c.insert("model_type".into(), "glm_moe_dsa".into());
        c.remove("hidden_size");
    });
    let e = load_err(dir.path(), None);
    assert!(e.contains("hidden_size") && e.contains("missing"), "{e}");
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), "sixty-four".into());
    });
    let e = load_err(dir.path(), None);
    assert!(e.contains("hidden_size") && e.contains("integer"), "{e}");
}

#[test]
fn missing_tensor_is_named() {
    let name = "model.layers.3.self_attn.o_proj.weight";
    let dir = copy_fixture("glm_pattern", |t| {
        t.remove(name);
    });
    let e = load_err(dir.path(), None);
    assert!(e.contains("missing tensor") && e.contains(name), "{e}");
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    let dir = copy_fixture("glm_pattern", |t| {
        let old = t.remove(name).unwrap();
        let (a, b) = (old.shape[0], old.shape[1]);
        t.insert(
            name.into(),
            TensorData {
                shape: vec![b, a],
                ..old
            },
        );
    });
    let e = load_err(dir.path(), None);
    assert!(
        e.contains(name) && e.contains("expected shape") && e.contains("found"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_fixture("glm_pattern", |_| {});
    let f = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir.path(), None);
    assert!(e.contains("model.safetensors") && e.contains("data_offsets"), "{e}");
    std::fs::write(&f, [1u8, 2, 3]).unwrap();
    let e = load_err(dir.path(), None);
    assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
}

#[test]
fn invalid_patterns_are_rejected() {
    let dir = fixture("glm_pattern"); // FFSFSF; layers 2 and 4 ship no indexer
    let e = load_err(&dir, Some("FFS"));
    assert!(e.contains("3 entries") && e.contains("num_hidden_layers = 6"), "{e}");
    let e = load_err(&dir, Some("SFFFFF"));
    assert!(e.contains("layer 0 must be F"), "{e}");
    let e = load_err(&dir, Some("FFFFSF"));
    assert!(
        e.contains("layer 2") && e.contains("self_attn.indexer.wq_b.weight"),
        "{e}"
    );
    let e = load_err(&dir, Some("FFSFSQ"));
    assert!(e.contains("character 5"), "{e}");
}

fn request(prompt: Vec<u32>, n: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        prompt_logprobs: false,
        ignore_eos: false,
    }
}

#[test]
fn bad_requests_are_refused_before_any_work() {
    let model = Model::load(&fixture("glm_pattern"), None).unwrap();
    let mut e = Engine::new(model, EngineOptions::default()).unwrap();
    let err = e.generate(vec![request(vec![1, 2, 320], 4)]).unwrap_err().to_string();
    assert!(
        err.contains("prompt_ids") && err.contains("320") && err.contains("vocab_size = 320"),
        "{err}"
    );
    let err = e.generate(vec![request(vec![1; 510], 8)]).unwrap_err().to_string();
    assert!(
        err.contains("max_position_embeddings") && err.contains("512") && err.contains("518"),
        "{err}"
    );
    let err = e.generate(vec![request(vec![1; 513], 1)]).unwrap_err().to_string();
    assert!(
        err.contains("prompt_ids") && err.contains("513 tokens") && err.contains("512"),
        "{err}"
    );
    let err = e.generate(vec![request(vec![], 8)]).unwrap_err().to_string();
    assert!(err.contains("prompt"), "{err}");
    let mut r = request(vec![1, 2], 2);
    r.sampling.top_p = 0.0;
    let err = e.generate(vec![r]).unwrap_err().to_string();
    assert!(err.contains("top_p") && err.contains("(0, 1]"), "{err}");
    // Nothing leaked: a good request still runs and every block is back in the pool.
    e.generate(vec![request(vec![1, 2, 3], 2)]).unwrap();
    assert_eq!(e.cache().used_blocks(), 0);
}

#[test]
fn full_cache_is_an_error_not_a_panic() {
    let model = Model::load(&fixture("glm_pattern"), None).unwrap();
    let opts = EngineOptions {
        block_size: 4,
        cache_blocks: 3,
        ..EngineOptions::default()
    };
    let mut e = Engine::new(model, opts).unwrap();
    let err = e.generate(vec![request(vec![1; 40], 2)]).unwrap_err().to_string();
    assert!(err.contains("KV cache full"), "{err}");
    assert_eq!(e.cache().used_blocks(), 0);
}

#[test]
fn fused_expert_tensors_load_like_per_expert_ones() {
    // HF keeps experts fused in memory (`experts.gate_up_proj` [E, 2I, H], `down_proj`
    // [E, H, I]); a checkpoint saved that way must give the same model.
    let cfg = worker::ModelConfig::from_dir(&fixture("glm_pattern")).unwrap();
    let (e, i, d) = (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size);
    let dir = copy_fixture("glm_pattern", |t| {
        for layer in 1..cfg.num_hidden_layers {
            let p = format!("model.layers.{layer}.mlp.experts");
            let mut gate_up = Vec::new();
            let mut down = Vec::new();
            for j in 0..e {
                for part in ["gate_proj", "up_proj"] {
                    gate_up.extend(t.remove(&format!("{p}.{j}.{part}.weight")).unwrap().bytes);
                }
                down.extend(t.remove(&format!("{p}.{j}.down_proj.weight")).unwrap().bytes);
            }
            let f32s = |b: Vec<u8>| -> Vec<f32> {
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            };
            t.insert(
                format!("{p}.gate_up_proj"),
                TensorData::f32(vec![e, 2 * i, d], &f32s(gate_up)),
            );
            t.insert(format!("{p}.down_proj"), TensorData::f32(vec![e, d, i], &f32s(down)));
        }
    });
    let run = |dir: &Path| {
        let mut eng = Engine::new(Model::load(dir, None).unwrap(), EngineOptions::default()).unwrap();
        eng.generate(vec![request((1..30).collect(), 6)])
            .unwrap()
            .remove(0)
            .token_ids
    };
    assert_eq!(run(dir.path()), run(&fixture("glm_pattern")));
}
