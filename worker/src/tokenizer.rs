//! Text ↔ token ids through a model's `tokenizer.json` (HF `tokenizers`).

use std::path::Path;

use crate::error::{Result, WorkerError};

/// A loaded tokenizer.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json`; `Ok(None)` when the model ships none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| WorkerError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Some(TextTokenizer { inner }))
    }

    /// Encodes text, adding the special tokens the tokenizer's post-processor defines (BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| WorkerError::Tokenizer(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| WorkerError::Tokenizer(format!("decoding failed: {e}")))
    }
}

/// The error for a text prompt on a model without a tokenizer.
pub fn missing_tokenizer(dir: &Path) -> WorkerError {
    WorkerError::Tokenizer(format!(
        "{} has no tokenizer.json, so text prompts are not available for this model; pass token ids instead (--prompt-ids 1,2,3)",
        dir.display()
    ))
}
