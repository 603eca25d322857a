//! OpenAI-shaped errors: every failure, including a malformed body or an unknown route, is
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::CoordinatorError;
use crate::metrics;

/// An error response in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

impl From<CoordinatorError> for ApiError {
    /// Converts without counting: errors from [`crate::metrics::RequestTracker`] are counted there.
    fn from(e: CoordinatorError) -> Self {
        ApiError {
            status: StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: e.to_string(),
            kind: e.openai_type(),
            param: e.param().map(str::to_string),
        }
    }
}

impl ApiError {
    /// An invalid-request error that no [`CoordinatorError`] describes (routing, body size).
    fn request(status: StatusCode, message: String) -> Self {
        ApiError {
            status,
            message,
            kind: "invalid_request_error",
            param: None,
        }
    }

    /// The JSON body (also sent as an SSE event when a stream fails).
    pub(super) fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body())
    }
}

/// An invalid-request error found by this front end (not by [`crate::app::App::prepare`]),
/// counted here.
pub(super) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    counted(CoordinatorError::invalid(field, message))
}

/// Counts `e` in the error metric and converts it.
pub(super) fn counted(e: CoordinatorError) -> ApiError {
    metrics::record_error(&e);
    e.into()
}

/// The error for a request stream that ended without a last event.
pub(super) fn dropped() -> ApiError {
    CoordinatorError::Internal("the scheduler dropped the request".into()).into()
}

/// A JSON response with the right content type.
pub(super) fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(super) async fn not_found(req: Request) -> ApiError {
    ApiError::request(
        StatusCode::NOT_FOUND,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

pub(super) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::request(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// A JSON body whose rejections are OpenAI errors naming the offending field (axum's own
/// `Json` answers in plain text). The content type is not checked, so `curl -d` works.
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            metrics::record_error(&CoordinatorError::invalid("body", ""));
            ApiError::request(r.status(), r.body_text())
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let v: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if path == "." || inner.is_syntax() || inner.is_eof() {
                invalid("body", format!("malformed JSON: {inner}"))
            } else {
                invalid(&path, inner.to_string())
            }
        })?;
        de.end().map_err(|e| invalid("body", format!("malformed JSON: {e}")))?;
        Ok(OpenAiJson(v))
    }
}
