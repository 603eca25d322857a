//! OpenAI's two logprobs shapes: the legacy completions object (with `echo`'s prompt
//! tokens and character offsets) and chat's `logprobs.content` entries.

use serde_json::{json, Map, Value};
use worker::tokenizer::TextTokenizer;

use super::request::token_text;

/// The legacy completions `logprobs` object, built token by token.
#[derive(Default)]
pub(super) struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Adds a token whose text starts at character `offset`; returns the offset after it.
    pub(super) fn push(&mut self, text: String, lp: Option<f32>, offset: usize) -> usize {
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

    /// Adds the echoed prompt's tokens from offset 0, with their logprobs where known (the
    /// first token never has one).
    pub(super) fn push_prompt(&mut self, tok: Option<&TextTokenizer>, prompt: &[u32], lps: Option<&[Option<f32>]>) {
        let mut offset = 0;
        for (i, t) in prompt.iter().enumerate() {
            let lp = lps.and_then(|p| p.get(i).copied().flatten());
            offset = self.push(token_text(tok, *t), lp, offset);
        }
    }

    /// The JSON object.
    pub(super) fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// One entry of chat `logprobs.content`.
pub(super) fn chat_logprob(text: String, lp: f32, with_top: bool) -> Value {
    let entry = json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    let top = if with_top { vec![entry.clone()] } else { Vec::new() };
    let mut v = entry;
    v["top_logprobs"] = json!(top);
    v
}
