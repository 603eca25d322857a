//! What both public front ends share: the served model's limits, tokenization (off the
//! async executor), validation with messages that name the field and the limit, and
//! incremental detokenization.

use std::path::Path;
use std::sync::Arc;

use worker::tokenizer::TextTokenizer;

use crate::error::CoordinatorError;
use crate::scheduler::{SchedulerHandle, SubmitRequest};

/// A request before validation, as either front end parsed it.
#[derive(Clone, Debug, Default)]
pub struct RawRequest {
    /// Requested model name ("" = the served one).
    pub model: String,
    /// Text prompt.
    pub text: Option<String>,
    /// Token-id prompt.
    pub token_ids: Option<Vec<u32>>,
    /// Tokens to generate.
    pub max_new_tokens: usize,
    /// Temperature.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Top-k (0 = off).
    pub top_k: i64,
    /// Seed.
    pub seed: Option<u64>,
    /// Prompt logprobs wanted.
    pub prompt_logprobs: bool,
    /// Ignore EOS.
    pub ignore_eos: bool,
}

/// The served model and its limits.
pub struct App {
    /// Served model name.
    pub model_name: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Context limit.
    pub max_context: usize,
    /// Tokenizer, when the model ships one.
    pub tokenizer: Option<Arc<TextTokenizer>>,
    /// The scheduler.
    pub scheduler: SchedulerHandle,
}

impl App {
    /// Reads limits and tokenizer from the model folder.
    pub fn new(model_dir: &Path, model_name: String, scheduler: SchedulerHandle) -> anyhow::Result<Self> {
        let cfg = worker::ModelConfig::from_dir(model_dir)?;
        Ok(App {
            model_name,
            vocab_size: cfg.vocab_size,
            max_context: cfg.max_position_embeddings,
            tokenizer: TextTokenizer::from_dir(model_dir)?.map(Arc::new),
            scheduler,
        })
    }

    /// The active IndexCache pattern (operators may change it at run time).
    pub fn pattern(&self) -> String {
        self.scheduler.control().pattern().pattern.to_string()
    }

    /// Validates and tokenizes a request.
    pub async fn prepare(&self, r: RawRequest) -> Result<SubmitRequest, CoordinatorError> {
        if !r.model.is_empty() && r.model != self.model_name {
            return Err(CoordinatorError::ModelNotFound(r.model));
        }
        let prompt = match (r.text, r.token_ids) {
            (Some(_), Some(_)) => {
                return Err(CoordinatorError::invalid(
                    "prompt",
                    "give either text or token ids, not both",
                ))
            }
            (Some(text), None) => {
                let tok = self.tokenizer.clone().ok_or_else(|| {
                    CoordinatorError::invalid("prompt", "this model has no tokenizer; send token ids")
                })?;
                tokio::task::spawn_blocking(move || tok.encode(&text))
                    .await
                    .map_err(|e| CoordinatorError::Internal(e.to_string()))?
                    .map_err(|e| CoordinatorError::invalid("prompt", e.to_string()))?
            }
            (None, Some(ids)) => ids,
            (None, None) => return Err(CoordinatorError::invalid("prompt", "is required")),
        };
        if prompt.is_empty() {
            return Err(CoordinatorError::invalid("prompt", "must contain at least one token"));
        }
        if let Some((i, t)) = prompt.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab_size) {
            return Err(CoordinatorError::invalid(
                "prompt",
                format!(
                    "token id {t} at index {i} is outside the vocabulary (vocab_size = {})",
                    self.vocab_size
                ),
            ));
        }
        if r.max_new_tokens == 0 && !r.prompt_logprobs {
            return Err(CoordinatorError::invalid("max_tokens", "must be at least 1"));
        }
        let total = prompt.len() + r.max_new_tokens;
        if total > self.max_context {
            return Err(CoordinatorError::invalid(
                "max_tokens",
                format!(
                    "This model's maximum context length is {} tokens. However, you requested {total} tokens ({} in the prompt, {} for the completion).",
                    self.max_context,
                    prompt.len(),
                    r.max_new_tokens
                ),
            ));
        }
        if !r.temperature.is_finite() || r.temperature < 0.0 {
            return Err(CoordinatorError::invalid(
                "temperature",
                format!("must be ≥ 0, got {}", r.temperature),
            ));
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            return Err(CoordinatorError::invalid(
                "top_p",
                format!("must be in (0, 1], got {}", r.top_p),
            ));
        }
        if r.top_k < -1 || r.top_k > u32::MAX as i64 {
            return Err(CoordinatorError::invalid(
                "top_k",
                format!("must be -1, 0 (off) or a positive count, got {}", r.top_k),
            ));
        }
        let seed = r.seed.unwrap_or_else(|| {
            use std::time::{SystemTime, UNIX_EPOCH};
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(SubmitRequest {
            prompt,
            max_new_tokens: r.max_new_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k.max(0) as u32,
            seed,
            prompt_logprobs: r.prompt_logprobs,
            ignore_eos: r.ignore_eos,
            pattern: None,
            // Set by the request tracker, which owns the request's span.
            trace: Default::default(),
        })
    }
}

/// Turns a growing list of generated ids into text deltas (a token may complete a UTF-8
/// character only together with the next one).
pub struct Detokenizer {
    tok: Option<Arc<TextTokenizer>>,
    ids: Vec<u32>,
    emitted: String,
}

impl Detokenizer {
    /// A detokenizer for one sequence.
    pub fn new(tok: Option<Arc<TextTokenizer>>) -> Self {
        Detokenizer {
            tok,
            ids: Vec::new(),
            emitted: String::new(),
        }
    }

    /// Adds tokens; returns the new text, holding back an incomplete character.
    pub fn push(&mut self, ids: &[u32]) -> String {
        self.ids.extend_from_slice(ids);
        let Some(tok) = &self.tok else { return String::new() };
        let text = tok.decode(&self.ids).unwrap_or_default();
        if text.ends_with('\u{FFFD}') || !text.starts_with(&self.emitted) {
            return String::new();
        }
        let delta = text[self.emitted.len()..].to_string();
        self.emitted = text;
        delta
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }
}
