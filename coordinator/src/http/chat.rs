//! `/v1/chat/completions`, served when the model ships a usable chat template.

use std::path::Path;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::tokenizer::TextTokenizer;

use super::chat_template::ChatTemplate;
use super::errors::{counted, invalid, ApiError, OpenAiJson};
use super::logprobs::chat_logprob;
use super::request::{
    collect, decode, finish_reason, max_tokens, parse_seed, token_text, Envelope, StreamOptions, Unsupported,
};
use super::sse::{sse, sse_data, SseSource, StreamText};
use super::HttpState;
use crate::app::RawRequest;
use crate::error::CoordinatorError;
use crate::metrics::RequestTracker;
use crate::scheduler::FinishReason;
use crate::telemetry::RequestOrigin;

/// Whether chat requests can be served.
pub(super) enum ChatSupport {
    /// The model folder has no chat template.
    None,
    /// The template did not compile; chat requests get this message.
    Broken(String),
    /// A usable template.
    Ready(Box<ChatTemplate>),
}

impl ChatSupport {
    /// Reads the chat template from `model_dir`.
    pub(super) fn load(model_dir: &Path, tok: Option<&TextTokenizer>) -> Self {
        match ChatTemplate::load(model_dir, tok) {
            Ok(Some(t)) => ChatSupport::Ready(Box::new(t)),
            Ok(None) => ChatSupport::None,
            Err(e) => {
                // A bad template must not stop completions from being served.
                tracing::warn!(error = %e, "chat template unusable; /v1/chat/completions is disabled");
                ChatSupport::Broken(e)
            }
        }
    }

    fn template(&self) -> Result<&ChatTemplate, ApiError> {
        match self {
            ChatSupport::Ready(t) => Ok(t),
            ChatSupport::None => Err(invalid(
                "messages",
                "this model has no chat template; use /v1/completions",
            )),
            ChatSupport::Broken(e) => Err(invalid(
                "messages",
                format!("this model's chat template is unusable: {e}"),
            )),
        }
    }
}

#[derive(Deserialize)]
pub(super) struct ChatRequest {
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

/// Text parts of a message's `content` joined into one string (templates expect one).
fn join_text_parts(i: usize, parts: &[Value]) -> Result<String, ApiError> {
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
    Ok(text)
}

/// Messages with content given as text parts flattened to a string.
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
                    let text = join_text_parts(i, parts)?;
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

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(
    State(st): State<Arc<HttpState>>,
    Extension(mut origin): Extension<RequestOrigin>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    origin.operation = "chat";
    let app = &st.app;
    // The model is checked first so a wrong name is a 404 whatever else is wrong.
    if !req.model.is_empty() && req.model != app.model_name {
        return Err(counted(CoordinatorError::ModelNotFound(req.model)));
    }
    let template = st.chat.template()?;
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
    let (_, events) = RequestTracker::submit(app, raw, &origin).await?;
    let stream = req.stream.unwrap_or(false);
    let object = if stream {
        "chat.completion.chunk"
    } else {
        "chat.completion"
    };
    let shape = ChatShape {
        env: Envelope::new("chatcmpl", object, &app.model_name),
        logprobs: req.logprobs.unwrap_or(false),
        top_logprobs: req.top_logprobs.unwrap_or(0) > 0,
    };
    if stream {
        let src = ChatChunks {
            text: StreamText::new(app.tokenizer.clone()),
            shape,
        };
        return Ok(sse(src, events, req.stream_options.unwrap_or_default().include_usage));
    }
    chat_response(app.tokenizer.as_deref(), shape, events).await
}

struct ChatShape {
    env: Envelope,
    logprobs: bool,
    top_logprobs: bool,
}

async fn chat_response(
    tok: Option<&TextTokenizer>,
    s: ChatShape,
    events: RequestTracker,
) -> Result<Response, ApiError> {
    let out = collect(events).await?;
    let logprobs = if s.logprobs {
        let content: Vec<Value> = out
            .ids
            .iter()
            .zip(&out.logprobs)
            .map(|(id, lp)| chat_logprob(token_text(tok, *id), *lp, s.top_logprobs))
            .collect();
        json!({ "content": content })
    } else {
        Value::Null
    };
    let choice = json!({
        "index": 0,
        "message": {"role": "assistant", "content": decode(tok, &out.ids)},
        "logprobs": logprobs,
        "finish_reason": finish_reason(out.reason),
    });
    Ok(s.env.response(choice, &out))
}

/// Streaming chat: the role first, then one content delta per token, then the finish.
struct ChatChunks {
    shape: ChatShape,
    text: StreamText,
}

impl ChatChunks {
    fn chunk(&self, delta: Value, logprobs: Value, finish: Option<&str>) -> String {
        let choice = json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish});
        sse_data(&self.shape.env.with_choices(json!([choice])))
    }
}

impl SseSource for ChatChunks {
    fn envelope(&self) -> &Envelope {
        &self.shape.env
    }

    fn start(&mut self) -> String {
        self.chunk(json!({"role": "assistant", "content": ""}), Value::Null, None)
    }

    fn prompt_logprobs(&mut self, _lps: Vec<Option<f32>>) -> String {
        // Chat never asks for them.
        String::new()
    }

    fn token(&mut self, id: u32, logprob: f32) -> String {
        let delta = self.text.push(id);
        let logprobs = if self.shape.logprobs {
            let text = token_text(self.text.tokenizer(), id);
            json!({"content": [chat_logprob(text, logprob, self.shape.top_logprobs)]})
        } else {
            Value::Null
        };
        self.chunk(json!({"content": delta}), logprobs, None)
    }

    fn finish(&mut self, reason: FinishReason) -> String {
        let rest = self.text.rest();
        let delta = if rest.is_empty() {
            json!({})
        } else {
            json!({"content": rest})
        };
        self.chunk(delta, Value::Null, Some(finish_reason(reason)))
    }
}
