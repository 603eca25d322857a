//! The worker's closed set of error classes.
//!
//! Every variant names what was wrong (file, field or tensor) and, where there is one, the
//! limit, so a user can fix their input without reading the source.

use std::path::PathBuf;

/// Errors raised while loading a model or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A file could not be read or written.
    // The I/O error is part of the message and not a `source`: a chain printed in full
    // (`{:#}`) would say it twice.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        error: std::io::Error,
    },
    /// `config.json` is missing, malformed, or holds an unsupported value.
    #[error("{file}: field `{field}`: {message}")]
    Config {
        /// The config file.
        file: PathBuf,
        /// The offending field (dotted path).
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// A safetensors file is malformed or a tensor cannot be used.
    #[error("{file}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor the model needs is absent from every checkpoint file.
    #[error("checkpoint {dir}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint directory.
        dir: PathBuf,
        /// The tensor name.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// An IndexCache pattern is invalid for this model.
    #[error("index pattern: {0}")]
    Pattern(String),
    /// A request field is out of range.
    #[error("invalid `{field}`: {message}")]
    InvalidInput {
        /// The request field.
        field: String,
        /// What is wrong, with the limit.
        message: String,
    },
    /// Tokenization is unavailable or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The KV cache has no room for the request.
    #[error("KV cache full: need {needed} blocks, {free} free (of {total})")]
    CacheFull {
        /// Blocks the request needs.
        needed: usize,
        /// Blocks free now.
        free: usize,
        /// Blocks in the pool.
        total: usize,
    },
    /// A sequence id is unknown to this worker's cache.
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// The compute device (`--device`) cannot be used, or a GPU operation failed.
    #[error("device: {0}")]
    Device(String),
}

impl WorkerError {
    /// Shorthand for a request-validation error.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Result alias for the worker crate.
pub type Result<T> = std::result::Result<T, WorkerError>;
