//! Reading a calibration set: JSON lines of `{"token_ids": [...]}` or `{"text": "..."}`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use proto::v1::{self as pb, calibration_sample::Input};
use serde_json::Value;

/// Parses one calibration file; errors name the file, the line and what is wrong.
pub fn read_samples(path: &Path) -> Result<Vec<pb::CalibrationSample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--data {}", path.display()))?;
    let samples = parse_samples(&text).with_context(|| format!("--data {}", path.display()))?;
    if samples.is_empty() {
        bail!("--data {}: no samples (one JSON object per line)", path.display());
    }
    Ok(samples)
}

/// Parses JSON lines; blank lines are skipped.
pub fn parse_samples(text: &str) -> Result<Vec<pb::CalibrationSample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {line_no}: not valid JSON"))?;
        let input = match (v.get("token_ids"), v.get("text")) {
            (Some(_), Some(_)) => bail!("line {line_no}: give either \"token_ids\" or \"text\", not both"),
            (Some(ids), None) => {
                let Some(arr) = ids.as_array() else {
                    bail!("line {line_no}: \"token_ids\" must be a list of token ids");
                };
                let ids = arr
                    .iter()
                    .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .with_context(|| format!("line {line_no}: \"token_ids\" must hold integers in 0..2^32"))?;
                Input::TokenIds(pb::TokenIdList { ids })
            }
            (None, Some(t)) => match t.as_str() {
                Some(t) => Input::Text(t.to_string()),
                None => bail!("line {line_no}: \"text\" must be a string"),
            },
            (None, None) => bail!("line {line_no}: needs \"token_ids\" or \"text\""),
        };
        out.push(pb::CalibrationSample { input: Some(input) });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_and_text_lines() {
        let s = parse_samples("{\"token_ids\": [1, 2, 3]}\n\n{\"text\": \"hi\"}\n").unwrap();
        assert_eq!(s.len(), 2);
        assert!(matches!(&s[0].input, Some(Input::TokenIds(t)) if t.ids == [1, 2, 3]));
        assert!(matches!(&s[1].input, Some(Input::Text(t)) if t == "hi"));
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, needle) in [
            ("{\"token_ids\": [1, -2]}", "line 1"),
            ("\n{\"foo\": 1}", "line 2"),
            ("nope", "not valid JSON"),
            ("{\"text\": 5}", "must be a string"),
            ("{\"text\": \"a\", \"token_ids\": [1]}", "not both"),
        ] {
            let e = format!("{:#}", parse_samples(text).unwrap_err());
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
