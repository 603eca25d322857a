//! `serve` arguments shared by the `worker` binary and the coordinator's launcher (which
//! runs stages through its own executable so one binary is enough on a machine).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::embedded::ensure_default_model;
use crate::{Architecture, Model};

/// Architecture of the embedded default model.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Arch {
    /// DeepSeek-V3.2.
    #[value(name = "deepseek_v32")]
    DeepseekV32,
    /// GLM-5.
    #[value(name = "glm_moe_dsa")]
    GlmMoeDsa,
}

impl From<Arch> for Architecture {
    fn from(a: Arch) -> Self {
        match a {
            Arch::DeepseekV32 => Architecture::DeepseekV32,
            Arch::GlmMoeDsa => Architecture::GlmMoeDsa,
        }
    }
}

/// Arguments of `worker serve`.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint folder; default: the embedded default model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the embedded default model (when --model is not given).
    #[arg(long, value_enum, default_value = "deepseek_v32")]
    pub arch: Arch,
    /// First layer of this stage.
    #[arg(long)]
    pub layer_start: usize,
    /// One past the last layer of this stage.
    #[arg(long)]
    pub layer_end: usize,
    /// Listen address, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// Address of the next stage (omit on the last stage).
    #[arg(long)]
    pub next: Option<String>,
    /// IndexCache pattern override, one F/S per layer.
    #[arg(long)]
    pub index_pattern: Option<String>,
    /// Worker id reported to the coordinator.
    #[arg(long, default_value = "worker")]
    pub worker_id: String,
    /// Served model name.
    #[arg(long, default_value = "indexrelay-default")]
    pub model_name: String,
    /// Positions per KV block.
    #[arg(long, default_value_t = 64)]
    pub block_size: usize,
    /// KV blocks in the pool.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
}

/// Loads the layer range and serves it until stopped.
pub fn run(a: ServeArgs) -> Result<()> {
    if a.block_size == 0 || a.kv_blocks == 0 {
        bail!("--block-size and --kv-blocks must be at least 1");
    }
    let dir = match a.model {
        Some(d) => d,
        None => ensure_default_model(a.arch.into())?,
    };
    let cfg = crate::ModelConfig::from_dir(&dir)?;
    let range = crate::LayerRange::new(a.layer_start, a.layer_end);
    let model = Model::load_range(&dir, cfg, a.index_pattern.as_deref(), range)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(crate::stage::serve(
        model,
        crate::stage::ServeOptions {
            worker_id: a.worker_id,
            model_name: a.model_name,
            listen: a.listen,
            next: a.next,
            block_size: a.block_size,
            kv_blocks: a.kv_blocks,
            logits_chunk: 64,
        },
    ))?;
    Ok(())
}

