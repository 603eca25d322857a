//! The OpenAI-compatible HTTP front end: `/v1/completions`, `/v1/chat/completions` (when the
//! model ships a chat template), `/v1/models`, `/health` and `/metrics`.
//!
//! It mirrors the gRPC `Generate` service: the same validation ([`App::prepare`]), the same
//! metrics ([`crate::metrics::RequestTracker`]) and the same cancellation (a response body
//! dropped because the client went away drops the scheduler receiver, which frees the
//! sequence's cache on every stage). Every error, including a malformed body, is OpenAI's
//! JSON error shape.

mod chat;
mod chat_template;
mod completions;
mod errors;
mod logprobs;
mod request;
mod sse;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

pub use chat_template::ChatTemplate;
pub use errors::{ApiError, OpenAiJson};

use crate::app::App;
use crate::error::CoordinatorError;
use crate::metrics;
use crate::telemetry::{RequestOrigin, REQUEST_ID_HEADER};
use chat::ChatSupport;
use errors::json_response;

/// Largest request body accepted: a long-context prompt as JSON token ids is a few MiB.
const MAX_BODY_BYTES: usize = 64 << 20;

/// What the handlers share.
struct HttpState {
    app: Arc<App>,
    chat: ChatSupport,
    /// When the server started (the `created` of the model card).
    started: u64,
}

/// Builds the router for `app`, reading the chat template from `model_dir`.
pub fn router(app: Arc<App>, model_dir: &Path) -> Router {
    let state = Arc::new(HttpState {
        chat: ChatSupport::load(model_dir, app.tokenizer.as_deref()),
        app,
        started: unix_now(),
    });
    Router::new()
        .route("/v1/completions", post(completions::completions))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(errors::not_found)
        .method_not_allowed_fallback(errors::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(request_origin))
        .with_state(state)
}

/// Reads the caller's `traceparent` and `x-request-id` into a [`RequestOrigin`] for the
/// handlers, and answers every response with the request id (the caller's or a new one).
async fn request_origin(mut req: Request, next: Next) -> Response {
    let md = tonic::metadata::MetadataMap::from_headers(req.headers().clone());
    let origin = RequestOrigin::from_metadata(&md, "text_completion", None);
    let id = HeaderValue::from_str(&origin.request_id).ok();
    req.extensions_mut().insert(origin);
    let mut resp = next.run(req).await;
    if let Some(id) = id {
        resp.headers_mut().insert(REQUEST_ID_HEADER, id);
    }
    resp
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Seconds since the Unix epoch (OpenAI's `created`).
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn model_card(st: &HttpState) -> Value {
    json!({
        "id": st.app.model_name,
        "object": "model",
        "created": st.started,
        "owned_by": "indexrelay",
        "root": st.app.model_name,
        "parent": null,
        "max_model_len": st.app.max_context,
    })
}

async fn list_models(State(st): State<Arc<HttpState>>) -> Response {
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model_card(&st)]}))
}

async fn get_model(
    State(st): State<Arc<HttpState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    if id != st.app.model_name {
        return Err(CoordinatorError::ModelNotFound(id).into());
    }
    Ok(json_response(StatusCode::OK, &model_card(&st)))
}

async fn health(State(st): State<Arc<HttpState>>) -> Result<Response, ApiError> {
    if !st.app.scheduler.healthy() {
        return Err(CoordinatorError::Unavailable("a pipeline stage is down".into()).into());
    }
    Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
}

async fn prometheus(State(st): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(&st.app.scheduler),
    )
        .into_response()
}
