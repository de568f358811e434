//! Transformer shapes the cost model needs, with presets for common models.

/// A decoder-only transformer (Llama-style: RMSNorm, RoPE, grouped-query
/// attention, SwiGLU).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// SwiGLU intermediate size.
    pub ffn: u32,
    pub vocab: u32,
    /// The output projection is the embedding's table (a Hugging Face
    /// config's `tie_word_embeddings`): one matrix of vocab × hidden fewer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tied_embeddings: bool,
}

/// What is wrong with a model description.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("unknown model preset {name:?} (known: llama-7b, llama-13b, llama-70b, tiny)")]
    UnknownPreset { name: String },
    #[error("model {name}: {field} must be at least 1")]
    Zero { name: String, field: &'static str },
    #[error("model {name}: hidden size {hidden} is not divisible by {heads} heads")]
    HiddenNotDivisible {
        name: String,
        hidden: u32,
        heads: u32,
    },
    #[error("model {name}: {heads} heads are not divisible by {kv_heads} kv heads")]
    HeadsNotDivisible {
        name: String,
        heads: u32,
        kv_heads: u32,
    },
    #[error("model {name}: config.json's {field} {message}")]
    ConfigField {
        name: String,
        field: &'static str,
        message: String,
    },
}

impl ModelError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "model_description"
    }
}

impl ModelSpec {
    /// Names of the presets.
    pub const PRESETS: [&'static str; 4] = ["llama-7b", "llama-13b", "llama-70b", "tiny"];

    /// A model preset by name.
    ///
    /// LLaMA-7B and -13B: Touvron et al. 2023, "LLaMA", Table 2 (32 layers of 4096
    /// with 32 heads; 40 layers of 5120 with 40 heads; SwiGLU 2/3·4h rounded to
    /// 11008 and 13824; 32,000-token vocabulary). LLaMA-70B: Touvron et al. 2023,
    /// "Llama 2" (80 layers of 8192, 64 heads with 8 KV heads, SwiGLU 28672).
    /// `tiny` is the trainer's CPU test model.
    pub fn preset(name: &str) -> Result<ModelSpec, ModelError> {
        let (layers, hidden, heads, kv_heads, ffn, vocab) = match name {
            "llama-7b" => (32, 4096, 32, 32, 11008, 32000),
            "llama-13b" => (40, 5120, 40, 40, 13824, 32000),
            "llama-70b" => (80, 8192, 64, 8, 28672, 32000),
            "tiny" => (2, 64, 4, 2, 176, 257),
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                });
            }
        };
        let spec = ModelSpec {
            name: name.to_string(),
            layers,
            hidden,
            heads,
            kv_heads,
            ffn,
            vocab,
            tied_embeddings: false,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The shapes of a Hugging Face model from its `config.json`
    /// (`hidden_size`, `num_hidden_layers`, `num_attention_heads`,
    /// `num_key_value_heads`, `intermediate_size`, `vocab_size`), so that the
    /// planner prices the model the trainer loads. Heads must be
    /// `hidden_size / num_attention_heads` wide (`head_dim`, when given).
    pub fn from_hf_config(
        name: &str,
        config: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<ModelSpec, ModelError> {
        let field = |field: &'static str| -> Result<Option<u32>, ModelError> {
            match config.get(field).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| ModelError::ConfigField {
                        name: name.to_string(),
                        field,
                        message: format!("must be a whole number ≥ 1, got {v}"),
                    }),
            }
        };
        let required = |f: &'static str| -> Result<u32, ModelError> {
            field(f)?.ok_or_else(|| ModelError::ConfigField {
                name: name.to_string(),
                field: f,
                message: "is missing".to_string(),
            })
        };
        let heads = required("num_attention_heads")?;
        let spec = ModelSpec {
            name: name.to_string(),
            layers: required("num_hidden_layers")?,
            hidden: required("hidden_size")?,
            heads,
            kv_heads: field("num_key_value_heads")?.unwrap_or(heads),
            ffn: required("intermediate_size")?,
            vocab: required("vocab_size")?,
            tied_embeddings: config
                .get("tie_word_embeddings")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
        };
        spec.validate()?;
        if let Some(head_dim) = field("head_dim")?
            && head_dim != spec.hidden / spec.heads
        {
            return Err(ModelError::ConfigField {
                name: name.to_string(),
                field: "head_dim",
                message: format!(
                    "{head_dim} differs from hidden_size / num_attention_heads ({}); weft's heads are that wide",
                    spec.hidden / spec.heads
                ),
            });
        }
        Ok(spec)
    }

    /// Checks the shape: everything positive, heads divide hidden, kv heads divide heads.
    pub fn validate(&self) -> Result<(), ModelError> {
        let fields = [
            ("layers", self.layers),
            ("hidden", self.hidden),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("ffn", self.ffn),
            ("vocab", self.vocab),
        ];
        for (field, value) in fields {
            if value == 0 {
                return Err(ModelError::Zero {
                    name: self.name.clone(),
                    field,
                });
            }
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(ModelError::HiddenNotDivisible {
                name: self.name.clone(),
                hidden: self.hidden,
                heads: self.heads,
            });
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(ModelError::HeadsNotDivisible {
                name: self.name.clone(),
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        Ok(())
    }

    pub fn head_dim(&self) -> f64 {
        f64::from(self.hidden) / f64::from(self.heads)
    }

    /// Width of K (or V): kv heads × head dim.
    pub fn kv_width(&self) -> f64 {
        f64::from(self.kv_heads) * self.head_dim()
    }

    /// Forward FLOPs per token of the matrix products: every layer's and
    /// the LM head's, 2 per parameter (the embedding lookup takes none).
    pub fn linear_flops_per_token(&self) -> f64 {
        2.0 * f64::from(self.layers) * self.layer_params()
            + 2.0 * f64::from(self.hidden) * f64::from(self.vocab)
    }

    /// Forward FLOPs of one layer's causal attention over a sequence of
    /// `length` tokens: half the square of its score and value products.
    pub fn attention_flops_forward(&self, length: f64) -> f64 {
        2.0 * length * length * f64::from(self.hidden)
    }

    /// Parameters of one layer's matrices: Q and O (h×h each), K and V (h×kv each),
    /// and the three SwiGLU matrices (h×f each). Norm weights are negligible.
    pub fn layer_params(&self) -> f64 {
        let h = f64::from(self.hidden);
        2.0 * h * h + 2.0 * h * self.kv_width() + 3.0 * h * f64::from(self.ffn)
    }

    /// All parameters: the layers, the embedding and the LM head (the
    /// embedding's table again when tied).
    pub fn params(&self) -> f64 {
        let tables = if self.tied_embeddings { 1.0 } else { 2.0 };
        f64::from(self.layers) * self.layer_params()
            + tables * f64::from(self.vocab) * f64::from(self.hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_their_published_sizes() {
        let billions = |name: &str| ModelSpec::preset(name).unwrap().params() / 1e9;
        assert!(
            (billions("llama-7b") - 6.74).abs() < 0.05,
            "{}",
            billions("llama-7b")
        );
        assert!(
            (billions("llama-13b") - 13.0).abs() < 0.1,
            "{}",
            billions("llama-13b")
        );
        assert!(
            (billions("llama-70b") - 69.0).abs() < 0.5,
            "{}",
            billions("llama-70b")
        );
    }

    #[test]
    fn bad_shapes_are_named() {
        assert!(
            ModelSpec::preset("gpt-5")
                .unwrap_err()
                .to_string()
                .contains("gpt-5")
        );
        let mut m = ModelSpec::preset("llama-70b").unwrap();
        m.kv_heads = 7;
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("not divisible by 7")
        );
        m.kv_heads = 0;
        assert!(m.validate().unwrap_err().to_string().contains("kv_heads"));
        m = ModelSpec::preset("llama-7b").unwrap();
        m.heads = 30;
        assert!(
            m.validate()
                .unwrap_err()
                .to_string()
                .contains("hidden size 4096")
        );
    }
}
