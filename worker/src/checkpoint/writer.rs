//! Writes safetensors files (used for the embedded default model and by tests).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::Dtype;
use crate::error::{Result, WorkerError};

/// One tensor to write.
#[derive(Clone, Debug)]
pub struct TensorData {
    /// Element type of `bytes`.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian raw data.
    pub bytes: Vec<u8>,
}

impl TensorData {
    /// An f32 tensor.
    pub fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        TensorData {
            dtype: Dtype::F32,
            shape,
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Writes one safetensors file with tensors in name order.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, TensorData>) -> Result<()> {
    let mut header = Map::new();
    let mut offset = 0usize;
    for (name, t) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut head = serde_json::to_vec(&Value::Object(header)).unwrap_or_default();
    // Pad the header so the data segment is 8-byte aligned, as the reference writer does.
    while !(8 + head.len()).is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + offset);
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    for t in tensors.values() {
        out.extend_from_slice(&t.bytes);
    }
    std::fs::write(path, out).map_err(|error| WorkerError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Writes `tensors` into `shards` files plus `model.safetensors.index.json` (or a single
/// `model.safetensors` when `shards` is 1).
pub fn write_checkpoint(dir: &Path, tensors: BTreeMap<String, TensorData>, shards: usize) -> Result<()> {
    if shards <= 1 {
        return write_safetensors(&dir.join("model.safetensors"), &tensors);
    }
    let names: Vec<String> = tensors.keys().cloned().collect();
    let per = names.len().div_ceil(shards);
    let mut weight_map = Map::new();
    let mut tensors = tensors;
    for (s, chunk) in names.chunks(per.max(1)).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", s + 1, shards);
        let part: BTreeMap<String, TensorData> = chunk
            .iter()
            .filter_map(|n| tensors.remove(n).map(|t| (n.clone(), t)))
            .collect();
        for n in part.keys() {
            weight_map.insert(n.clone(), Value::String(file.clone()));
        }
        write_safetensors(&dir.join(&file), &part)?;
    }
    let index = json!({"metadata": {}, "weight_map": weight_map});
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&index).unwrap_or_default())
        .map_err(|error| WorkerError::Io { path, error })
}
