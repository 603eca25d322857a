//! `serve` arguments shared by the `worker` binary and the coordinator's launcher (which
//! runs stages through its own executable so one binary is enough on a machine).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::embedded::ensure_default_model;
use crate::gpu::{MemoryFraction, ResolvedDevice};
use crate::membership::{wait_for_assignment, Registration, WorkerRecord};
use crate::stage::{CpuStage, StageCompute};
use crate::{Architecture, LayerRange, Model};

/// Rows whose logits the last stage materializes at once.
const STAGE_LOGITS_CHUNK: usize = 64;

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
    /// First layer of this stage (with --etcd and no range, the coordinator assigns one).
    #[arg(long, requires = "layer_end")]
    pub layer_start: Option<usize>,
    /// One past the last layer of this stage.
    #[arg(long, requires = "layer_start")]
    pub layer_end: Option<usize>,
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
    /// KV blocks in the pool. On a GPU, the most blocks: the cache gets as many as
    /// --gpu-memory-fraction leaves after the weights, up to this.
    #[arg(long, default_value_t = 4096)]
    pub kv_blocks: usize,
    /// etcd endpoints (comma-separated): register here and take a stage assignment.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Option<Vec<String>>,
    /// Key prefix of this cluster in etcd.
    #[arg(long, default_value = "/indexrelay/default")]
    pub etcd_prefix: String,
    /// Lease TTL in seconds (the keep-alive runs at half of it).
    #[arg(long, default_value_t = 6)]
    pub lease_ttl: i64,
    /// Address other processes reach this worker on (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Compute device: auto (CUDA device 0 when one is usable, else the CPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: crate::gpu::DeviceArg,
    /// Share of the GPU's total memory this worker may use for weights, workspace and KV
    /// cache, in (0, 1].
    #[arg(long, default_value = "0.9", allow_negative_numbers = true)]
    pub gpu_memory_fraction: crate::gpu::MemoryFraction,
}

/// Loads the layer range and serves it until stopped.
pub fn run(a: ServeArgs) -> Result<()> {
    if a.block_size == 0 || a.kv_blocks == 0 {
        bail!("--block-size and --kv-blocks must be at least 1");
    }
    let device = crate::gpu::resolve_device(a.device)?;
    let dir = match a.model {
        Some(d) => d,
        None => ensure_default_model(a.arch.into())?,
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let mut next = a.next.clone();
        // Registration runs on its own task for the life of the process.
        let registration = a.etcd.as_ref().map(|endpoints| {
            let record = WorkerRecord {
                worker_id: a.worker_id.clone(),
                addr: a.advertise.clone().unwrap_or_else(|| a.listen.to_string()),
                model: a.model_name.clone(),
                layer_start: None,
                layer_end: None,
            };
            Registration::start(endpoints.clone(), a.etcd_prefix.clone(), record, a.lease_ttl)
        });
        let assigned = match (a.layer_start.zip(a.layer_end), &a.etcd) {
            (Some(range), _) => range,
            (None, Some(endpoints)) => {
                let asg = wait_for_assignment(endpoints, &a.etcd_prefix, &a.worker_id).await?;
                tracing::info!(
                    stage = asg.stage,
                    start = asg.layer_start,
                    end = asg.layer_end,
                    "stage assigned"
                );
                next = asg.next.clone();
                (asg.layer_start, asg.layer_end)
            }
            (None, None) => bail!("give --layer-start and --layer-end, or --etcd to take an assignment"),
        };
        let range = crate::LayerRange::new(assigned.0, assigned.1);
        let pattern = a.index_pattern.clone();
        let load_dir = dir.clone();
        let (block_size, kv_blocks, fraction) = (a.block_size, a.kv_blocks, a.gpu_memory_fraction);
        let compute = tokio::task::spawn_blocking(move || {
            load_stage(
                &load_dir,
                pattern.as_deref(),
                range,
                &device,
                block_size,
                kv_blocks,
                fraction,
            )
        })
        .await??;
        if let Some(r) = &registration {
            r.publish_range(range.start, range.end);
        }
        crate::stage::serve(
            compute,
            crate::stage::ServeOptions {
                worker_id: a.worker_id,
                model_name: a.model_name,
                listen: a.listen,
                next,
                logits_chunk: STAGE_LOGITS_CHUNK,
                model_dir: dir,
                registration,
            },
        )
        .await?;
        Ok(())
    })
}

/// Loads `range` on the resolved device with its KV cache: `kv_blocks` blocks on the CPU; on
/// a GPU as many as `fraction` of its memory leaves after the weights, at most `kv_blocks`.
fn load_stage(
    dir: &std::path::Path,
    pattern: Option<&str>,
    range: LayerRange,
    device: &ResolvedDevice,
    block_size: usize,
    kv_blocks: usize,
    fraction: MemoryFraction,
) -> Result<Box<dyn StageCompute>> {
    let cfg = crate::ModelConfig::from_dir(dir)?;
    match device {
        ResolvedDevice::Cpu => {
            let model = Model::load_range(dir, cfg, pattern, range)?;
            Ok(Box::new(CpuStage::new(model, block_size, kv_blocks)))
        }
        #[cfg(feature = "cuda")]
        ResolvedDevice::Cuda { ordinal, .. } => {
            let opts = crate::gpu::GpuEngineOptions {
                memory_fraction: fraction,
                max_blocks: Some(kv_blocks),
                block_size,
                logits_chunk: STAGE_LOGITS_CHUNK,
                ..crate::gpu::GpuEngineOptions::new(*ordinal, &crate::EngineOptions::default())
            };
            let stage = crate::gpu::GpuStage::load(dir, cfg, pattern, range, opts)?;
            Ok(Box::new(stage))
        }
        #[cfg(not(feature = "cuda"))]
        ResolvedDevice::Cuda { ordinal, .. } => {
            // resolve_device never picks CUDA in this build; keep the message honest anyway.
            let _ = (fraction, cfg);
            bail!("--device cuda:{ordinal}: this binary was built without the `cuda` feature")
        }
    }
}
