//! IndexRelay's wire contract: the public `Generation` service, the internal `Stage` and
//! `Collector` services, the operators' `Admin` service, and the encoded descriptor set for
//! server reflection.
//!
//! `proto` depends on nothing of ours; `coordinator` and `worker` depend on it.

pub mod codec;

/// Generated messages and services of package `indexrelay.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("indexrelay.v1");
}

/// Encoded `FileDescriptorSet` of every IndexRelay proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("indexrelay_descriptor");

/// Hidden states travel as little-endian f32 bytes.
pub fn f32s_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Inverse of [`f32s_to_bytes`]; `None` when the length is not a multiple of 4.
pub fn bytes_to_f32s(b: &[u8]) -> Option<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return None;
    }
    Some(
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_bytes_round_trip() {
        let v = [1.5f32, -0.0, f32::MAX, 3.25e-7];
        assert_eq!(bytes_to_f32s(&f32s_to_bytes(&v)).unwrap(), v);
        assert!(bytes_to_f32s(&[0, 1, 2]).is_none());
    }
}
