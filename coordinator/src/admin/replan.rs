//! Making a pattern active, and re-balancing the stage plan live when the planner splits the
//! new pattern differently.
//!
//! A stage moves its range only while it holds no sequence (a live cache cannot move between
//! workers), so a re-plan holds admission (new requests wait in the queue; none is refused),
//! waits for the running requests to finish (bounded), has every stage whose range moves
//! load its new one (`Stage/Reconfigure`, concurrently; each loads before it swaps, so a
//! failure leaves it on its old range), records the new plan and resumes admission. If a
//! stage fails, the stages already moved are moved back. The pattern is made active before
//! the re-plan starts, so requests that queue meanwhile run under it, and it stays active
//! whatever becomes of the re-plan.

use std::ops::Range;
use std::time::{Duration, Instant};

use proto::v1::{self as pb};
use tonic::Status;

use super::{full_flags, AdminApi};
use crate::planner::{self, CostModel};

/// How long a re-plan waits for running requests by default.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long one stage may take to load its new range.
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether `plan` covers layers 0..n in order, each stage non-empty.
fn contiguous(plan: &[Range<usize>], n: usize) -> bool {
    let mut next = 0;
    for r in plan {
        if r.start != next || r.end <= r.start {
            return false;
        }
        next = r.end;
    }
    next == n
}

fn ranges(plan: &[Range<usize>]) -> String {
    plan.iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

impl AdminApi {
    /// Makes the already validated and prepared `pattern` active and, unless the plan is
    /// pinned (`--split` at launch) or `keep_plan` is set, adopts the planner's split for it.
    /// The answer says whether the plan changed.
    pub async fn activate_pattern(
        &self,
        pattern: &str,
        keep_plan: bool,
        drain_timeout: Duration,
    ) -> Result<pb::PatternInfo, Status> {
        // One pattern change (and re-plan) at a time: the plan a re-plan starts from stays
        // the running one until it ends.
        let _one = self.cluster.replan_lock.lock().await;
        let active = self.app.scheduler.control().set_pattern(pattern);
        tracing::info!(pattern = %active.pattern, epoch = active.epoch, "IndexCache pattern changed");
        let current = self.cluster.plan();
        let target =
            planner::balance(&full_flags(pattern), current.len(), CostModel::default()).map_err(|e| e.to_status())?;
        let changed = if self.plan_pinned || keep_plan || target == current {
            false
        } else {
            self.replan(&current, &target, pattern, drain_timeout).await?;
            true
        };
        let mut info = self.pattern_info();
        info.plan_changed = changed;
        Ok(info)
    }

    /// Moves the stages from `from` to `to` with admission held.
    async fn replan(
        &self,
        from: &[Range<usize>],
        to: &[Range<usize>],
        pattern: &str,
        drain_timeout: Duration,
    ) -> Result<(), Status> {
        let sched = &self.app.scheduler;
        tracing::info!(from = %ranges(from), to = %ranges(to), "re-planning the stages: holding admission");
        sched.hold_admission(true).await;
        let result = self.replan_held(from, to, pattern, drain_timeout).await;
        if !contiguous(&self.cluster.plan(), self.num_layers) {
            // Only when moving stages back failed too: a pipeline with a gap or an overlap
            // would answer wrongly, so nothing starts until a re-plan succeeds.
            return Err(Status::internal(format!(
                "{}; the stages do not cover the layers in order, so admission stays held until a                  `pattern set` re-plans successfully",
                result.err().map_or_else(String::new, |e| e.message().to_string())
            )));
        }
        sched.hold_admission(false).await;
        match &result {
            Ok(()) => tracing::info!(plan = %ranges(to), "re-plan done; admission resumed"),
            Err(e) => tracing::warn!(error = %e.message(), "re-plan abandoned; admission resumed"),
        }
        result
    }

    async fn replan_held(
        &self,
        from: &[Range<usize>],
        to: &[Range<usize>],
        pattern: &str,
        drain_timeout: Duration,
    ) -> Result<(), Status> {
        let kept = |why: String| {
            format!(
                "re-plan aborted: {why}; the stage plan stays [{}] and the pattern {pattern} is active",
                ranges(from)
            )
        };
        self.wait_idle(drain_timeout)
            .await
            .map_err(|e| Status::new(e.0, kept(e.1)))?;
        let moving: Vec<usize> = (0..to.len()).filter(|&i| from[i] != to[i]).collect();
        let moved = self.reconfigure_all(&moving, to, pattern).await;
        let failed: Vec<String> = moved
            .iter()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("stage {i}: {}", e.message())))
            .collect();
        if failed.is_empty() {
            self.cluster.set_plan(to.to_vec());
            return Ok(());
        }
        // Put back the stages that did move.
        let back: Vec<usize> = moved
            .iter()
            .filter(|(_, r)| r.as_ref().is_ok_and(|r| r.changed))
            .map(|(i, _)| *i)
            .collect();
        let undone = self.reconfigure_all(&back, from, pattern).await;
        let stuck: Vec<String> = undone
            .iter()
            .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("stage {i}: {}", e.message())))
            .collect();
        if !stuck.is_empty() {
            // The stages now serve a mix of both plans; record what each one reports.
            let mut now = from.to_vec();
            for (i, r) in &undone {
                if r.is_err() {
                    now[*i] = to[*i].clone();
                }
            }
            self.cluster.set_plan(now);
            return Err(Status::internal(format!(
                "re-plan failed ({}) and rolling back failed too ({}); check `irctl status`",
                failed.join("; "),
                stuck.join("; ")
            )));
        }
        Err(Status::failed_precondition(kept(format!(
            "a stage could not load its new range ({})",
            failed.join("; ")
        ))))
    }

    /// Has each stage in `stages` serve `plan`'s range for it, concurrently.
    async fn reconfigure_all(
        &self,
        stages: &[usize],
        plan: &[Range<usize>],
        pattern: &str,
    ) -> Vec<(usize, Result<pb::ReconfigureResponse, Status>)> {
        let mut set = tokio::task::JoinSet::new();
        for &i in stages {
            let (cluster, layers, p) = (self.cluster.clone(), plan[i].clone(), pattern.to_string());
            set.spawn(async move { (i, cluster.reconfigure(i, layers, &p, RECONFIGURE_TIMEOUT).await) });
        }
        let mut out = Vec::with_capacity(stages.len());
        while let Some(r) = set.join_next().await {
            match r {
                Ok(x) => out.push(x),
                Err(e) => tracing::error!(error = %e, "reconfigure task failed"),
            }
        }
        out.sort_by_key(|x| x.0);
        out
    }

    /// Waits until no request runs and no stage holds a sequence (their release follows the
    /// end of a request shortly); fails after `timeout` or when a stage does not answer.
    async fn wait_idle(&self, timeout: Duration) -> Result<(), (tonic::Code, String)> {
        let deadline = Instant::now() + timeout;
        let sched = &self.app.scheduler;
        loop {
            let running = sched.running();
            let mut holding = Vec::new();
            if running == 0 {
                for (i, info) in self.stage_infos().await.into_iter().enumerate() {
                    match info {
                        Ok(info) if info.active_sequences > 0 => holding.push(i),
                        Ok(_) => {}
                        Err(e) => return Err((tonic::Code::Unavailable, format!("stage {i} does not answer ({e})"))),
                    }
                }
                if holding.is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let why = if running > 0 {
                    format!("{running} running request(s) did not finish within {timeout:?}")
                } else {
                    format!("stage(s) {holding:?} still hold sequences after {timeout:?}")
                };
                return Err((tonic::Code::DeadlineExceeded, why));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_plans() {
        assert!(contiguous(&[0..2, 2..4, 4..6], 6));
        assert!(!contiguous(&[0..1, 2..4, 4..6], 6), "a gap");
        assert!(!contiguous(&[0..3, 2..4, 4..6], 6), "an overlap");
        assert!(!contiguous(&[0..2, 2..5], 6), "short");
        assert_eq!(ranges(&[0..1, 1..6]), "0..1, 1..6");
    }
}
