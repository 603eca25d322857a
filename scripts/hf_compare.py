#!/usr/bin/env python3
"""One prefill forward of a DSA checkpoint through HF transformers on CPU, for comparison.

The Rust benchmark ``dsa_bench --hf`` (worker/src/bin/dsa_bench/) runs this script as a
child process on the same checkpoint and the same prompt token ids as the engine, and puts
the numbers side by side. It can also be run by hand:

    /opt/hfenv/bin/python scripts/hf_compare.py --model DIR --context 4096 --threads 2 \
        --ids ids.json --logits-out hf_logits.f32

What it does
------------
* Loads ``DIR`` with ``AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32,
  attn_implementation="eager")`` (``--attn-implementation sdpa`` picks HF's default for
  DSA models instead; both apply the indexer's selection as a dense mask). The checkpoint uses the published per-expert tensor
  naming (``mlp.experts.{j}.{gate,up,down}_proj.weight``); HF's loader converts it to its
  fused expert tensors. The experts implementation is HF's default unless
  ``--experts-implementation`` is given.
* After an untimed warm-up forward over the first ``--warmup-tokens`` ids, runs one
  no-cache forward over the first ``--context`` ids of ``--ids`` (a JSON array of
  token ids; without ``--ids`` a seeded random prompt is drawn) with ``logits_to_keep=1``,
  so only the last position's logits are computed (as the engine does after prefill).
* Prints one JSON object on the last line of stdout: load and prefill seconds, peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, and at least the load-phase peak), RSS
  after loading, the forward's own peak (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs`` once the model is loaded), the forward's CPU seconds and the
  CPU other processes used meanwhile (``other_load``, in cores), and on failure to
  allocate (``oom: true``) the error message. ``--logits-out`` writes the last-position
  logits as raw little-endian float32.

Memory
------
HF's eager DSA path materializes dense ``[heads, S, S]`` attention logits and the
indexer's ``[S, index_heads, S]`` scores in float32 per layer: at S = 4096 with 16 heads
that is 1 GiB per tensor (a few alive at once); at 16K it is 16 GiB per tensor.
``--mem-limit-gb`` caps the process's address space (RLIMIT_AS), set *after* the model is
loaded, so an over-large forward fails with an allocation error instead of exhausting the
machine. The cap actually applied is the smaller of the requested one and "current
address space + MemAvailable - ``--keep-free-gb``" (default 6: address space bounds
resident memory, so this leaves other work on the machine at least that much); both are
reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--context", type=int, required=True, help="prompt length (tokens)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--ids", help="JSON file with an array of prompt token ids (at least --context)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt when --ids is not given")
    p.add_argument("--logits-out", help="write the last-position logits here (raw little-endian f32)")
    p.add_argument("--mem-limit-gb", type=float, default=0.0, help="address-space cap for the forward (0: none)")
    p.add_argument(
        "--keep-free-gb",
        type=float,
        default=6.0,
        help="with --mem-limit-gb: lower the cap so that this much of MemAvailable stays free",
    )
    p.add_argument("--experts-implementation", default=None, help="HF experts implementation (default: HF's)")
    p.add_argument(
        "--attn-implementation",
        default="eager",
        choices=["eager", "sdpa"],
        help="HF attention implementation (eager, as the golden fixtures use; sdpa is HF's default for this model)",
    )
    p.add_argument("--warmup-tokens", type=int, default=16, help="untimed forward over this many ids first (0: none)")
    return p.parse_args(argv)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (0 when unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine (all cores; not idle, not iowait) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_hwm() -> bool:
    """Resets VmHWM (and the RSS high-water mark getrusage reads) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def apply_mem_limit(requested_gb: float, keep_free_gb: float) -> dict:
    """Caps RLIMIT_AS at min(requested, VmSize + MemAvailable - keep_free)."""
    requested = int(requested_gb * (1 << 30))
    vm_size = status_kib("VmSize") * 1024
    safe = vm_size + mem_available_bytes() - int(keep_free_gb * (1 << 30))
    limit = min(requested, safe)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {
        "mem_limit_requested_bytes": requested,
        "mem_limit_safe_bytes": safe,
        "mem_limit_bytes": limit,
        "vm_size_at_limit_bytes": vm_size,
    }


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    msg = str(err).lower()
    return "can't allocate memory" in msg or "out of memory" in msg or "cannot allocate memory" in msg


def main(argv) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)

    out = {
        "engine": "hf-transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "context": args.context,
        "dtype": "float32",
        "attn_implementation": args.attn_implementation,
        "experts_implementation": args.experts_implementation or "default",
        "oom": False,
    }

    if args.ids:
        with open(args.ids) as f:
            ids = json.load(f)
        if len(ids) < args.context:
            raise SystemExit(f"--ids has {len(ids)} ids, fewer than --context {args.context}")
        ids = ids[: args.context]
    else:
        ids = None

    t0 = time.perf_counter()
    kwargs = dict(dtype=torch.float32, attn_implementation=args.attn_implementation)
    if args.experts_implementation:
        kwargs["experts_implementation"] = args.experts_implementation
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    model.eval()
    out["load_seconds"] = time.perf_counter() - t0
    out["rss_after_load_bytes"] = status_kib("VmRSS") * 1024
    out["peak_rss_load_bytes"] = max(peak_rss_bytes(), status_kib("VmHWM") * 1024)
    out["params"] = sum(p.numel() for p in model.parameters())

    if ids is None:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.context,), generator=g).tolist()
    input_ids = torch.tensor([ids], dtype=torch.long)

    if args.mem_limit_gb > 0:
        out.update(apply_mem_limit(args.mem_limit_gb, args.keep_free_gb))
    # Reset the high-water mark so the forward's own peak can be told from the load peak.
    out["hwm_reset"] = reset_hwm()

    try:
        with torch.inference_mode():
            if args.warmup_tokens > 0:
                # First-call costs (thread pool start, allocator growth) are not prefill time.
                model(input_ids=input_ids[:, : args.warmup_tokens], use_cache=False, logits_to_keep=1)
            busy0, cpu0 = machine_busy_seconds(), own_cpu_seconds()
            t0 = time.perf_counter()
            logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
            out["prefill_seconds"] = time.perf_counter() - t0
            cpu = own_cpu_seconds() - cpu0
            out["prefill_cpu_seconds"] = cpu
            # CPU seconds other processes used during the forward, per wall second.
            out["other_load"] = max(machine_busy_seconds() - busy0 - cpu, 0.0) / out["prefill_seconds"]
        out["tokens_per_second"] = args.context / out["prefill_seconds"]
        last = logits[0, -1].float().contiguous()
        out["argmax"] = int(last.argmax().item())
        if args.logits_out:
            last.numpy().astype("<f4").tofile(args.logits_out)
            out["logits_file"] = args.logits_out
    except (RuntimeError, MemoryError) as err:
        if not is_oom(err):
            raise
        out["oom"] = True
        out["error"] = str(err).strip().splitlines()[0][:300]
    finally:
        out["peak_rss_forward_bytes"] = status_kib("VmHWM") * 1024
        out["peak_rss_bytes"] = max(peak_rss_bytes(), out["peak_rss_load_bytes"])
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except BaseException as e:  # report, then fail
        traceback.print_exc()
        print(json.dumps({"engine": "hf-transformers", "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
        sys.exit(1)
