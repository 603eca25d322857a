//! What one micro-batch sends over the NCCL data plane, and the receiver's checks of it.
//!
//! Over NCCL a stage sends, in this order, the batch's hidden states, then for each segment
//! whose next layer is Shared its relayed top-k rows uncompressed: a `rows × ld` u32 buffer
//! of positions (row r's selection in its first `counts[r]` slots), then `rows` i32 counts.
//! The `ForwardRequest` announces the sizes (`NcclPayload`). The receiver receives every
//! announced buffer before anything can fail, so a bad batch never leaves the sender's sends
//! unmatched on the link, and only then checks the announced shapes against the batch
//! ([`PeerInput::check_relays`]). The received positions themselves are not read back to the
//! host (that would be the round trip NCCL avoids): they come from the previous stage's
//! indexer over a link both stages negotiated.
//!
//! Plain code, tested without a GPU; the transfers are `crate::gpu::GpuStage`'s.

use proto::v1::{self as pb};

use crate::error::{Result, WorkerError};
use crate::model::Segment;
use crate::pattern::{IndexPattern, LayerKind};

/// The shape of one segment's relayed top-k rows over NCCL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayShape {
    /// Rows (the segment's positions).
    pub rows: usize,
    /// Slots per row.
    pub ld: usize,
}

impl RelayShape {
    /// Values in the positions buffer (`None` when `rows × ld` overflows).
    pub fn positions(&self) -> Option<usize> {
        self.rows.checked_mul(self.ld)
    }

    /// Bytes sent: positions and counts, 4 bytes each (what the relay byte counters add for
    /// an NCCL relay, which is not compressed).
    pub fn bytes(&self) -> u64 {
        (self.rows as u64).saturating_mul(self.ld as u64 + 1).saturating_mul(4)
    }
}

/// What a stage sends over NCCL for one micro-batch, in send order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInput {
    /// Hidden-state values (`rows × hidden_size` when the batch is well-formed).
    pub hidden_floats: usize,
    /// `(segment index, shape)` of each relayed segment, after the hidden states.
    pub relays: Vec<(usize, RelayShape)>,
}

impl PeerInput {
    /// What `p` announces, unchecked: all of it is received before any check can fail.
    pub fn announced(p: &pb::NcclPayload) -> Self {
        PeerInput {
            hidden_floats: p.hidden_floats as usize,
            relays: p
                .relays
                .iter()
                .map(|r| {
                    let shape = RelayShape {
                        rows: r.rows as usize,
                        ld: r.ld as usize,
                    };
                    (r.segment as usize, shape)
                })
                .collect(),
        }
    }

    /// The announcement for the next stage.
    pub fn payload(&self) -> pb::NcclPayload {
        pb::NcclPayload {
            hidden_floats: self.hidden_floats as u64,
            relays: self
                .relays
                .iter()
                .map(|&(segment, s)| pb::NcclRelay {
                    segment: segment as u32,
                    rows: s.rows as u32,
                    ld: s.ld as u32,
                })
                .collect(),
        }
    }

    /// Bytes of relayed rows announced.
    pub fn relay_bytes(&self) -> u64 {
        self.relays.iter().map(|(_, s)| s.bytes()).sum()
    }

    /// Per segment, whether its relay comes over NCCL.
    pub fn relayed_segments(&self, segments: usize) -> Vec<bool> {
        let mut on = vec![false; segments];
        for &(i, _) in &self.relays {
            if let Some(o) = on.get_mut(i) {
                *o = true;
            }
        }
        on
    }

    /// Checks the announced relays against the batch on a range starting at layer
    /// `range_start`, segment `i` under `patterns[i]`: each names a segment in ascending
    /// order (so at most once) that starts this range on a Shared layer and carries no gRPC
    /// relay, with `rows` equal to its len and `ld` in `1..=index_topk`. An error names the
    /// field and the limit.
    pub fn check_relays(
        &self,
        segments: &[Segment],
        patterns: &[&IndexPattern],
        range_start: usize,
        index_topk: usize,
    ) -> Result<()> {
        let mut prev: Option<usize> = None;
        for &(i, shape) in &self.relays {
            let (Some(s), Some(p)) = (segments.get(i), patterns.get(i)) else {
                return Err(WorkerError::invalid(
                    "nccl.relays.segment",
                    format!("{i}: the batch has {} segments", segments.len()),
                ));
            };
            if prev.is_some_and(|p| i <= p) {
                return Err(WorkerError::invalid(
                    "nccl.relays.segment",
                    format!(
                        "{i} after {}: relays are announced once per segment, in ascending segment order",
                        prev.unwrap_or_default()
                    ),
                ));
            }
            prev = Some(i);
            if p.kind(range_start) != LayerKind::Shared {
                return Err(WorkerError::invalid(
                    "nccl.relays.segment",
                    format!(
                        "{i} (sequence {}): layer {range_start} starts this range as Full (F) for it, so it takes no relay",
                        s.seq
                    ),
                ));
            }
            if s.relay.is_some() {
                return Err(WorkerError::invalid(
                    "nccl.relays.segment",
                    format!(
                        "{i} (sequence {}) also carries a relay in the request; a segment's rows come one way",
                        s.seq
                    ),
                ));
            }
            if shape.rows != s.len {
                return Err(WorkerError::invalid(
                    "nccl.relays.rows",
                    format!(
                        "{} for segment {i} (sequence {}) of len {}: one row per position",
                        shape.rows, s.seq, s.len
                    ),
                ));
            }
            if shape.ld == 0 || shape.ld > index_topk {
                return Err(WorkerError::invalid(
                    "nccl.relays.ld",
                    format!(
                        "{} for segment {i} (sequence {}): must be in 1..={index_topk} (index_topk)",
                        shape.ld, s.seq
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPK: usize = 8;

    fn seg(seq: u64, len: usize) -> Segment {
        Segment {
            seq,
            start: 0,
            len,
            relay: None,
        }
    }

    fn payload(relays: &[(u32, u32, u32)]) -> PeerInput {
        PeerInput::announced(&pb::NcclPayload {
            hidden_floats: 64,
            relays: relays
                .iter()
                .map(|&(segment, rows, ld)| pb::NcclRelay { segment, rows, ld })
                .collect(),
        })
    }

    /// Layer 1 is Shared under `fs`, Full under `ff`; the range starts at layer 1.
    fn check(p: &PeerInput, segments: &[Segment], patterns: &[&IndexPattern]) -> Result<()> {
        p.check_relays(segments, patterns, 1, TOPK)
    }

    #[test]
    fn well_formed_relays_are_accepted_and_round_trip() {
        let fs = IndexPattern::parse("FS", 2).unwrap();
        let ff = IndexPattern::parse("FF", 2).unwrap();
        let segments = [seg(1, 3), seg(2, 1), seg(3, 2)];
        let patterns = [&fs, &ff, &fs];
        let p = payload(&[(0, 3, TOPK as u32), (2, 2, 1)]);
        check(&p, &segments, &patterns).unwrap();
        assert_eq!(PeerInput::announced(&p.payload()), p);
        assert_eq!(p.relayed_segments(3), [true, false, true]);
        // 3 rows of 8 slots + 3 counts, and 2 rows of 1 slot + 2 counts, 4 bytes each.
        assert_eq!(p.relay_bytes(), (3 * 9 + 2 * 2) * 4);
        // Nothing relayed is fine too.
        check(&payload(&[]), &segments, &patterns).unwrap();
    }

    #[test]
    fn each_bad_field_is_rejected_naming_it_and_the_limit() {
        let fs = IndexPattern::parse("FS", 2).unwrap();
        let ff = IndexPattern::parse("FF", 2).unwrap();
        let mut with_relay = seg(4, 2);
        with_relay.relay = Some(vec![vec![0], vec![0, 1]]);
        let segments = [seg(1, 3), seg(2, 1), seg(3, 2), with_relay];
        let patterns = [&fs, &ff, &fs, &fs];
        // (announced (segment, rows, ld) entries, field named, what the message says)
        type Case = (&'static [(u32, u32, u32)], &'static str, &'static str);
        let cases: [Case; 8] = [
            (&[(4, 1, 1)], "`nccl.relays.segment`", "has 4 segments"),
            (&[(2, 2, 1), (0, 3, 1)], "`nccl.relays.segment`", "ascending"),
            (&[(0, 3, 1), (0, 3, 1)], "`nccl.relays.segment`", "once per segment"),
            (&[(1, 1, 1)], "`nccl.relays.segment`", "Full (F)"),
            (&[(3, 2, 1)], "`nccl.relays.segment`", "also carries a relay"),
            (&[(0, 2, 1)], "`nccl.relays.rows`", "of len 3"),
            (&[(0, 3, 0)], "`nccl.relays.ld`", "1..=8"),
            (&[(0, 3, 9)], "`nccl.relays.ld`", "1..=8"),
        ];
        for (relays, field, what) in cases {
            let e = check(&payload(relays), &segments, &patterns).unwrap_err();
            assert!(matches!(e, WorkerError::InvalidInput { .. }), "{relays:?}: {e:?}");
            let e = e.to_string();
            assert!(e.contains(field) && e.contains(what), "{relays:?}: {e}");
        }
    }

    #[test]
    fn shapes_count_their_bytes_and_overflow_is_caught() {
        let s = RelayShape { rows: 4, ld: 2048 };
        assert_eq!(s.positions(), Some(4 * 2048));
        assert_eq!(s.bytes(), 4 * 2049 * 4);
        let huge = RelayShape {
            rows: usize::MAX,
            ld: 2,
        };
        assert_eq!(huge.positions(), None);
        assert_eq!(huge.bytes(), u64::MAX);
    }
}
