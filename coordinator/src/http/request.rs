//! What `/v1/completions` and `/v1/chat/completions` share: option parsing, the response
//! envelope, token text, and reading a request's events to the end.

use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use worker::tokenizer::TextTokenizer;

use super::errors::{dropped, invalid, json_response, ApiError};
use super::unix_now;
use crate::app::App;
use crate::metrics::RequestTracker;
use crate::scheduler::{Event, FinishReason};

/// An integer seed that may be negative (OpenAI clients send any 64-bit integer).
pub(super) fn parse_seed(v: Option<&serde_json::Number>) -> Result<Option<u64>, ApiError> {
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
pub(super) struct Unsupported {
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
    /// Refuses the first option set to something other than its neutral value.
    pub(super) fn check(&self) -> Result<(), ApiError> {
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

/// OpenAI's `stream_options`.
#[derive(Deserialize, Default, Clone, Copy)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// `max_tokens` bounded before it reaches [`App::prepare`], whose sum of prompt and
/// completion lengths must not overflow.
pub(super) fn max_tokens(app: &App, v: Option<u64>, default: usize) -> Result<usize, ApiError> {
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
pub(super) fn token_text(tok: Option<&TextTokenizer>, id: u32) -> String {
    match tok {
        Some(t) => t.decode(&[id]).unwrap_or_default(),
        None => format!("token_id:{id}"),
    }
}

/// The text of `ids` ("" without a tokenizer).
pub(super) fn decode(tok: Option<&TextTokenizer>, ids: &[u32]) -> String {
    tok.and_then(|t| t.decode(ids).ok()).unwrap_or_default()
}

/// OpenAI's `finish_reason` string.
pub(super) fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}

/// OpenAI's `usage` object.
pub(super) fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The fields every response object (or stream chunk) of one request carries.
pub(super) struct Envelope {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
}

impl Envelope {
    /// A fresh id `{prefix}-…`, created now, for objects of type `object`.
    pub(super) fn new(prefix: &str, object: &'static str, model: &str) -> Self {
        Envelope {
            id: format!("{prefix}-{:016x}", crate::grpc_api::rand_id()),
            object,
            created: unix_now(),
            model: model.to_string(),
        }
    }

    /// The object with these `choices`.
    pub(super) fn with_choices(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The non-streaming response: one choice, and the usage of `out`.
    pub(super) fn response(&self, choice: Value, out: &Collected) -> Response {
        let body = self.with_usage(json!([choice]), out.prompt_tokens, out.completion_tokens);
        json_response(StatusCode::OK, &body)
    }

    /// The object with these `choices` and a `usage`.
    pub(super) fn with_usage(&self, choices: Value, prompt: usize, completion: usize) -> Value {
        let mut v = self.with_choices(choices);
        v["usage"] = usage(prompt, completion);
        v
    }
}

/// Everything a request produced, for the non-streaming responses.
pub(super) struct Collected {
    /// Prompt logprobs, when they were asked for.
    pub prompt_logprobs: Option<Vec<Option<f32>>>,
    /// Generated ids.
    pub ids: Vec<u32>,
    /// Their logprobs.
    pub logprobs: Vec<f32>,
    pub reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Reads a request's events to its end.
pub(super) async fn collect(mut events: RequestTracker) -> Result<Collected, ApiError> {
    let mut prompt_logprobs = None;
    let mut ids = Vec::new();
    let mut logprobs = Vec::new();
    loop {
        match events.recv().await {
            Some(Event::PromptLogprobs(l)) => prompt_logprobs = Some(l),
            Some(Event::Token { id, logprob }) => {
                ids.push(id);
                logprobs.push(logprob);
            }
            Some(Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                return Ok(Collected {
                    prompt_logprobs,
                    ids,
                    logprobs,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                })
            }
            // Already counted by the tracker.
            Some(Event::Failed(e)) => return Err(e.into()),
            None => return Err(dropped()),
        }
    }
}
