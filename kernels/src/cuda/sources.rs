//! The CUDA C sources, embedded in the binary, and the entry points each one defines.

/// Helpers prepended to every source (NVRTC compiles without an include path).
pub const PRELUDE: &str = include_str!("../../cuda/common.cuh");

/// One kernel source file: compiled as one NVRTC program, loaded as one module.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name under `kernels/cuda/` (also the NVRTC program name).
    pub name: &'static str,
    /// The file's text (without the prelude).
    pub code: &'static str,
    /// `extern "C"` kernels it defines.
    pub entries: &'static [&'static str],
}

impl KernelSource {
    /// The text NVRTC compiles: prelude, then the file.
    pub fn full_text(&self) -> String {
        format!("{PRELUDE}\n#line 1 \"{}\"\n{}", self.name, self.code)
    }
}

/// Every kernel source of the backend.
pub const ALL_SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "norm.cu",
        code: include_str!("../../cuda/norm.cu"),
        entries: &["rms_norm_f32", "layer_norm_f32"],
    },
    KernelSource {
        name: "rope.cu",
        code: include_str!("../../cuda/rope.cu"),
        entries: &["rope_f32"],
    },
    KernelSource {
        name: "activation.cu",
        code: include_str!("../../cuda/activation.cu"),
        entries: &["silu_mul_f32"],
    },
    KernelSource {
        name: "indexer.cu",
        code: include_str!("../../cuda/indexer.cu"),
        entries: &["indexer_score_f32"],
    },
    KernelSource {
        name: "topk.cu",
        code: include_str!("../../cuda/topk.cu"),
        entries: &["topk_rows_f32", "validate_topk_rows"],
    },
    KernelSource {
        name: "attention.cu",
        code: include_str!("../../cuda/attention.cu"),
        entries: &["sparse_mla_attention_f32", "mla_combine_f32"],
    },
    KernelSource {
        name: "moe.cu",
        code: include_str!("../../cuda/moe.cu"),
        entries: &["moe_route_f32"],
    },
    KernelSource {
        name: "sampling.cu",
        code: include_str!("../../cuda/sampling.cu"),
        entries: &["argmax_rows_f32", "sample_rows_f32"],
    },
    KernelSource {
        name: "rows.cu",
        code: include_str!("../../cuda/rows.cu"),
        entries: &[
            "gather_rows_f32",
            "scatter_rows_f32",
            "scatter_add_rows_f32",
            "add_f32",
            "f32_to_bf16",
        ],
    },
    KernelSource {
        name: "bench.cu",
        code: include_str!("../../cuda/bench.cu"),
        entries: &["fma_peak_f32", "copy_f32x4"],
    },
];
