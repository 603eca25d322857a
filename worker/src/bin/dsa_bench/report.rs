//! The Markdown tables `dsa_bench` prints (the form `docs/PERFORMANCE.md` records).

use std::collections::BTreeMap;

use crate::args::RunArgs;
use crate::child::ChildResult;
use crate::flops::FlopModel;
use crate::{mib, PatternChoice, Report};

/// Prints the prefill table (best run of each configuration) and every run's time.
pub(crate) fn print_prefill(
    r: &RunArgs,
    patterns: &[PatternChoice],
    results: &BTreeMap<(usize, usize), ChildResult>,
    all: &BTreeMap<(usize, usize), Vec<ChildResult>>,
) {
    println!(
        "\n### Prefill (chunk {}, one sequence; best of {} run(s))\n",
        r.chunk,
        r.repeats.max(1)
    );
    println!(
        "CPU = CPU seconds / wall seconds of the prefill (2.00 = both cores busy all the time); other load = \
         CPU seconds other processes used on the machine during the prefill / wall seconds.\n"
    );
    println!(
        "| context | pattern | prefill s | tok/s | indexer s | indexer share | CPU | other load | load s | \
         RSS after load MiB | peak RSS MiB (load / inference) | KV cache MiB |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (&(c, pi), x) in results {
        println!(
            "| {c} | {} | {:.2} | {:.0} | {:.2} | {:.1}% | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} ({:.0} / {:.0}) | \
             {:.0} |",
            patterns[pi].label,
            x.prefill_seconds,
            c as f64 / x.prefill_seconds,
            x.prefill_indexer_seconds,
            100.0 * x.prefill_indexer_seconds / x.prefill_seconds,
            x.prefill_cpu_seconds / x.prefill_seconds,
            x.prefill_other_cpu_seconds / x.prefill_seconds,
            x.load_seconds,
            mib(x.rss_after_load),
            mib(x.peak_rss),
            mib(x.peak_rss_load),
            mib(x.peak_rss_inference),
            mib(x.cache_bytes),
        );
    }
    println!("\nPer-chunk forward seconds (indexer seconds):\n");
    for (&(c, pi), x) in results {
        let chunks: Vec<String> = x
            .chunk_seconds
            .iter()
            .zip(&x.chunk_indexer_seconds)
            .map(|(t, i)| format!("{t:.2} ({i:.2})"))
            .collect();
        println!("- {c} {}: {}", patterns[pi].label, chunks.join(", "));
    }
    if r.repeats > 1 {
        println!("\nEvery run's prefill seconds (other load):\n");
        for (&(c, pi), runs) in all {
            let times: Vec<String> = runs
                .iter()
                .map(|x| {
                    format!(
                        "{:.2} ({:.2})",
                        x.prefill_seconds,
                        x.prefill_other_cpu_seconds / x.prefill_seconds
                    )
                })
                .collect();
            println!("- {c} {}: {}", patterns[pi].label, times.join(", "));
        }
    }
}

pub(crate) fn print_speedup(
    patterns: &[PatternChoice],
    full_idx: Option<usize>,
    results: &BTreeMap<(usize, usize), ChildResult>,
) {
    let Some(fi) = full_idx else { return };
    println!("\n### IndexCache prefill speed-up vs the Amdahl bound\n");
    println!(
        "f = indexer share of all-Full prefill; r = fraction of indexers removed; bound = 1/(1 − r·f); target: \
         measured ≥ 90% of bound.\n"
    );
    println!(
        "| context | pattern | f | r | bound | measured speed-up | measured / bound | ≥ 90%? | \
         speed-up in CPU seconds (cross-check) |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---|---:|");
    for (&(c, pi), x) in results {
        if pi == fi {
            continue;
        }
        let Some(full) = results.get(&(c, fi)) else {
            continue;
        };
        let f = full.prefill_indexer_seconds / full.prefill_seconds;
        let removed = patterns[pi].removed;
        let bound = 1.0 / (1.0 - removed * f);
        let measured = full.prefill_seconds / x.prefill_seconds;
        let ratio = measured / bound;
        println!(
            "| {c} | {} | {:.3} | {:.2} | {:.3} | {:.3} | {:.1}% | {} | {:.3} |",
            patterns[pi].label,
            f,
            removed,
            bound,
            measured,
            100.0 * ratio,
            if ratio >= 0.9 { "yes" } else { "no" },
            full.prefill_cpu_seconds / x.prefill_cpu_seconds,
        );
    }
}

pub(crate) fn print_decode(
    r: &RunArgs,
    patterns: &[PatternChoice],
    full_idx: Option<usize>,
    results: &BTreeMap<(usize, usize), ChildResult>,
    all: &BTreeMap<(usize, usize), Vec<ChildResult>>,
) {
    if r.decode_context == 0 || r.decode_tokens == 0 {
        return;
    }
    println!(
        "\n### Decode at {} context ({} greedy tokens, one row per step; best of {} run(s))\n",
        r.decode_context,
        r.decode_tokens,
        r.repeats.max(1)
    );
    println!("bound = 1/(1 − r·f) with f the indexer share of all-Full decode; CPU and other load as for prefill.\n");
    println!(
        "| pattern | ms/token | tokens/s | indexer share | CPU | other load | speed-up vs all-Full | bound | \
         speed-up in CPU seconds |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let full = full_idx.and_then(|fi| results.get(&(r.decode_context, fi)));
    for (pi, p) in patterns.iter().enumerate() {
        let Some(x) = results.get(&(r.decode_context, pi)) else {
            continue;
        };
        let tps = x.decode_tokens as f64 / x.decode_seconds;
        let (speedup, bound, cpu_speedup) = match full {
            Some(f) => {
                let share = f.decode_indexer_seconds / f.decode_seconds;
                (
                    format!("{:.3}", f.decode_seconds / x.decode_seconds),
                    format!("{:.3}", 1.0 / (1.0 - p.removed * share)),
                    format!("{:.3}", f.decode_cpu_seconds / x.decode_cpu_seconds),
                )
            }
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| {} | {:.1} | {:.2} | {:.1}% | {:.2} | {:.2} | {speedup} | {bound} | {cpu_speedup} |",
            p.label,
            1e3 * x.decode_seconds / x.decode_tokens as f64,
            tps,
            100.0 * x.decode_indexer_seconds / x.decode_seconds,
            x.decode_cpu_seconds / x.decode_seconds,
            x.decode_other_cpu_seconds / x.decode_seconds,
        );
    }
    if r.repeats > 1 {
        println!("\nEvery run's decode ms/token (other load):\n");
        for (pi, p) in patterns.iter().enumerate() {
            let Some(runs) = all.get(&(r.decode_context, pi)) else {
                continue;
            };
            let times: Vec<String> = runs
                .iter()
                .map(|x| {
                    format!(
                        "{:.1} ({:.2})",
                        1e3 * x.decode_seconds / x.decode_tokens as f64,
                        x.decode_other_cpu_seconds / x.decode_seconds
                    )
                })
                .collect();
            println!("- {}: {}", p.label, times.join(", "));
        }
    }
}

pub(crate) fn print_hf(report: &Report, fi: usize, results: &BTreeMap<(usize, usize), ChildResult>) {
    println!("\n### Engine vs HF transformers (same checkpoint and prompt ids, all-Full, f32, CPU)\n");
    if let Some(h) = report.hf.first() {
        println!(
            "HF: transformers {}, {} attention, experts `{}`, {} torch threads, one no-cache forward with \
             logits_to_keep=1. Engine: chunked prefill + last-row logits.\n",
            h.transformers, h.attn_implementation, h.experts_implementation, h.threads
        );
    }
    println!(
        "| context | engine s | HF s | HF / engine (target ≥ 5) | other load engine / HF | engine peak RSS MiB | \
         HF peak RSS MiB | HF RSS after load / forward peak MiB | last-position logits max abs diff (max abs logit) \
         | same argmax |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (h, &(c, diff, scale)) in report.hf.iter().zip(&report.hf_logits_max_abs_diff) {
        let Some(e) = results.get(&(c, fi)) else {
            continue;
        };
        let hs = h.prefill_seconds.unwrap_or(f64::NAN);
        println!(
            "| {c} | {:.2} | {:.2} | {:.2} | {:.2} / {:.2} | {:.0} | {:.0} | {:.0} / {:.0} | {:.3e} ({:.2}) | {} |",
            e.prefill_seconds,
            hs,
            hs / e.prefill_seconds,
            e.prefill_other_cpu_seconds / e.prefill_seconds,
            h.other_load.unwrap_or(f64::NAN),
            mib(e.peak_rss),
            mib(h.peak_rss_bytes),
            mib(h.rss_after_load_bytes),
            mib(h.peak_rss_forward_bytes),
            diff,
            scale,
            if h.argmax == Some(e.first_token) { "yes" } else { "no" }
        );
    }
    if report.hf_every_run.iter().any(|(_, v)| v.len() > 1) {
        println!("\nEvery HF run's prefill seconds (each after one round of engine runs; the fastest is compared):\n");
        for (c, v) in &report.hf_every_run {
            let times: Vec<String> = v.iter().map(|t| format!("{t:.2}")).collect();
            println!("- {c}: {}", times.join(", "));
        }
    }
    if let Some(o) = &report.hf_oom {
        let limit = o
            .mem_limit_bytes
            .map_or("none".into(), |b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64));
        if o.oom {
            println!(
                "\nHF at {} context under an address-space limit of {limit}: **out of memory** (`{}`), peak RSS {:.0} MiB.",
                o.context,
                o.error.clone().unwrap_or_default(),
                mib(o.peak_rss_bytes)
            );
        } else {
            println!(
                "\nHF at {} context under an address-space limit of {limit}: ran, {:.1} s, peak RSS {:.0} MiB.",
                o.context,
                o.prefill_seconds.unwrap_or(f64::NAN),
                mib(o.peak_rss_bytes)
            );
        }
    }
}

pub(crate) fn print_flops(r: &RunArgs, patterns: &[PatternChoice], results: &BTreeMap<(usize, usize), ChildResult>) {
    println!("\n### Prefill work by phase (GFLOP computed from the shapes, not measured) and achieved rate\n");
    println!(
        "attn core: per chunk, the form the engine picks (expanded or absorbed), assuming each 128-row block's \
         selections cover every earlier key (measured for this model at 4K). The final layer runs its queries, \
         attention, indexer scoring and MLP for the prompt's last row only (every row's cache entries are still \
         written), and indexer queries are projected only for rows past index_topk, as the engine does. Rates divide by \
         measured wall time: the indexer's, the attention core's, and the rest of the prefill's (projections, \
         MLP, norms).\n"
    );
    println!(
        "| context | pattern | attn proj | attn core | indexer proj | indexer score | MLP | total | indexer GFLOP/s | \
         attn core s | attn core GFLOP/s | rest GFLOP/s |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (&(c, pi), x) in results {
        let (full, last_full) = patterns[pi]
            .override_pattern
            .as_ref()
            .map_or((r.shape.layers, true), |p| {
                (p.chars().filter(|&ch| ch == 'F').count(), p.ends_with('F'))
            });
        let m = FlopModel::prefill(&r.shape, c, r.chunk, full, last_full);
        let g = 1e-9;
        let ix = m.indexer_proj + m.indexer_score;
        let core_s = x.prefill_attention_seconds;
        let rest_s = x.prefill_seconds - x.prefill_indexer_seconds - core_s;
        println!(
            "| {c} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} |",
            patterns[pi].label,
            m.attn_proj * g,
            m.attn_core * g,
            m.indexer_proj * g,
            m.indexer_score * g,
            m.mlp * g,
            m.total() * g,
            if x.prefill_indexer_seconds > 0.0 {
                ix * g / x.prefill_indexer_seconds
            } else {
                0.0
            },
            core_s,
            m.attn_core * g / core_s,
            (m.total() - ix - m.attn_core) * g / rest_s,
        );
    }
}
