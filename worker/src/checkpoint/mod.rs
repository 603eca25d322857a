//! Safetensors checkpoints: single-file or sharded (`model.safetensors.index.json`),
//! memory-mapped, read tensor by tensor so a worker touches only its own layers.

mod dtype;
pub mod writer;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

pub use dtype::{decode_f32, e4m3_to_f32, Dtype};

use crate::config::Fp8BlockConfig;
use crate::error::{Result, WorkerError};

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// An opened checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WorkerError + '_ {
    move |error| WorkerError::Io {
        path: path.to_path_buf(),
        error,
    }
}

impl Checkpoint {
    /// Opens every safetensors file of `dir` (the index's shards, else `model.safetensors`,
    /// else all `*.safetensors`) and reads their headers.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| WorkerError::Checkpoint {
                file: index.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| WorkerError::Checkpoint {
                    file: index.clone(),
                    message: "field `weight_map` is missing or not an object".into(),
                })?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
            files.sort();
            files.dedup();
            files
        } else if dir.join("model.safetensors").exists() {
            vec!["model.safetensors".to_string()]
        } else {
            let mut files: Vec<String> = std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect();
            files.sort();
            files
        };
        if names.is_empty() {
            return Err(WorkerError::Checkpoint {
                file: dir.to_path_buf(),
                message: "no *.safetensors files found".into(),
            });
        }
        let mut ckpt = Checkpoint {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        for name in names {
            let path = dir.join(&name);
            let file = File::open(&path).map_err(io_err(&path))?;
            // SAFETY: the checkpoint is treated as immutable while the model is loaded; a
            // concurrent writer would be an operator error, as with every mmap-based loader.
            let map = unsafe { Mmap::map(&file) }.map_err(io_err(&path))?;
            let idx = ckpt.files.len();
            for (tname, entry) in parse_header(&path, &map, idx)? {
                ckpt.tensors.insert(tname, entry);
            }
            ckpt.files.push((path, map));
        }
        Ok(ckpt)
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor exists.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor name (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The stored shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.entry(name)?.shape)
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| WorkerError::MissingTensor {
            dir: self.dir.clone(),
            name: name.to_string(),
        })
    }

    fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.files[e.file].1[e.start..e.end]
    }

    /// Reads a tensor as f32, checking its shape; FP8 weights are dequantized with their
    /// `weight_scale_inv` blocks.
    pub fn read_f32(&self, name: &str, shape: &[usize], fp8: Option<Fp8BlockConfig>) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(WorkerError::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        let mut out = decode_f32(e.dtype, self.bytes(e));
        if e.dtype == Dtype::F8E4M3 {
            self.apply_block_scales(name, shape, fp8, &mut out)?;
        }
        Ok(out)
    }

    fn apply_block_scales(
        &self,
        name: &str,
        shape: &[usize],
        fp8: Option<Fp8BlockConfig>,
        w: &mut [f32],
    ) -> Result<()> {
        let file = self.files[self.entry(name)?.file].0.clone();
        let block = fp8.ok_or_else(|| WorkerError::Checkpoint {
            file: file.clone(),
            message: format!("tensor `{name}` is F8_E4M3 but config.json has no fp8 `quantization_config`"),
        })?;
        if shape.len() != 2 {
            return Err(WorkerError::Checkpoint {
                file,
                message: format!("FP8 tensor `{name}` must be 2-D, found shape {shape:?}"),
            });
        }
        let scale_name = match name.strip_suffix(".weight") {
            Some(prefix) => format!("{prefix}.weight_scale_inv"),
            None => format!("{name}_scale_inv"),
        };
        let (rows, cols) = (shape[0], shape[1]);
        let (sr, sc) = (rows.div_ceil(block.block_rows), cols.div_ceil(block.block_cols));
        let scales = self.read_f32(&scale_name, &[sr, sc], None)?;
        for i in 0..rows {
            let srow = &scales[(i / block.block_rows) * sc..][..sc];
            for (j, v) in w[i * cols..(i + 1) * cols].iter_mut().enumerate() {
                *v *= srow[j / block.block_cols];
            }
        }
        Ok(())
    }
}

fn parse_header(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, TensorEntry)>> {
    let bad = |message: String| WorkerError::Checkpoint {
        file: path.to_path_buf(),
        message,
    };
    if map.len() < 8 {
        return Err(bad("file is shorter than the 8-byte safetensors header length".into()));
    }
    let n = u64::from_le_bytes(map[..8].try_into().unwrap_or([0; 8])) as usize;
    let data_start = 8usize
        .checked_add(n)
        .filter(|end| *end <= map.len())
        .ok_or_else(|| bad(format!("header length {n} exceeds the file size {}", map.len())))?;
    let header: Value = serde_json::from_slice(&map[8..data_start])
        .map_err(|e| bad(format!("safetensors header is not valid JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| bad("safetensors header is not a JSON object".into()))?;
    let data_len = map.len() - data_start;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_str = info.get("dtype").and_then(Value::as_str).unwrap_or("");
        let dtype = Dtype::parse(dtype_str).ok_or_else(|| {
            bad(format!(
                "tensor `{name}`: unsupported dtype {dtype_str:?} (supported: F32, BF16, F16, F8_E4M3)"
            ))
        })?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| bad(format!("tensor `{name}`: missing `shape`")))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|d| d.as_u64().map(|d| d as usize)).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Err(bad(format!("tensor `{name}`: `data_offsets` must be [begin, end]")));
        };
        let numel: usize = shape.iter().product();
        if end < start || end > data_len || end - start != numel * dtype.size() {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] do not match shape {shape:?} of {dtype_str} within {data_len} data bytes"
            )));
        }
        out.push((
            name.clone(),
            TensorEntry {
                file,
                dtype,
                shape,
                start: data_start + start,
                end: data_start + end,
            },
        ));
    }
    Ok(out)
}
