//! A model's chat template: HF Jinja read from the model folder, rendered with minijinja
//! and Python string methods (`.strip()`, `.startswith()`…).

use std::path::Path;

use serde_json::Value;
use worker::tokenizer::TextTokenizer;

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
