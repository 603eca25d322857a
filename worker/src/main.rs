//! `worker`: the IndexRelay worker binary.
//!
//! `worker generate` runs the single-process engine (the reference the cluster must equal);
//! `worker init-model` writes the embedded default model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;

use worker::embedded::{ensure_default_model, write_synthetic_model, SyntheticSpec};
use worker::gpu::{resolve_device, DeviceArg, MemoryFraction, ResolvedDevice};
use worker::serve_cli::Arch;
use worker::tokenizer::{missing_tokenizer, TextTokenizer};
use worker::{Engine, EngineOptions, GenerationRequest, Model, SamplingParams, StepBackend};

/// Large activation buffers on transparent huge pages (see `worker::huge_pages`).
#[global_allocator]
static ALLOC: worker::huge_pages::HugePageAlloc = worker::huge_pages::HugePageAlloc;

#[derive(Parser)]
#[command(name = "worker", version, about = "IndexRelay worker: DSA + IndexCache inference")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate from one prompt with the single-process engine.
    Generate(GenerateArgs),
    /// Serve a layer range as a pipeline stage (gRPC `Stage` service).
    Serve(worker::serve_cli::ServeArgs),
    /// Write the embedded default model (config.json, safetensors, tokenizer.json) to a folder.
    InitModel {
        /// Destination folder.
        #[arg(long)]
        out: PathBuf,
        /// Architecture of the model.
        #[arg(long, value_enum, default_value = "deepseek_v32")]
        arch: Arch,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint folder (config.json + safetensors); default: the embedded default model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Architecture of the embedded default model (when --model is not given).
    #[arg(long, value_enum, default_value = "deepseek_v32")]
    arch: Arch,
    /// Text prompt (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Report the log-probability of every prompt token.
    #[arg(long)]
    prompt_logprobs: bool,
    /// Keep generating after an end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// IndexCache pattern override, one F/S per layer (layer 0 must be F).
    #[arg(long)]
    index_pattern: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Positions per KV block.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// KV blocks in the pool (default: 4096 on the CPU; on a GPU, as many as
    /// --gpu-memory-fraction leaves after the weights).
    #[arg(long)]
    kv_blocks: Option<usize>,
    /// Most prompt tokens per forward pass.
    #[arg(long, default_value_t = 2048)]
    prefill_chunk: usize,
    /// Compute device: auto (CUDA device 0 when one is usable, else the CPU), cpu, or cuda:N.
    #[arg(long, default_value = "auto")]
    device: DeviceArg,
    /// Share of the GPU's total memory this process may use for weights, workspace and KV
    /// cache, in (0, 1].
    #[arg(long, default_value = "0.9", allow_negative_numbers = true)]
    gpu_memory_fraction: MemoryFraction,
}

/// CPU KV blocks when --kv-blocks is not given.
const DEFAULT_CPU_KV_BLOCKS: usize = 4096;

fn main() {
    let cli = Cli::parse();
    // Errors only unless RUST_LOG says otherwise: `generate` prints its result on stdout.
    let telemetry = worker::telemetry::init(worker::telemetry::WORKER_SERVICE, "error");
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        // `exit` skips destructors: flush the spans first.
        drop(telemetry);
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::InitModel { out, arch } => {
            write_synthetic_model(&out, &SyntheticSpec::default_for(arch.into()))
                .with_context(|| format!("writing the default model to {}", out.display()))?;
            println!("{}", out.display());
            Ok(())
        }
        Cmd::Generate(args) => generate(args),
        Cmd::Serve(args) => worker::serve_cli::run(args),
    }
}

fn generate(a: GenerateArgs) -> Result<()> {
    if a.block_size == 0 || a.kv_blocks == Some(0) || a.prefill_chunk == 0 {
        bail!("--block-size, --kv-blocks and --prefill-chunk must be at least 1");
    }
    let device = resolve_device(a.device)?;
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => ensure_default_model(a.arch.into())?,
    };
    let opts = EngineOptions {
        block_size: a.block_size,
        cache_blocks: a.kv_blocks.unwrap_or(DEFAULT_CPU_KV_BLOCKS),
        prefill_chunk: a.prefill_chunk,
        ..EngineOptions::default()
    };
    let t0 = Instant::now();
    match device {
        ResolvedDevice::Cpu => {
            let model = Model::load(&dir, a.index_pattern.as_deref())?;
            let load_s = t0.elapsed().as_secs_f64();
            run_engine(Engine::new(model, opts)?, &a, &dir, load_s, "cpu")
        }
        #[cfg(feature = "cuda")]
        ResolvedDevice::Cuda { ordinal, .. } => {
            use worker::gpu::{GpuBackend, GpuEngineOptions};
            let gpu = GpuEngineOptions {
                memory_fraction: a.gpu_memory_fraction,
                max_blocks: a.kv_blocks,
                ..GpuEngineOptions::new(ordinal, &opts)
            };
            let backend = GpuBackend::load(&dir, a.index_pattern.as_deref(), &gpu)?;
            let load_s = t0.elapsed().as_secs_f64();
            let label = format!("cuda:{ordinal}");
            run_engine(Engine::with_backend(backend, opts), &a, &dir, load_s, &label)
        }
        #[cfg(not(feature = "cuda"))]
        ResolvedDevice::Cuda { ordinal, .. } => {
            // resolve_device never picks CUDA in this build; keep the message honest anyway.
            let _ = a.gpu_memory_fraction;
            bail!("--device cuda:{ordinal}: this binary was built without the `cuda` feature")
        }
    }
}

/// Tokenizes the prompt, runs one request on `engine` and prints the result.
fn run_engine<B: StepBackend>(
    mut engine: Engine<B>,
    a: &GenerateArgs,
    dir: &std::path::Path,
    load_s: f64,
    device: &str,
) -> Result<()> {
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => tokenizer.as_ref().ok_or_else(|| missing_tokenizer(dir))?.encode(text)?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let pattern = engine.pattern().to_string();
    let req = GenerationRequest {
        prompt: prompt.clone(),
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
        },
        prompt_logprobs: a.prompt_logprobs,
        ignore_eos: a.ignore_eos,
    };
    let t1 = Instant::now();
    let out = engine
        .generate(vec![req])?
        .pop()
        .context("the engine returned no output")?;
    let gen_s = t1.elapsed().as_secs_f64();
    let text = match &tokenizer {
        Some(t) => Some(t.decode(&out.token_ids)?),
        None => None,
    };
    if a.json {
        let mut v = json!({
            "token_ids": out.token_ids,
            "token_logprobs": out.token_logprobs,
            "finish_reason": out.finish_reason.as_str(),
            "prompt_token_ids": prompt,
            "index_pattern": pattern,
            "device": device,
            "text": text,
            "timing": {"load_s": load_s, "generate_s": gen_s},
        });
        if let Some(lp) = out.prompt_logprobs {
            v["prompt_logprobs"] = json!(lp);
        }
        println!("{v}");
    } else {
        match text {
            Some(t) => println!("{t}"),
            None => println!("{:?}", out.token_ids),
        }
        eprintln!(
            "{} prompt tokens, {} generated ({}), pattern {pattern}, device {device}, load {load_s:.2}s, generate {gen_s:.2}s",
            prompt.len(),
            out.token_ids.len(),
            out.finish_reason.as_str()
        );
    }
    Ok(())
}
