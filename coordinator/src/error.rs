//! The coordinator's closed set of error classes; each maps to one gRPC code and one HTTP
//! status, and to the `class` label of `indexrelay_request_errors_total`.

/// Errors surfaced to clients.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is invalid (names the field and the limit).
    #[error("invalid `{field}`: {message}")]
    InvalidRequest {
        /// The request field.
        field: String,
        /// What is wrong, with the limit.
        message: String,
    },
    /// The requested model is not served here.
    #[error("model `{0}` does not exist")]
    ModelNotFound(String),
    /// A stage is down or unreachable.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// Something broke inside the cluster.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoordinatorError {
    /// Shorthand for [`CoordinatorError::InvalidRequest`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoordinatorError::InvalidRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The metric label / log class.
    pub fn class(&self) -> &'static str {
        match self {
            CoordinatorError::InvalidRequest { .. } => "invalid_request",
            CoordinatorError::ModelNotFound(_) => "not_found",
            CoordinatorError::Unavailable(_) => "unavailable",
            CoordinatorError::Internal(_) => "internal",
        }
    }

    /// The gRPC status for this error.
    pub fn to_status(&self) -> tonic::Status {
        match self {
            CoordinatorError::InvalidRequest { .. } => tonic::Status::invalid_argument(self.to_string()),
            CoordinatorError::ModelNotFound(_) => tonic::Status::not_found(self.to_string()),
            CoordinatorError::Unavailable(_) => tonic::Status::unavailable(self.to_string()),
            CoordinatorError::Internal(_) => tonic::Status::internal(self.to_string()),
        }
    }

    /// The HTTP status code for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            CoordinatorError::InvalidRequest { .. } => 400,
            CoordinatorError::ModelNotFound(_) => 404,
            CoordinatorError::Unavailable(_) => 503,
            CoordinatorError::Internal(_) => 500,
        }
    }

    /// OpenAI's error `type` string.
    pub fn openai_type(&self) -> &'static str {
        match self {
            CoordinatorError::InvalidRequest { .. } | CoordinatorError::ModelNotFound(_) => "invalid_request_error",
            CoordinatorError::Unavailable(_) => "service_unavailable",
            CoordinatorError::Internal(_) => "internal_error",
        }
    }

    /// The offending field, when there is one (OpenAI's `param`).
    pub fn param(&self) -> Option<&str> {
        match self {
            CoordinatorError::InvalidRequest { field, .. } => Some(field),
            CoordinatorError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }
}
