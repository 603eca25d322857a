//! `/v1/completions`: text or token-id prompts, `echo` and `logprobs` with OpenAI's
//! semantics, `return_token_ids`, and SSE streaming.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};
use worker::tokenizer::TextTokenizer;

use super::errors::{invalid, ApiError, OpenAiJson};
use super::logprobs::CompletionLogprobs;
use super::request::{
    collect, decode, finish_reason, max_tokens, parse_seed, token_text, Envelope, StreamOptions, Unsupported,
};
use super::sse::{sse, sse_data, SseSource, StreamText};
use super::HttpState;
use crate::app::RawRequest;
use crate::metrics::RequestTracker;
use crate::scheduler::FinishReason;
use crate::telemetry::RequestOrigin;

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
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

const PROMPT_SHAPES: &str = "must be a string, an array of token ids, or a one-element array of either";

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
                Some(Value::Array(inner)) if !inner.iter().all(Value::is_number) => {
                    Err(invalid("prompt", PROMPT_SHAPES))
                }
                // `None` cannot happen (an empty array is "all numbers"); it reads as missing.
                inner => parse_prompt(inner),
            }
        }
        _ => Err(invalid("prompt", PROMPT_SHAPES)),
    }
}

/// What the completions response needs besides the events.
struct CompletionShape {
    env: Envelope,
    /// The prompt's text to prepend (`echo`).
    echo: Option<String>,
    prompt: Vec<u32>,
    logprobs: bool,
    return_token_ids: bool,
}

/// `POST /v1/completions`.
pub(super) async fn completions(
    State(st): State<Arc<HttpState>>,
    Extension(origin): Extension<RequestOrigin>,
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
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
    let (prompt, events) = RequestTracker::submit(app, raw, &origin).await?;
    let tok = app.tokenizer.as_deref();
    let shape = CompletionShape {
        env: Envelope::new("cmpl", "text_completion", &app.model_name),
        echo: echo.then(|| text.unwrap_or_else(|| decode(tok, &prompt))),
        prompt,
        logprobs: req.logprobs.is_some(),
        return_token_ids: req.return_token_ids.unwrap_or(false),
    };
    if req.stream.unwrap_or(false) {
        let src = CompletionChunks {
            text: StreamText::new(app.tokenizer.clone()),
            shape,
            prompt_sent: false,
            offset: 0,
        };
        return Ok(sse(src, events, req.stream_options.unwrap_or_default().include_usage));
    }
    completion_response(tok, shape, events).await
}

async fn completion_response(
    tok: Option<&TextTokenizer>,
    s: CompletionShape,
    events: RequestTracker,
) -> Result<Response, ApiError> {
    let out = collect(events).await?;
    let mut text = String::new();
    let mut logprobs = CompletionLogprobs::default();
    let mut offset = 0;
    if let Some(echo) = &s.echo {
        if s.logprobs {
            logprobs.push_prompt(tok, &s.prompt, out.prompt_logprobs.as_deref());
        }
        text.push_str(echo);
        // Generated tokens' offsets count from the end of the echoed text.
        offset = echo.chars().count();
    }
    text.push_str(&decode(tok, &out.ids));
    if s.logprobs {
        for (id, lp) in out.ids.iter().zip(&out.logprobs) {
            offset = logprobs.push(token_text(tok, *id), Some(*lp), offset);
        }
    }
    let mut choice = json!({
        "index": 0,
        "text": text,
        "logprobs": if s.logprobs { logprobs.to_json() } else { Value::Null },
        "finish_reason": finish_reason(out.reason),
    });
    if s.return_token_ids {
        choice["token_ids"] = json!(out.ids);
        if s.echo.is_some() {
            choice["prompt_token_ids"] = json!(s.prompt);
        }
    }
    Ok(s.env.response(choice, &out))
}

/// Streaming completions: one chunk per token, the echoed prompt first, the finish reason
/// in a last chunk of its own.
struct CompletionChunks {
    shape: CompletionShape,
    text: StreamText,
    prompt_sent: bool,
    /// Characters of text streamed so far (for `text_offset`).
    offset: usize,
}

impl CompletionChunks {
    fn chunk(&self, text: &str, logprobs: Value, finish: Option<&str>, ids: (&str, &[u32])) -> String {
        let mut choice = json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish});
        if self.shape.return_token_ids {
            choice[ids.0] = json!(ids.1);
        }
        sse_data(&self.shape.env.with_choices(json!([choice])))
    }

    /// The echoed prompt, with its logprobs when they are known.
    fn prompt_chunk(&mut self, plps: Option<&[Option<f32>]>) -> String {
        self.prompt_sent = true;
        let Some(echo) = self.shape.echo.clone() else {
            return String::new();
        };
        let logprobs = if self.shape.logprobs {
            let mut lp = CompletionLogprobs::default();
            lp.push_prompt(self.text.tokenizer(), &self.shape.prompt, plps);
            lp.to_json()
        } else {
            Value::Null
        };
        self.offset = echo.chars().count();
        self.chunk(&echo, logprobs, None, ("prompt_token_ids", &self.shape.prompt))
    }

    /// The echoed prompt if it has not gone out yet (its logprobs are no longer coming).
    fn pending_prompt(&mut self) -> String {
        if self.prompt_sent {
            String::new()
        } else {
            self.prompt_chunk(None)
        }
    }
}

impl SseSource for CompletionChunks {
    fn envelope(&self) -> &Envelope {
        &self.shape.env
    }

    fn start(&mut self) -> String {
        // Without prompt logprobs to wait for, the echo goes out at once.
        if self.shape.echo.is_some() && !self.shape.logprobs {
            self.prompt_chunk(None)
        } else {
            String::new()
        }
    }

    fn prompt_logprobs(&mut self, lps: Vec<Option<f32>>) -> String {
        if self.prompt_sent {
            String::new()
        } else {
            self.prompt_chunk(Some(&lps))
        }
    }

    fn token(&mut self, id: u32, logprob: f32) -> String {
        let mut out = self.pending_prompt();
        let delta = self.text.push(id);
        let logprobs = if self.shape.logprobs {
            let mut lp = CompletionLogprobs::default();
            self.offset = lp.push(token_text(self.text.tokenizer(), id), Some(logprob), self.offset);
            lp.to_json()
        } else {
            Value::Null
        };
        out.push_str(&self.chunk(&delta, logprobs, None, ("token_ids", &[id])));
        out
    }

    fn finish(&mut self, reason: FinishReason) -> String {
        let mut out = self.pending_prompt();
        let rest = self.text.rest();
        out.push_str(&self.chunk(&rest, Value::Null, Some(finish_reason(reason)), ("token_ids", &[])));
        out
    }
}
