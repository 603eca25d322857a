//! Test helpers: a tiny deterministic PRNG and tolerance checks (no `rand` dependency).

/// SplitMix64: deterministic, seedable, good enough to fill test tensors.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    /// Uniform in 0..n.
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Asserts `|a - b| <= atol + rtol * |b|` elementwise, `b` being the reference.
#[track_caller]
pub(crate) fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32) {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let ok = (a - e).abs() <= atol + rtol * e.abs();
        assert!(ok, "element {i}: got {a}, expected {e}");
    }
}

/// Splits `src` (positions × `width`) into cache blocks of `block_size` positions, unused
/// slots NaN so that any kernel reading them poisons its output.
pub(crate) fn paged(src: &[f32], width: usize, block_size: usize) -> Vec<Vec<f32>> {
    let n_blocks = (src.len() / width).div_ceil(block_size);
    let mut blocks = vec![vec![f32::NAN; block_size * width]; n_blocks];
    for (s, v) in src.chunks_exact(width).enumerate() {
        let o = (s % block_size) * width;
        blocks[s / block_size][o..o + width].copy_from_slice(v);
    }
    blocks
}
