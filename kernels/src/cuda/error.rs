//! The CUDA backend's structured error: every failure (missing library, device, compile,
//! launch, bad argument) comes back as a value, never as a panic.

use std::path::PathBuf;

/// Result alias of the CUDA backend.
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

/// Everything that can go wrong in `kernels::cuda`.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA shared library could not be loaded (no driver, no NVRTC, no cuBLAS).
    #[error("{library} is not available: {hint}")]
    LibraryMissing {
        /// Which library (e.g. "the CUDA driver library (libcuda.so)").
        library: &'static str,
        /// What to install or set.
        hint: String,
    },
    /// A CUDA driver API call failed.
    #[error("CUDA driver error while {context}: {message}")]
    Driver {
        /// What we were doing.
        context: String,
        /// The driver's error.
        message: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {source_name} for {arch}: {log}")]
    Compile {
        /// Kernel source file name (e.g. "topk.cu").
        source_name: String,
        /// Target architecture (e.g. "sm_90").
        arch: String,
        /// NVRTC's program log.
        log: String,
    },
    /// Another NVRTC call failed.
    #[error("NVRTC error while {context}: {message}")]
    Nvrtc {
        /// What we were doing.
        context: String,
        /// NVRTC's error.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error while {context}: {message}")]
    Cublas {
        /// What we were doing.
        context: String,
        /// cuBLAS's error.
        message: String,
    },
    /// An NCCL call failed (joining a communicator, a send or a receive).
    #[error("NCCL error while {context}: {message}")]
    Nccl {
        /// What we were doing.
        context: String,
        /// NCCL's result code.
        message: String,
    },
    /// The compiled-kernel cache could not be read or written.
    #[error("kernel cache {path}: {source}")]
    Cache {
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An argument is out of range or inconsistent; names the field and the limit.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The offending argument.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The request is valid but this backend does not implement it (the caller falls back
    /// to the CPU path).
    #[error("not supported on the CUDA backend: {0}")]
    Unsupported(String),
}

impl CudaError {
    /// An [`CudaError::Invalid`] for `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        CudaError::Invalid {
            field,
            message: message.into(),
        }
    }

    /// Wraps a driver error with what we were doing.
    pub(crate) fn driver(context: impl Into<String>, err: impl std::fmt::Display) -> Self {
        CudaError::Driver {
            context: context.into(),
            message: err.to_string(),
        }
    }
}
