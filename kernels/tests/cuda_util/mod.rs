//! Shared helpers of the GPU parity tests: a seeded generator, tolerance checks, the device,
//! and paged caches laid out both ways (CPU block slices, GPU pool + block table).

#![allow(dead_code)]

use kernels::cuda::{GpuKernels, KernelCache};

/// Why the parity tests are ignored by default.
pub const NEEDS_GPU: &str = "needs a CUDA GPU; run by scripts/gpu-check.sh";

/// The device under test (cuda:0, or `$INDEXRELAY_TEST_DEVICE`), kernels from the cache in
/// `$INDEXRELAY_KERNEL_CACHE` or the default location. Panics (the test fails) without a GPU.
pub fn gpu() -> GpuKernels {
    let ordinal = std::env::var("INDEXRELAY_TEST_DEVICE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    match GpuKernels::new(ordinal, &KernelCache::from_env()) {
        Ok(k) => k,
        Err(e) => panic!("GPU parity tests need a CUDA device: {e}"),
    }
}

/// SplitMix64, seeded.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// A random permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }

    /// `k` distinct sorted values from 0..n.
    pub fn subset(&mut self, n: usize, k: usize) -> Vec<u32> {
        let mut p = self.permutation(n);
        p.truncate(k);
        let mut s: Vec<u32> = p.into_iter().map(|v| v as u32).collect();
        s.sort_unstable();
        s
    }
}

/// `|a - e| <= atol + rtol * |e|` elementwise, `e` the reference.
#[track_caller]
pub fn assert_close(actual: &[f32], expected: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    // Report the worst element (NaN counts as infinitely wrong).
    let mut worst: Option<(usize, f32)> = None;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs() - rtol * e.abs();
        let err = if err.is_nan() { f32::INFINITY } else { err };
        if err > atol && worst.is_none_or(|(_, w)| err > w) {
            worst = Some((i, err));
        }
    }
    if let Some((i, _)) = worst {
        panic!("{what}: element {i}: got {}, expected {}", actual[i], expected[i]);
    }
}

/// Bitwise equality (for kernels whose GPU expression rounds exactly like the CPU's).
#[track_caller]
pub fn assert_bits_eq(actual: &[f32], expected: &[f32], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert_eq!(a.to_bits(), e.to_bits(), "{what}: element {i}: got {a}, expected {e}");
    }
}

/// A paged cache of `positions` vectors of `width` floats, blocks of `block_size`, stored in
/// shuffled physical order on the GPU side.
pub struct Paged {
    /// Logical blocks for the CPU kernels.
    pub blocks: Vec<Vec<f32>>,
    /// Physical pool for the GPU (one spare block first, so block 0 is never logical 0).
    pub pool: Vec<f32>,
    /// Logical -> physical block.
    pub table: Vec<i32>,
}

impl Paged {
    pub fn new(rng: &mut Rng, values: &[f32], width: usize, block_size: usize) -> Self {
        let positions = values.len() / width;
        let n_blocks = positions.div_ceil(block_size).max(1);
        let mut blocks = Vec::new();
        for b in 0..n_blocks {
            let mut block = vec![0.0f32; block_size * width];
            let lo = b * block_size * width;
            let hi = (lo + block_size * width).min(values.len());
            if lo < hi {
                block[..hi - lo].copy_from_slice(&values[lo..hi]);
            }
            blocks.push(block);
        }
        let perm = rng.permutation(n_blocks);
        let mut pool = vec![f32::NAN; (n_blocks + 1) * block_size * width];
        let mut table = vec![0i32; n_blocks];
        for (logical, &p) in perm.iter().enumerate() {
            let phys = p + 1;
            table[logical] = phys as i32;
            pool[phys * block_size * width..][..block_size * width].copy_from_slice(&blocks[logical]);
        }
        Paged { blocks, pool, table }
    }

    pub fn block_refs(&self) -> Vec<&[f32]> {
        self.blocks.iter().map(|b| b.as_slice()).collect()
    }
}
