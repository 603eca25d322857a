//! IndexRelay numerics: the CPU kernels every layer is built from.
//!
//! All tensors are row-major `f32` slices; shapes are passed explicitly. Kernels are
//! multithreaded with rayon. Callers (the `worker` crate) validate user input; the kernels
//! check their shape contracts with `debug_assert!` only, because they sit on the hot path.

pub mod activation;
pub mod attention;
pub mod attention_prefill;
#[cfg(feature = "cuda")]
pub mod cuda;
mod disjoint;
pub mod indexer;
pub mod linear;
pub mod norm;
pub mod rope;
mod simd;
#[cfg(test)]
mod test_util;
pub mod topk;

pub use activation::{log_softmax, sigmoid, silu_mul, softmax_in_place};
pub use attention::{sparse_mla_attention, MlaAttentionInputs};
pub use attention_prefill::{mla_prefill_attention, MlaDims, MlaKeyPlan, MlaMacs, MlaPrefillInputs};
pub use indexer::{indexer_topk, IndexerInputs};
pub use linear::{gemv_t, matmul_t};
pub use norm::{layer_norm, rms_norm};
pub use rope::{apply_rope, RopeStyle};
pub use topk::select_topk;
