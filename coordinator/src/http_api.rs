//! The OpenAI-compatible HTTP front end: `/v1/completions`, `/v1/chat/completions` (when the
//! model ships a chat template), `/v1/models`, `/health` and `/metrics`.
//!
//! It mirrors the gRPC `Generate` service: the same validation ([`App::prepare`]), the same
//! metrics ([`RequestTracker`]) and the same cancellation (a response body dropped because
//! the client went away drops the scheduler receiver, which frees the sequence's cache on
//! every stage). Every error, including a malformed body, is OpenAI's JSON error shape.

use std::convert::Infallible;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_stream::Stream;
use worker::tokenizer::TextTokenizer;

use crate::app::{App, Detokenizer, RawRequest};
use crate::error::CoordinatorError;
use crate::metrics::{self, RequestTracker};
use crate::scheduler::{Event, FinishReason};

/// Largest request body accepted: a long-context prompt as JSON token ids is a few MiB.
const MAX_BODY_BYTES: usize = 64 << 20;

/// What the handlers share.
struct HttpState {
    app: Arc<App>,
    chat: ChatSupport,
    /// When the server started (the `created` of the model card).
    started: u64,
}

enum ChatSupport {
    /// The model folder has no chat template.
    None,
    /// The template did not compile; chat requests get this message.
    Broken(String),
    /// A usable template.
    Ready(Box<ChatTemplate>),
}

/// Builds the router for `app`, reading the chat template from `model_dir`.
pub fn router(app: Arc<App>, model_dir: &Path) -> Router {
    let chat = match ChatTemplate::load(model_dir, app.tokenizer.as_deref()) {
        Ok(Some(t)) => ChatSupport::Ready(Box::new(t)),
        Ok(None) => ChatSupport::None,
        Err(e) => {
            // A bad template must not stop completions from being served.
            tracing::warn!(error = %e, "chat template unusable; /v1/chat/completions is disabled");
            ChatSupport::Broken(e)
        }
    };
    let state = Arc::new(HttpState {
        app,
        chat,
        started: unix_now(),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------
// Errors

/// An error response in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
}

impl From<CoordinatorError> for ApiError {
    /// Converts without counting: errors from [`RequestTracker`] are counted there.
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
    fn body(&self) -> Value {
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

/// An invalid-request error found by this front end (not by [`App::prepare`]), counted here.
fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    counted(CoordinatorError::invalid(field, message))
}

/// Counts `e` in the error metric and converts it.
fn counted(e: CoordinatorError) -> ApiError {
    metrics::record_error(&e);
    e.into()
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    let body = serde_json::to_vec(v).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route for {} {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
    }
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("method {} is not allowed on {}", req.method(), req.uri().path()),
        kind: "invalid_request_error",
        param: None,
    }
}

/// A JSON body whose rejections are OpenAI errors naming the offending field (axum's own
/// `Json` answers in plain text). The content type is not checked, so `curl -d` works.
pub struct OpenAiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            metrics::record_error(&CoordinatorError::invalid("body", ""));
            ApiError {
                status: r.status(),
                message: r.body_text(),
                kind: "invalid_request_error",
                param: None,
            }
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

// ---------------------------------------------------------------------------------------
// Shared request pieces

/// An integer seed that may be negative (OpenAI clients send any 64-bit integer).
fn parse_seed(v: Option<&serde_json::Number>) -> Result<Option<u64>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Ok(Some(u)),
            (None, Some(i)) => Ok(Some(i as u64)),
            _ => Err(invalid("seed", format!("must be an integer, got {n}"))),
        },
    }
}

/// Options OpenAI defines that this server does not implement: refused with a clear
/// message rather than silently ignored.
#[derive(Deserialize, Default)]
struct Unsupported {
    n: Option<u32>,
    best_of: Option<u32>,
    stop: Option<Value>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<Map<String, Value>>,
    suffix: Option<String>,
    tools: Option<Vec<Value>>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(invalid("n", "only n = 1 is supported"));
        }
        if self.best_of.is_some_and(|n| n != 1) {
            return Err(invalid("best_of", "only best_of = 1 is supported"));
        }
        let stop_set = match &self.stop {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if stop_set {
            return Err(invalid("stop", "stop sequences are not supported; use max_tokens"));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(invalid("presence_penalty", "penalties are not supported; must be 0"));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(invalid("frequency_penalty", "penalties are not supported; must be 0"));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(invalid("logit_bias", "logit_bias is not supported"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(invalid("suffix", "suffix is not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(invalid("tools", "tool calls are not supported"));
        }
        Ok(())
    }
}

#[derive(Deserialize, Default, Clone, Copy)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `max_tokens` bounded before it reaches [`App::prepare`], whose sum of prompt and
/// completion lengths must not overflow.
fn max_tokens(app: &App, v: Option<u64>, default: usize) -> Result<usize, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if n > app.max_context as u64 => Err(invalid(
            "max_tokens",
            format!(
                "This model's maximum context length is {} tokens; max_tokens = {n} exceeds it.",
                app.max_context
            ),
        )),
        Some(n) => Ok(n as usize),
    }
}

/// A token's text for logprob listings: its own decoding, or `token_id:N` (vLLM's form)
/// when the model has no tokenizer.
fn token_text(tok: Option<&TextTokenizer>, id: u32) -> String {
    match tok {
        Some(t) => t.decode(&[id]).unwrap_or_default(),
        None => format!("token_id:{id}"),
    }
}

fn decode(tok: Option<&TextTokenizer>, ids: &[u32]) -> String {
    tok.and_then(|t| t.decode(ids).ok()).unwrap_or_default()
}

fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The legacy completions `logprobs` object, built token by token.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Adds a token whose text starts at character `offset`; returns the offset after it.
    fn push(&mut self, text: String, lp: Option<f32>, offset: usize) -> usize {
        let next = offset + text.chars().count();
        self.text_offset.push(offset);
        // Only the chosen token's logprob is computed, so each entry lists just that one.
        self.top_logprobs.push(match lp {
            Some(lp) => {
                let mut m = Map::new();
                m.insert(text.clone(), json!(lp));
                Value::Object(m)
            }
            None => Value::Null,
        });
        self.tokens.push(text);
        self.token_logprobs.push(lp);
        next
    }

    fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

// ---------------------------------------------------------------------------------------
// /v1/completions

#[derive(Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: String,
    prompt: Option<Value>,
    max_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<serde_json::Number>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    echo: Option<bool>,
    logprobs: Option<u32>,
    ignore_eos: Option<bool>,
    return_token_ids: Option<bool>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

/// The prompt as text or as token ids. OpenAI also allows a batch (an array of prompts);
/// a batch of one is unwrapped, larger ones are refused.
fn parse_prompt(v: Option<Value>) -> Result<(Option<String>, Option<Vec<u32>>), ApiError> {
    let v = match v {
        None | Some(Value::Null) => return Err(invalid("prompt", "is required")),
        Some(v) => v,
    };
    match v {
        Value::String(s) if s.is_empty() => Err(invalid("prompt", "must not be empty")),
        Value::String(s) => Ok((Some(s), None)),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x.as_u64()
                        .filter(|t| *t <= u32::MAX as u64)
                        .map(|t| t as u32)
                        .ok_or_else(|| {
                            invalid(
                                "prompt",
                                format!("token id at index {i} must be a non-negative integer, got {x}"),
                            )
                        })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            Ok((None, Some(ids)))
        }
        Value::Array(mut items) if items.iter().all(|x| x.is_string() || x.is_array()) => {
            if items.len() > 1 {
                return Err(invalid("prompt", "only one prompt per request is supported"));
            }
            match items.pop() {
                Some(Value::Array(inner)) if !inner.iter().all(Value::is_number) => Err(invalid(
                    "prompt",
                    "must be a string, an array of token ids, or a one-element array of either",
                )),
                // `None` cannot happen (an empty array is "all numbers"); it reads as missing.
                inner => parse_prompt(inner),
            }
        }
        _ => Err(invalid(
            "prompt",
            "must be a string, an array of token ids, or a one-element array of either",
        )),
    }
}

async fn completions(State(st): State<Arc<HttpState>>, OpenAiJson(req): OpenAiJson<CompletionRequest>) -> Response {
    match completions_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// What the completions response needs besides the events.
struct CompletionShape {
    id: String,
    created: u64,
    model: String,
    /// The prompt's text to prepend (`echo`).
    echo: Option<String>,
    prompt: Vec<u32>,
    logprobs: bool,
    return_token_ids: bool,
}

async fn completions_inner(st: Arc<HttpState>, req: CompletionRequest) -> Result<Response, ApiError> {
    req.unsupported.check()?;
    let app = &st.app;
    let (text, token_ids) = parse_prompt(req.prompt)?;
    let max_new = max_tokens(app, req.max_tokens, 16)?;
    let echo = req.echo.unwrap_or(false);
    let raw = RawRequest {
        model: req.model,
        text: text.clone(),
        token_ids,
        max_new_tokens: max_new,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(-1),
        seed: parse_seed(req.seed.as_ref())?,
        // Echo scores the prompt when logprobs are asked for; with max_tokens 0 the request
        // is pure scoring, which the scheduler runs only for prompt logprobs.
        prompt_logprobs: echo && (req.logprobs.is_some() || max_new == 0),
        ignore_eos: req.ignore_eos.unwrap_or(false),
    };
    let (prompt, events) = RequestTracker::submit(app, raw).await?;
    let tok = app.tokenizer.as_deref();
    let shape = CompletionShape {
        id: format!("cmpl-{:016x}", crate::grpc_api::rand_id()),
        created: unix_now(),
        model: app.model_name.clone(),
        echo: echo.then(|| text.unwrap_or_else(|| decode(tok, &prompt))),
        prompt,
        logprobs: req.logprobs.is_some(),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    };
    if req.stream.unwrap_or(false) {
        let include_usage = req.stream_options.unwrap_or_default().include_usage;
        let src = CompletionChunks {
            detok: Detokenizer::new(app.tokenizer.clone()),
            st: st.clone(),
            shape,
            include_usage,
            prompt_sent: false,
            generated: Vec::new(),
            offset: 0,
        };
        return Ok(sse(src, events));
    }
    completion_response(&st, shape, events).await
}

async fn completion_response(
    st: &HttpState,
    s: CompletionShape,
    mut events: RequestTracker,
) -> Result<Response, ApiError> {
    let tok = st.app.tokenizer.as_deref();
    let mut prompt_lps = None;
    let mut ids = Vec::new();
    let mut lps = Vec::new();
    let (reason, n_prompt, n_completion) = loop {
        match events.recv().await {
            Some(Event::PromptLogprobs(l)) => prompt_lps = Some(l),
            Some(Event::Token { id, logprob }) => {
                ids.push(id);
                lps.push(logprob);
            }
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => break (reason, prompt_tokens, completion_tokens),
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(CoordinatorError::Internal("the scheduler dropped the request".into()).into()),
        }
    };
    let completion = decode(tok, &ids);
    let mut text = String::new();
    let mut logprobs = CompletionLogprobs::default();
    let mut offset = 0;
    if let Some(echo) = &s.echo {
        if s.logprobs {
            let plps = prompt_lps.unwrap_or_default();
            for (i, t) in s.prompt.iter().enumerate() {
                offset = logprobs.push(token_text(tok, *t), plps.get(i).copied().flatten(), offset);
            }
        }
        text.push_str(echo);
        // Generated tokens' offsets count from the end of the echoed text.
        offset = echo.chars().count();
    }
    text.push_str(&completion);
    if s.logprobs {
        for (id, lp) in ids.iter().zip(&lps) {
            offset = logprobs.push(token_text(tok, *id), Some(*lp), offset);
        }
    }
    let mut choice = json!({
        "index": 0,
        "text": text,
        "logprobs": if s.logprobs { logprobs.to_json() } else { Value::Null },
        "finish_reason": finish_reason(reason),
    });
    if s.return_token_ids {
        choice["token_ids"] = json!(ids);
        if s.echo.is_some() {
            choice["prompt_token_ids"] = json!(s.prompt);
        }
    }
    let body = json!({
        "id": s.id,
        "object": "text_completion",
        "created": s.created,
        "model": s.model,
        "choices": [choice],
        "usage": usage(n_prompt, n_completion),
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// Streaming completions: one chunk per token, the echoed prompt first, the finish reason
/// in a last chunk of its own.
struct CompletionChunks {
    st: Arc<HttpState>,
    shape: CompletionShape,
    detok: Detokenizer,
    include_usage: bool,
    prompt_sent: bool,
    generated: Vec<u32>,
    /// Characters of text streamed so far (for `text_offset`).
    offset: usize,
}

impl CompletionChunks {
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>, ids: (&str, &[u32])) -> String {
        let mut choice = json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish});
        if self.shape.return_token_ids {
            choice[ids.0] = json!(ids.1);
        }
        sse_data(&json!({
            "id": self.shape.id,
            "object": "text_completion",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": [choice],
        }))
    }

    /// The echoed prompt, with its logprobs when they are known.
    fn prompt_chunk(&mut self, plps: Option<&[Option<f32>]>) -> String {
        self.prompt_sent = true;
        let Some(echo) = self.shape.echo.clone() else {
            return String::new();
        };
        let tok = self.st.app.tokenizer.clone();
        let logprobs = if self.shape.logprobs {
            let mut lp = CompletionLogprobs::default();
            let mut off = 0;
            for (i, t) in self.shape.prompt.iter().enumerate() {
                let p = plps.and_then(|p| p.get(i).copied().flatten());
                off = lp.push(token_text(tok.as_deref(), *t), p, off);
            }
            lp.to_json()
        } else {
            Value::Null
        };
        self.offset = echo.chars().count();
        let ids = self.shape.prompt.clone();
        self.chunk(&echo, logprobs, None, ("prompt_token_ids", &ids))
    }
}

impl SseSource for CompletionChunks {
    fn start(&mut self) -> String {
        // Without prompt logprobs to wait for, the echo goes out at once.
        if self.shape.echo.is_some() && !self.shape.logprobs {
            self.prompt_chunk(None)
        } else {
            String::new()
        }
    }

    fn on_event(&mut self, ev: Event) -> (String, bool) {
        match ev {
            Event::PromptLogprobs(l) => {
                if self.prompt_sent {
                    (String::new(), false)
                } else {
                    (self.prompt_chunk(Some(&l)), false)
                }
            }
            Event::Token { id, logprob } => {
                let mut out = if self.prompt_sent {
                    String::new()
                } else {
                    self.prompt_chunk(None)
                };
                self.generated.push(id);
                let delta = self.detok.push(&[id]);
                let logprobs = if self.shape.logprobs {
                    let mut lp = CompletionLogprobs::default();
                    let tok = self.st.app.tokenizer.clone();
                    self.offset = lp.push(token_text(tok.as_deref(), id), Some(logprob), self.offset);
                    lp.to_json()
                } else {
                    Value::Null
                };
                out.push_str(&self.chunk(&delta, logprobs, None, ("token_ids", &[id])));
                (out, false)
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut out = if self.prompt_sent {
                    String::new()
                } else {
                    self.prompt_chunk(None)
                };
                // Text the detokenizer held back (an incomplete character at the very end).
                let full = decode(self.st.app.tokenizer.as_deref(), &self.generated);
                let rest = full.strip_prefix(self.detok.text()).unwrap_or_default().to_string();
                out.push_str(&self.chunk(&rest, Value::Null, Some(finish_reason(reason)), ("token_ids", &[])));
                if self.include_usage {
                    out.push_str(&sse_data(&json!({
                        "id": self.shape.id,
                        "object": "text_completion",
                        "created": self.shape.created,
                        "model": self.shape.model,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens),
                    })));
                }
                out.push_str(SSE_DONE);
                (out, true)
            }
            Event::Failed(e) => (sse_error(e.into()), true),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server-sent events

const SSE_DONE: &str = "data: [DONE]\n\n";

fn sse_data(v: &Value) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

/// An error after the stream started: the status line is gone, so it is an event.
fn sse_error(e: ApiError) -> String {
    format!("{}{SSE_DONE}", sse_data(&e.body()))
}

/// Turns scheduler events into SSE text.
trait SseSource: Send + Unpin + 'static {
    /// Text sent before the first event.
    fn start(&mut self) -> String;
    /// Text for one event, and whether it ended the stream.
    fn on_event(&mut self, ev: Event) -> (String, bool);
}

/// The body stream. Owning the [`RequestTracker`] is what makes disconnects cancel: hyper
/// drops the body when the client goes away, and with it the scheduler receiver.
struct SseStream<S> {
    src: S,
    events: RequestTracker,
    started: bool,
    done: bool,
}

impl<S: SseSource> Stream for SseStream<S> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.started {
            this.started = true;
            let s = this.src.start();
            if !s.is_empty() {
                return Poll::Ready(Some(Ok(Bytes::from(s))));
            }
        }
        loop {
            match std::task::ready!(Pin::new(&mut this.events).poll_next(cx)) {
                Some(ev) => {
                    let (s, end) = this.src.on_event(ev);
                    this.done = end;
                    if !s.is_empty() {
                        return Poll::Ready(Some(Ok(Bytes::from(s))));
                    }
                    if end {
                        return Poll::Ready(None);
                    }
                }
                None => {
                    this.done = true;
                    let e = CoordinatorError::Internal("the scheduler dropped the request".into());
                    return Poll::Ready(Some(Ok(Bytes::from(sse_error(e.into())))));
                }
            }
        }
    }
}

fn sse<S: SseSource>(src: S, events: RequestTracker) -> Response {
    let stream = SseStream {
        src,
        events,
        started: false,
        done: false,
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------
// /v1/chat/completions

/// A model's chat template (HF Jinja, rendered with minijinja and Python string methods).
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
    /// The tokenizer adds BOS itself, so a BOS the template writes is removed (else the
    /// prompt would start with two).
    strip_bos: bool,
}

fn special_token(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Reads `chat_template` from `tokenizer_config.json` (a string, or a list of named
    /// templates of which "default" is used) or `chat_template.jinja`; `Ok(None)` when the
    /// model has neither.
    pub fn load(dir: &Path, tok: Option<&TextTokenizer>) -> Result<Option<Self>, String> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| format!("{}: {e}", cfg_path.display()))?,
            Err(_) => Value::Null,
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let mut env = minijinja::Environment::new();
        // HF renders with jinja2's trim_blocks and lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source)
            .map_err(|e| format!("chat template: {e}"))?;
        let bos = special_token(cfg.get("bos_token"));
        let strip_bos = bos.is_some() && tok.is_some_and(|t| t.encode("").is_ok_and(|ids| !ids.is_empty()));
        Ok(Some(ChatTemplate {
            env,
            bos,
            eos: special_token(cfg.get("eos_token")),
            strip_bos,
        }))
    }

    /// The prompt text for `messages`, ending with the assistant turn's opening.
    pub fn render(&self, messages: &[Value]) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").map_err(|e| e.to_string())?;
        let out = tmpl
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| {
                // The template's own message (raise_exception) is what the user needs.
                let mut msg = e.to_string();
                if let Some(detail) = e.detail() {
                    msg = detail.to_string();
                }
                msg
            })?;
        Ok(match (&self.bos, self.strip_bos) {
            (Some(b), true) => out.strip_prefix(b.as_str()).map(str::to_string).unwrap_or(out),
            _ => out,
        })
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    messages: Option<Vec<Value>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<serde_json::Number>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    ignore_eos: Option<bool>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

/// Messages with content given as text parts flattened to a string (templates expect one).
fn normalize_messages(msgs: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    if msgs.is_empty() {
        return Err(invalid("messages", "must contain at least one message"));
    }
    msgs.into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            let Some(obj) = m.as_object_mut() else {
                return Err(invalid(&format!("messages[{i}]"), "must be an object"));
            };
            if !obj.get("role").is_some_and(Value::is_string) {
                return Err(invalid(
                    &format!("messages[{i}].role"),
                    "is required and must be a string",
                ));
            }
            match obj.get("content") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    obj.insert("content".into(), Value::String(text));
                }
                Some(_) => {
                    return Err(invalid(
                        &format!("messages[{i}].content"),
                        "must be a string or an array of text parts",
                    ))
                }
            }
            Ok(m)
        })
        .collect()
}

async fn chat_completions(State(st): State<Arc<HttpState>>, OpenAiJson(req): OpenAiJson<ChatRequest>) -> Response {
    match chat_inner(st, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat_inner(st: Arc<HttpState>, req: ChatRequest) -> Result<Response, ApiError> {
    let app = &st.app;
    // The model is checked first so a wrong name is a 404 whatever else is wrong.
    if !req.model.is_empty() && req.model != app.model_name {
        return Err(counted(CoordinatorError::ModelNotFound(req.model)));
    }
    let template = match &st.chat {
        ChatSupport::Ready(t) => t,
        ChatSupport::None => {
            return Err(invalid(
                "messages",
                "this model has no chat template; use /v1/completions",
            ))
        }
        ChatSupport::Broken(e) => {
            return Err(invalid(
                "messages",
                format!("this model's chat template is unusable: {e}"),
            ))
        }
    };
    let Some(tok) = app.tokenizer.clone() else {
        return Err(invalid(
            "messages",
            "this model has no tokenizer; use /v1/completions with token ids",
        ));
    };
    req.unsupported.check()?;
    let messages = normalize_messages(req.messages.ok_or_else(|| invalid("messages", "is required"))?)?;
    let text = template
        .render(&messages)
        .map_err(|e| invalid("messages", format!("chat template: {e}")))?;
    let prompt = tokio::task::spawn_blocking(move || tok.encode(&text))
        .await
        .map_err(|e| counted(CoordinatorError::Internal(e.to_string())))?
        .map_err(|e| invalid("messages", e.to_string()))?;
    // OpenAI's default: as many tokens as the context leaves.
    let max_new = max_tokens(
        app,
        req.max_completion_tokens.or(req.max_tokens),
        app.max_context.saturating_sub(prompt.len()).max(1),
    )?;
    let raw = RawRequest {
        model: String::new(),
        text: None,
        token_ids: Some(prompt),
        max_new_tokens: max_new,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        top_k: req.top_k.unwrap_or(-1),
        seed: parse_seed(req.seed.as_ref())?,
        prompt_logprobs: false,
        ignore_eos: req.ignore_eos.unwrap_or(false),
    };
    let (_, events) = RequestTracker::submit(app, raw).await?;
    let shape = ChatShape {
        id: format!("chatcmpl-{:016x}", crate::grpc_api::rand_id()),
        created: unix_now(),
        model: app.model_name.clone(),
        logprobs: req.logprobs.unwrap_or(false),
        top_logprobs: req.top_logprobs.unwrap_or(0) > 0,
    };
    if req.stream.unwrap_or(false) {
        let src = ChatChunks {
            detok: Detokenizer::new(app.tokenizer.clone()),
            st: st.clone(),
            shape,
            include_usage: req.stream_options.unwrap_or_default().include_usage,
            generated: Vec::new(),
        };
        return Ok(sse(src, events));
    }
    chat_response(&st, shape, events).await
}

struct ChatShape {
    id: String,
    created: u64,
    model: String,
    logprobs: bool,
    top_logprobs: bool,
}

/// One entry of chat `logprobs.content`.
fn chat_logprob(text: String, lp: f32, with_top: bool) -> Value {
    let entry = json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    let top = if with_top { vec![entry.clone()] } else { Vec::new() };
    let mut v = entry;
    v["top_logprobs"] = json!(top);
    v
}

async fn chat_response(st: &HttpState, s: ChatShape, mut events: RequestTracker) -> Result<Response, ApiError> {
    let tok = st.app.tokenizer.as_deref();
    let mut ids = Vec::new();
    let mut content = Vec::new();
    let (reason, n_prompt, n_completion) = loop {
        match events.recv().await {
            Some(Event::PromptLogprobs(_)) => {}
            Some(Event::Token { id, logprob }) => {
                ids.push(id);
                if s.logprobs {
                    content.push(chat_logprob(token_text(tok, id), logprob, s.top_logprobs));
                }
            }
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => break (reason, prompt_tokens, completion_tokens),
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(CoordinatorError::Internal("the scheduler dropped the request".into()).into()),
        }
    };
    let body = json!({
        "id": s.id,
        "object": "chat.completion",
        "created": s.created,
        "model": s.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": decode(tok, &ids)},
            "logprobs": if s.logprobs { json!({"content": content}) } else { Value::Null },
            "finish_reason": finish_reason(reason),
        }],
        "usage": usage(n_prompt, n_completion),
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// Streaming chat: the role first, then one content delta per token, then the finish.
struct ChatChunks {
    st: Arc<HttpState>,
    shape: ChatShape,
    detok: Detokenizer,
    include_usage: bool,
    generated: Vec<u32>,
}

impl ChatChunks {
    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        sse_data(&json!({
            "id": self.shape.id,
            "object": "chat.completion.chunk",
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
        }))
    }
}

impl SseSource for ChatChunks {
    fn start(&mut self) -> String {
        self.chunk(json!({"role": "assistant", "content": ""}), Value::Null, None)
    }

    fn on_event(&mut self, ev: Event) -> (String, bool) {
        match ev {
            Event::PromptLogprobs(_) => (String::new(), false),
            Event::Token { id, logprob } => {
                self.generated.push(id);
                let delta = self.detok.push(&[id]);
                let logprobs = if self.shape.logprobs {
                    let text = token_text(self.st.app.tokenizer.as_deref(), id);
                    json!({"content": [chat_logprob(text, logprob, self.shape.top_logprobs)]})
                } else {
                    Value::Null
                };
                (self.chunk(json!({"content": delta}), logprobs, None), false)
            }
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let full = decode(self.st.app.tokenizer.as_deref(), &self.generated);
                let rest = full.strip_prefix(self.detok.text()).unwrap_or_default();
                let delta = if rest.is_empty() {
                    json!({})
                } else {
                    json!({"content": rest})
                };
                let mut out = self.chunk(delta, Value::Null, Some(finish_reason(reason)));
                if self.include_usage {
                    out.push_str(&sse_data(&json!({
                        "id": self.shape.id,
                        "object": "chat.completion.chunk",
                        "created": self.shape.created,
                        "model": self.shape.model,
                        "choices": [],
                        "usage": usage(prompt_tokens, completion_tokens),
                    })));
                }
                out.push_str(SSE_DONE);
                (out, true)
            }
            Event::Failed(e) => (sse_error(e.into()), true),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Models, health, metrics

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

async fn get_model(State(st): State<Arc<HttpState>>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    if id != st.app.model_name {
        return ApiError::from(CoordinatorError::ModelNotFound(id)).into_response();
    }
    json_response(StatusCode::OK, &model_card(&st))
}

async fn health(State(st): State<Arc<HttpState>>) -> Response {
    if st.app.scheduler.healthy() {
        json_response(StatusCode::OK, &json!({"status": "ok"}))
    } else {
        ApiError::from(CoordinatorError::Unavailable("a pipeline stage is down".into())).into_response()
    }
}

async fn prometheus(State(st): State<Arc<HttpState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        metrics::render(&st.app.scheduler),
    )
        .into_response()
}
