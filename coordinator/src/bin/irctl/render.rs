//! irctl output: JSON objects for scripts and plain tables for people.

use proto::v1 as pb;
use serde_json::{json, Value};

/// A worker as JSON.
pub fn worker_json(w: &pb::WorkerStatus) -> Value {
    json!({
        "worker_id": w.worker_id,
        "address": w.address,
        "stage": w.stage,
        "layer_start": w.layer_start,
        "layer_end": w.layer_end,
        "health": if w.healthy { "up" } else { "down" },
        "error": if w.error.is_empty() { Value::Null } else { Value::String(w.error.clone()) },
        "kv_blocks_total": w.kv_blocks_total,
        "kv_blocks_free": w.kv_blocks_free,
        "kv_usage": w.kv_usage,
        "in_flight": w.in_flight,
        "drained": w.drained,
    })
}

fn span_json(s: &pb::StageSpan) -> Value {
    json!({
        "stage": s.stage,
        "layer_start": s.layer_start,
        "layer_end": s.layer_end,
        "relay_in": s.relay_in,
        "full_layers": s.full_layers,
    })
}

/// The pattern as JSON (`set`: the answer to `pattern set`, which says whether the plan
/// changed).
pub fn pattern_json(p: &pb::PatternInfo, set: bool) -> Value {
    let mut v = json!({
        "pattern": p.pattern,
        "epoch": p.epoch,
        "full_layers": p.full_layers,
        "num_layers": p.num_layers,
        "plan": p.plan.iter().map(span_json).collect::<Vec<_>>(),
        "plan_pinned": p.plan_pinned,
        "suggested_plan": p.suggested_plan.iter().map(span_json).collect::<Vec<_>>(),
    });
    if set {
        v["plan_changed"] = json!(p.plan_changed);
    }
    v
}

/// `irctl status --json`.
pub fn status_json(s: &pb::ClusterStatus) -> Value {
    json!({
        "model": s.model,
        "workers": s.workers.iter().map(worker_json).collect::<Vec<_>>(),
        "plan": s.plan.iter().map(span_json).collect::<Vec<_>>(),
        "pattern": s.pattern.as_ref().map(|p| pattern_json(p, false)),
        "requests": {"running": s.requests_running, "waiting": s.requests_waiting},
        "accepting": s.accepting,
        "replanning": s.replanning,
    })
}

/// `irctl calibrate --json`.
pub fn calibration_json(r: &pb::CalibrateResult) -> Value {
    json!({
        "steps": r.steps.iter().map(|s| json!({"layer": s.layer, "loss": s.loss})).collect::<Vec<_>>(),
        "pattern": r.pattern,
        "baseline_loss": r.baseline_loss,
        "applied": r.applied,
        "positions": r.positions,
    })
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}", w = *w))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push('\n');
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn layers(start: u32, end: u32) -> String {
    format!("{start}..{end}")
}

fn plan_table(plan: &[pb::StageSpan]) -> String {
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|s| {
            vec![
                s.stage.to_string(),
                layers(s.layer_start, s.layer_end),
                s.full_layers.to_string(),
                if s.relay_in { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    table(&["STAGE", "LAYERS", "FULL", "RELAY-IN"], &rows)
}

/// One line about the pattern.
pub fn pattern_line(p: &pb::PatternInfo) -> String {
    format!(
        "{}  ({} of {} layers Full, epoch {})",
        p.pattern, p.full_layers, p.num_layers, p.epoch
    )
}

fn bounds(plan: &[pb::StageSpan]) -> Vec<(u32, u32)> {
    plan.iter().map(|x| (x.layer_start, x.layer_end)).collect()
}

/// What to tell about a running plan that differs from the planner's choice, if it does.
fn plan_note(p: &pb::PatternInfo) -> Option<String> {
    let best = bounds(&p.suggested_plan);
    if best.is_empty() || bounds(&p.plan) == best {
        return None;
    }
    let split: Vec<String> = best.iter().skip(1).map(|x| x.0.to_string()).collect();
    let split = split.join(",");
    Some(if p.plan_pinned {
        format!("note: for this pattern the planner would split at {split}, but the split is pinned by --split (restart with --split {split} to apply)")
    } else {
        format!("note: for this pattern the planner would split at {split}; `irctl pattern set {}` without --keep-plan re-plans to it", p.pattern)
    })
}

/// `irctl pattern get/set` for people (`set`: the answer to `pattern set`).
pub fn pattern_text(p: &pb::PatternInfo, set: bool) -> String {
    let mut out = format!("pattern: {}\n", pattern_line(p));
    if set {
        out.push_str(if p.plan_changed {
            "stage plan re-balanced for this pattern:\n"
        } else {
            "stage plan unchanged:\n"
        });
    } else {
        out.push_str("stage plan:\n");
    }
    out.push_str(&plan_table(&p.plan));
    if let Some(note) = plan_note(p) {
        out.push_str("\n\n");
        out.push_str(&note);
    }
    out
}

/// The worker table.
pub fn workers_table(workers: &[pb::WorkerStatus]) -> String {
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            let kv = if w.healthy {
                format!(
                    "{}/{} ({:.1}%)",
                    w.kv_blocks_total - w.kv_blocks_free.min(w.kv_blocks_total),
                    w.kv_blocks_total,
                    w.kv_usage * 100.0
                )
            } else {
                "-".to_string()
            };
            vec![
                if w.worker_id.is_empty() {
                    "?".into()
                } else {
                    w.worker_id.clone()
                },
                w.address.clone(),
                w.stage.to_string(),
                layers(w.layer_start, w.layer_end),
                if w.healthy {
                    "up".into()
                } else {
                    format!("down: {}", w.error)
                },
                kv,
                w.in_flight.to_string(),
                if w.drained { "drained" } else { "serving" }.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "WORKER",
            "ADDRESS",
            "STAGE",
            "LAYERS",
            "HEALTH",
            "KV USED",
            "IN-FLIGHT",
            "STATE",
        ],
        &rows,
    )
}

/// `irctl status` for people.
pub fn status_text(s: &pb::ClusterStatus) -> String {
    let mut out = format!(
        "model: {}\nrequests: {} running, {} waiting{}\n",
        s.model,
        s.requests_running,
        s.requests_waiting,
        if !s.accepting {
            "  (a worker is drained: new requests are refused)"
        } else if s.replanning {
            "  (re-planning the stages: new requests wait)"
        } else {
            ""
        }
    );
    if let Some(p) = &s.pattern {
        out.push_str(&format!("pattern: {}\n", pattern_line(p)));
    }
    out.push('\n');
    out.push_str(&workers_table(&s.workers));
    out.push_str("\n\nstage plan:\n");
    out.push_str(&plan_table(&s.plan));
    if let Some(note) = s.pattern.as_ref().and_then(plan_note) {
        out.push_str("\n\n");
        out.push_str(&note);
    }
    out
}

/// `irctl calibrate` for people.
pub fn calibration_text(r: &pb::CalibrateResult) -> String {
    let rows: Vec<Vec<String>> = r
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| vec![(i + 1).to_string(), s.layer.to_string(), format!("{:.6}", s.loss)])
        .collect();
    format!(
        "baseline loss (all Full): {:.6} over {} positions\n{}\npattern: {}{}",
        r.baseline_loss,
        r.positions,
        table(&["STEP", "LAYER→S", "LOSS"], &rows),
        r.pattern,
        if r.applied { " (applied)" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONG"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]],
        );
        assert_eq!(t, "A    LONG\nxyz  1\nq    22");
    }
}
