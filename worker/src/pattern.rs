//! The IndexCache pattern: which layers run the lightning indexer (Full) and which reuse the
//! top-k indices of the nearest preceding Full layer (Shared).

use std::fmt;

use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};

/// Whether a layer runs its own indexer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// Runs the lightning indexer and selects its own top-k keys.
    Full,
    /// Reuses the top-k indices of the nearest preceding Full layer.
    Shared,
}

/// A per-layer string over {F, S}; layer 0 is always F.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexPattern(Vec<LayerKind>);

/// Where the active pattern came from (reported to operators).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternSource {
    /// The serving configuration's override.
    Override,
    /// `indexer_types` in config.json.
    IndexerTypes,
    /// `index_topk_pattern` in config.json.
    IndexTopkPattern,
    /// `index_topk_freq` (+ `index_skip_topk_offset`) in config.json.
    IndexTopkFreq,
    /// Nothing configured: every layer is Full.
    AllFull,
}

impl IndexPattern {
    /// Every layer Full.
    pub fn all_full(layers: usize) -> Self {
        IndexPattern(vec![LayerKind::Full; layers])
    }

    /// Parses "FSSF…" (case-insensitive) and checks it against the layer count.
    pub fn parse(s: &str, layers: usize) -> Result<Self> {
        let kinds = s
            .chars()
            .enumerate()
            .map(|(i, c)| match c.to_ascii_uppercase() {
                'F' => Ok(LayerKind::Full),
                'S' => Ok(LayerKind::Shared),
                other => Err(WorkerError::Pattern(format!(
                    "character {i} is {other:?}; only 'F' (Full) and 'S' (Shared) are allowed"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_kinds(kinds, layers)
    }

    /// Validates a per-layer list: right length, layer 0 Full.
    pub fn from_kinds(kinds: Vec<LayerKind>, layers: usize) -> Result<Self> {
        if kinds.len() != layers {
            return Err(WorkerError::Pattern(format!(
                "has {} entries but the model has num_hidden_layers = {layers}",
                kinds.len()
            )));
        }
        if kinds.first() != Some(&LayerKind::Full) {
            return Err(WorkerError::Pattern(
                "layer 0 must be F: a Shared layer needs a preceding Full layer".into(),
            ));
        }
        Ok(IndexPattern(kinds))
    }

    /// Resolves the pattern: the override first, then config.json's sources in DESIGN order.
    pub fn resolve(cfg: &ModelConfig, override_pattern: Option<&str>) -> Result<(Self, PatternSource)> {
        let n = cfg.num_hidden_layers;
        if let Some(p) = override_pattern {
            return Ok((Self::parse(p, n)?, PatternSource::Override));
        }
        let raw = &cfg.raw;
        let wrap = |field: &str, e: WorkerError| cfg.field_error(field, e.to_string());
        if let Some(v) = raw.get("indexer_types").filter(|v| !v.is_null()) {
            let Value::Array(items) = v else {
                return Err(cfg.field_error("indexer_types", format!("expected a list, found {v}")));
            };
            let kinds = items
                .iter()
                .map(|x| match x.as_str() {
                    Some("full") => Ok(LayerKind::Full),
                    Some("shared") => Ok(LayerKind::Shared),
                    _ => Err(cfg.field_error(
                        "indexer_types",
                        format!("entries must be \"full\" or \"shared\", found {x}"),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            let p = Self::from_kinds(kinds, n).map_err(|e| wrap("indexer_types", e))?;
            return Ok((p, PatternSource::IndexerTypes));
        }
        if let Some(v) = raw.get("index_topk_pattern").filter(|v| !v.is_null()) {
            let p = match v {
                Value::String(s) => Self::parse(s, n),
                Value::Array(items) => {
                    let s: String = items.iter().map(|x| x.as_str().unwrap_or("?").to_string()).collect();
                    Self::parse(&s, n)
                }
                other => Err(WorkerError::Pattern(format!("expected a string, found {other}"))),
            }
            .map_err(|e| wrap("index_topk_pattern", e))?;
            return Ok((p, PatternSource::IndexTopkPattern));
        }
        if let Some(v) = raw.get("index_topk_freq").filter(|v| !v.is_null()) {
            let freq = v
                .as_u64()
                .ok_or_else(|| cfg.field_error("index_topk_freq", format!("expected a positive integer, found {v}")))?
                .max(1) as usize;
            let offset = match raw.get("index_skip_topk_offset").filter(|v| !v.is_null()) {
                None => 2usize,
                Some(o) => o.as_u64().ok_or_else(|| {
                    cfg.field_error(
                        "index_skip_topk_offset",
                        format!("expected a non-negative integer, found {o}"),
                    )
                })? as usize,
            };
            let kinds = (0..n)
                .map(|i| {
                    let shifted = (i + 1).saturating_sub(offset);
                    if shifted % freq == 0 {
                        LayerKind::Full
                    } else {
                        LayerKind::Shared
                    }
                })
                .collect();
            let p = Self::from_kinds(kinds, n).map_err(|e| wrap("index_topk_freq", e))?;
            return Ok((p, PatternSource::IndexTopkFreq));
        }
        Ok((Self::all_full(n), PatternSource::AllFull))
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True for an empty pattern (never for a validated one).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The kind of layer `i`.
    pub fn kind(&self, i: usize) -> LayerKind {
        self.0[i]
    }

    /// Whether layer `i` runs the indexer.
    pub fn is_full(&self, i: usize) -> bool {
        self.0[i] == LayerKind::Full
    }

    /// All kinds in layer order.
    pub fn kinds(&self) -> &[LayerKind] {
        &self.0
    }

    /// Number of Full layers.
    pub fn full_count(&self) -> usize {
        self.0.iter().filter(|k| **k == LayerKind::Full).count()
    }
}

impl fmt::Display for IndexPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for k in &self.0 {
            f.write_str(match k {
                LayerKind::Full => "F",
                LayerKind::Shared => "S",
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg_with(extra: &str) -> ModelConfig {
        let text = format!(
            r#"{{"model_type":"glm_moe_dsa","vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "moe_intermediate_size":4,"num_hidden_layers":6,"num_attention_heads":2,"q_lora_rank":4,
            "kv_lora_rank":4,"qk_nope_head_dim":2,"qk_rope_head_dim":2,"v_head_dim":2,
            "n_routed_experts":4,"num_experts_per_tok":2,"max_position_embeddings":64,
            "index_n_heads":2,"index_head_dim":4,"index_topk":4{extra}}}"#
        );
        ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap()
    }

    #[test]
    fn sources_in_priority_order() {
        let c = cfg_with(r#","indexer_types":["full","shared","full","shared","shared","full"],"index_topk_freq":2"#);
        let (p, src) = IndexPattern::resolve(&c, None).unwrap();
        assert_eq!(p.to_string(), "FSFSSF");
        assert_eq!(src, PatternSource::IndexerTypes);
        let (p, src) = IndexPattern::resolve(&c, Some("ffffff")).unwrap();
        assert_eq!(p.to_string(), "FFFFFF");
        assert_eq!(src, PatternSource::Override);
        let c = cfg_with(r#","index_topk_pattern":"FFSSFS""#);
        assert_eq!(IndexPattern::resolve(&c, None).unwrap().0.to_string(), "FFSSFS");
        let c = cfg_with("");
        assert_eq!(IndexPattern::resolve(&c, None).unwrap().0.to_string(), "FFFFFF");
    }

    #[test]
    fn freq_and_offset_formula() {
        // Layer i is Full iff max(i - offset + 1, 0) % freq == 0.
        let c = cfg_with(r#","index_topk_freq":2"#);
        assert_eq!(IndexPattern::resolve(&c, None).unwrap().0.to_string(), "FFSFSF");
        let c = cfg_with(r#","index_topk_freq":4,"index_skip_topk_offset":1"#);
        assert_eq!(IndexPattern::resolve(&c, None).unwrap().0.to_string(), "FSSSFS");
    }

    #[test]
    fn invalid_patterns_are_named() {
        let e = IndexPattern::parse("FSS", 6).unwrap_err().to_string();
        assert!(e.contains("3 entries") && e.contains("num_hidden_layers = 6"), "{e}");
        let e = IndexPattern::parse("SFFFFF", 6).unwrap_err().to_string();
        assert!(e.contains("layer 0 must be F"), "{e}");
        let e = IndexPattern::parse("FXFFFF", 6).unwrap_err().to_string();
        assert!(e.contains("character 1"), "{e}");
        let c = cfg_with(r#","indexer_types":["shared","full","full","full","full","full"]"#);
        let e = IndexPattern::resolve(&c, None).unwrap_err().to_string();
        assert!(e.contains("indexer_types") && e.contains("layer 0"), "{e}");
    }
}
