//! Running the model's final layer for only the rows whose output is read.
//!
//! A prefill chunk usually needs the logits of one row per sequence (its last), or of none
//! at all when the chunk is not the prompt's last. The final layer's cache entries are needed
//! for every row (later tokens attend to them), but its queries, attention, output projection
//! and MLP only feed that row's own hidden state, which nothing reads unless its logits are
//! asked for. [`Model::forward_for_logits`](super::Model::forward_for_logits) therefore writes
//! the final layer's cache entries for the whole batch and runs the rest of the layer on a
//! batch cut down to the kept rows: each run of kept rows becomes a segment at its own
//! positions, as a decode row is. The outputs of the kept rows are the same as a full pass's.

use super::{Segment, TopkRows};
use crate::error::{Result, WorkerError};

/// The batch cut down to the kept rows.
pub(super) struct KeptBatch {
    /// One segment per run of consecutive kept rows of one original segment.
    pub segments: Vec<Segment>,
    /// Per kept segment, the original segment it comes from.
    pub origin: Vec<usize>,
    /// Per kept segment, its rows of the original segment's selections (when it had some).
    pub topk: Vec<Option<TopkRows>>,
}

/// Checks that `keep` (batch row indices) is ascending, without repeats, and inside a batch
/// of `rows` rows.
pub(super) fn check_keep(keep: &[usize], rows: usize) -> Result<()> {
    for (i, &r) in keep.iter().enumerate() {
        if r >= rows {
            return Err(WorkerError::invalid(
                "logits.rows",
                format!("row {r} is past the batch's {rows} rows"),
            ));
        }
        if i > 0 && keep[i - 1] >= r {
            return Err(WorkerError::invalid(
                "logits.rows",
                format!("rows must ascend without repeats, got {} then {r}", keep[i - 1]),
            ));
        }
    }
    Ok(())
}

/// Cuts `segments` (with their current selections `topk`) down to the rows in `keep`
/// (checked by [`check_keep`]).
pub(super) fn keep_rows(segments: &[Segment], topk: &[Option<TopkRows>], keep: &[usize]) -> KeptBatch {
    let mut out = KeptBatch {
        segments: Vec::new(),
        origin: Vec::new(),
        topk: Vec::new(),
    };
    let mut first_row = 0;
    let mut k = 0;
    for (i, s) in segments.iter().enumerate() {
        let end = first_row + s.len;
        while k < keep.len() && keep[k] < end {
            // A run of consecutive kept rows of this segment.
            let from = keep[k] - first_row;
            let mut len = 1;
            while k + len < keep.len() && keep[k + len] == keep[k] + len && keep[k + len] < end {
                len += 1;
            }
            out.segments.push(Segment {
                seq: s.seq,
                start: s.start + from,
                len,
                relay: None,
            });
            out.origin.push(i);
            out.topk.push(topk[i].as_ref().map(|t| t[from..from + len].to_vec()));
            k += len;
        }
        first_row = end;
    }
    out
}

/// The rows `keep` of `a` (rows of `width` values), in that order.
pub(super) fn gather_rows(a: &[f32], keep: &[usize], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(keep.len() * width);
    for &r in keep {
        out.extend_from_slice(&a[r * width..][..width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u64, start: usize, len: usize) -> Segment {
        Segment {
            seq,
            start,
            len,
            relay: None,
        }
    }

    #[test]
    fn kept_rows_become_segments_at_their_own_positions() {
        // Two sequences: rows 0..4 are seq 7 at 10..14, rows 4..7 are seq 9 at 0..3.
        let segments = [seg(7, 10, 4), seg(9, 0, 3)];
        let topk = [Some((0..4).map(|r| vec![r as u32]).collect()), None];
        let kept = keep_rows(&segments, &topk, &[1, 2, 3, 4, 6]);
        let shape: Vec<(u64, usize, usize)> = kept.segments.iter().map(|s| (s.seq, s.start, s.len)).collect();
        assert_eq!(shape, vec![(7, 11, 3), (9, 0, 1), (9, 2, 1)]);
        assert_eq!(kept.origin, vec![0, 1, 1]);
        assert_eq!(kept.topk[0], Some(vec![vec![1], vec![2], vec![3]]));
        assert_eq!(kept.topk[1], None);
        assert!(kept.segments.iter().all(|s| s.relay.is_none()));
    }

    #[test]
    fn no_kept_rows_leave_no_segments() {
        let kept = keep_rows(&[seg(1, 0, 5)], &[None], &[]);
        assert!(kept.segments.is_empty() && kept.origin.is_empty() && kept.topk.is_empty());
    }

    #[test]
    fn bad_keep_lists_name_the_field_and_the_limit() {
        let past = check_keep(&[0, 5], 5).unwrap_err().to_string();
        assert!(
            past.contains("logits.rows") && past.contains("row 5") && past.contains("5 rows"),
            "{past}"
        );
        let repeat = check_keep(&[2, 2], 5).unwrap_err().to_string();
        assert!(
            repeat.contains("logits.rows") && repeat.contains("2 then 2"),
            "{repeat}"
        );
        assert!(check_keep(&[0, 3, 4], 5).is_ok());
    }

    #[test]
    fn gathers_rows_in_order() {
        let a: Vec<f32> = (0..8).map(|v| v as f32).collect();
        assert_eq!(gather_rows(&a, &[3, 0], 2), vec![6.0, 7.0, 0.0, 1.0]);
    }
}
