//! Compression of relayed top-k rows.
//!
//! Row `i` of a segment starting at position `start` is an ascending subset of `[0, t]` with
//! `t = start + i`. A row holding all `t + 1` positions is exactly `0..=t` (attention is dense
//! there) and is sent as its count alone. Other rows are sent as the first index followed by
//! the gaps minus one, bit-packed at the width of the largest value. Counts and widths are
//! LEB128 varints.

use crate::error::{Result, WorkerError};
use crate::model::TopkRows;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

fn corrupt(msg: impl Into<String>) -> WorkerError {
    WorkerError::invalid("relay", format!("corrupt relay payload: {}", msg.into()))
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.data.get(self.pos).ok_or_else(|| corrupt("truncated varint"))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint longer than 64 bits"))
    }
}

/// Packs `rows` (row `i` at position `start + i`).
pub fn encode(rows: &TopkRows, start: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let t = start + i;
        put_varint(&mut out, row.len() as u64);
        if row.len() == t + 1 {
            continue;
        }
        let values: Vec<u32> = row
            .iter()
            .enumerate()
            .map(|(j, &x)| if j == 0 { x } else { x - row[j - 1] - 1 })
            .collect();
        let width = values.iter().map(|v| 32 - v.leading_zeros()).max().unwrap_or(0);
        out.push(width as u8);
        let mut acc = 0u64;
        let mut bits = 0;
        for v in values {
            acc |= u64::from(v) << bits;
            bits += width;
            while bits >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(acc as u8);
        }
    }
    out
}

/// Unpacks `rows` rows for a segment starting at `start`, validating every row.
pub fn decode(data: &[u8], rows: usize, start: usize) -> Result<TopkRows> {
    let mut r = Reader { data, pos: 0 };
    let mut out = Vec::with_capacity(rows);
    for i in 0..rows {
        let t = start + i;
        let n = r.varint()? as usize;
        if n == 0 || n > t + 1 {
            return Err(corrupt(format!("row {i} has {n} indices; must be 1..={}", t + 1)));
        }
        if n == t + 1 {
            out.push((0..=t as u32).collect());
            continue;
        }
        let width = *data.get(r.pos).ok_or_else(|| corrupt("truncated width"))? as u32;
        r.pos += 1;
        if width > 32 {
            return Err(corrupt(format!("row {i} bit width {width} exceeds 32")));
        }
        let nbytes = (n as u64 * u64::from(width)).div_ceil(8) as usize;
        let bytes = data
            .get(r.pos..r.pos + nbytes)
            .ok_or_else(|| corrupt(format!("row {i} is truncated")))?;
        r.pos += nbytes;
        let mut row = Vec::with_capacity(n);
        let (mut acc, mut bits, mut k) = (0u64, 0u32, 0usize);
        let mask = if width == 32 {
            u64::from(u32::MAX)
        } else {
            (1u64 << width) - 1
        };
        let mut prev: Option<u64> = None;
        for _ in 0..n {
            while bits < width {
                acc |= u64::from(bytes[k]) << bits;
                k += 1;
                bits += 8;
            }
            let v = acc & mask;
            acc >>= width;
            bits -= width;
            let x = match prev {
                None => v,
                Some(p) => p + v + 1,
            };
            if x > t as u64 {
                return Err(corrupt(format!("row {i} index {x} is past position {t}")));
            }
            row.push(x as u32);
            prev = Some(x);
        }
        out.push(row);
    }
    if r.pos != data.len() {
        return Err(corrupt(format!("{} trailing bytes", data.len() - r.pos)));
    }
    Ok(out)
}

/// Size of the same rows as raw int32 values.
pub fn raw_bytes(rows: &TopkRows) -> usize {
    rows.iter().map(|r| r.len() * 4).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::Rng;

    #[test]
    fn round_trips_dense_sparse_and_edge_rows() {
        let mut rng = Rng::new(9);
        let start = 10;
        let mut rows: TopkRows = Vec::new();
        for i in 0..200 {
            let t = start + i;
            let row: Vec<u32> = match i % 4 {
                0 => (0..=t as u32).collect(),
                1 => vec![t as u32],
                2 => vec![0],
                _ => (0..=t as u32).filter(|_| rng.next_u64().is_multiple_of(3)).collect(),
            };
            rows.push(if row.is_empty() { vec![t as u32] } else { row });
        }
        let packed = encode(&rows, start);
        assert_eq!(decode(&packed, rows.len(), start).unwrap(), rows);
        assert!(
            packed.len() * 4 < raw_bytes(&rows),
            "compression must beat raw int32 by 4x"
        );
    }

    #[test]
    fn corrupt_payloads_are_errors() {
        let rows: TopkRows = vec![vec![0, 3, 7], vec![1, 2, 8]];
        let packed = encode(&rows, 8);
        for cut in 0..packed.len() {
            assert!(decode(&packed[..cut], 2, 8).is_err());
        }
        // Decoding at an earlier start puts indices past their row's position.
        let err = decode(&packed, 2, 0).unwrap_err().to_string();
        assert!(err.contains("relay"), "{err}");
        let mut extra = packed.clone();
        extra.push(0);
        assert!(decode(&extra, 2, 8).unwrap_err().to_string().contains("trailing"));
    }
}
