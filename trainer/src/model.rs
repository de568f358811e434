//! The model: a Llama-style decoder (RMSNorm, rotary position embeddings,
//! grouped-query attention, SwiGLU) on libtorch, sized by the planner's
//! [`ModelSpec`] so the trainer and the planner agree on every shape.
//!
//! Positions are explicit: each token carries its true offset in its document,
//! so a rank holding a shard of a sequence rotates its queries and keys exactly
//! as the whole sequence would. Several documents can be packed into one row;
//! no token attends across documents, and each document's positions start at 0.
//!
//! This is the single-process model; the distributed step (ring attention over
//! the plan's groups and the remap) plugs into the attention call.

use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};
use weft_planner::model::ModelSpec;

/// The number format of the model's matrix products and activations.
///
/// The parameters, their gradients and the optimizer's state stay fp32 in
/// both: `Bf16` is mixed precision, as GPU training runs it. Each linear
/// module multiplies in bf16 (its weight cast on the way, so the gradient
/// reaches the fp32 weight), attention runs on bf16 queries, keys and values
/// and merges its partial results in fp32, and the norms, the residual stream,
/// the softmax of the loss and the ring's dK/dV accumulators stay fp32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything fp32: what the CPU runs by default.
    #[default]
    Fp32,
    /// bf16 products and activations, fp32 master weights: what GPUs run.
    Bf16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The tensor kind of the products and activations.
    pub fn compute_kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }

    /// The planner's name for what a step in this precision keeps.
    pub fn activations(self) -> weft_planner::cost::ActivationPrecision {
        match self {
            Precision::Fp32 => weft_planner::cost::ActivationPrecision::Fp32,
            Precision::Bf16 => weft_planner::cost::ActivationPrecision::Bf16,
        }
    }
}

/// What went wrong in the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("documents of {documents} tokens in all, but the row has {tokens} tokens")]
    Documents { documents: i64, tokens: i64 },
    #[error("{0}")]
    Shape(String),
}

impl ModelError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ModelError::Torch(_) => "torch",
            ModelError::Documents { .. } | ModelError::Shape(_) => "model_input",
        }
    }
}

/// Root-mean-square layer norm with a learned scale.
#[derive(Debug)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(vs: nn::Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: vs.ones("weight", &[dim]),
            eps,
        }
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let rms = x
            .f_pow_tensor_scalar(2)?
            .f_mean_dim(Some(&[-1i64][..]), true, None)?
            .f_add_scalar(self.eps)?
            .f_rsqrt()?;
        x.f_mul(&rms)?.f_mul(&self.weight)
    }
}

/// One decoder layer.
#[derive(Debug)]
pub(crate) struct Block {
    pub(crate) attention_norm: RmsNorm,
    pub(crate) wq: nn::Linear,
    pub(crate) wk: nn::Linear,
    pub(crate) wv: nn::Linear,
    pub(crate) wo: nn::Linear,
    pub(crate) mlp_norm: RmsNorm,
    pub(crate) gate: nn::Linear,
    pub(crate) up: nn::Linear,
    pub(crate) down: nn::Linear,
}

/// The decoder.
#[derive(Debug)]
pub struct Llama {
    spec: ModelSpec,
    architecture: Architecture,
    pub(crate) embedding: nn::Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: RmsNorm,
    /// The output projection; with tied embeddings, the embedding's table.
    pub(crate) head: nn::Linear,
    pub(crate) rotary: Rotary,
    precision: Precision,
}

/// What a Llama-family model sets beyond its shapes: its rotary position
/// embedding, its norms' epsilon, biases on its projections and whether the
/// output projection is the embedding's table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    pub rope: Rope,
    pub norm_eps: f64,
    /// Biases on the query, key and value projections (Qwen2; Llama's
    /// `attention_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    /// A bias on the attention's output projection (Llama's `attention_bias`).
    #[serde(default)]
    pub output_bias: bool,
    /// The output projection is the embedding's table (`tie_word_embeddings`).
    #[serde(default)]
    pub tied_embeddings: bool,
}

impl Default for Architecture {
    /// weft's own model: rotary base 10,000 unscaled, epsilon 1e-5, no
    /// biases, an output projection of its own.
    fn default() -> Architecture {
        Architecture {
            rope: Rope::default(),
            norm_eps: 1e-5,
            qkv_bias: false,
            output_bias: false,
            tied_embeddings: false,
        }
    }
}

/// A rotary position embedding: its base and how its frequencies are
/// scaled to extend the context (as Hugging Face's `rope_parameters` say).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    pub theta: f64,
    #[serde(default)]
    pub scaling: RopeScaling,
}

impl Default for Rope {
    fn default() -> Rope {
        Rope {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        }
    }
}

/// How a rotary embedding's frequencies are scaled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// The frequencies as they are (Hugging Face's `default`).
    #[default]
    None,
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: long wavelengths divided by `factor`, short ones kept,
    /// a smooth ramp between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Dynamic NTK scaling: a sequence longer than `max_position_embeddings`
    /// rotates with a larger base, grown with its length (`factor`); shorter
    /// ones with the base as it is. Each sequence by its own length, as
    /// `transformers` computes a sequence alone.
    Dynamic {
        factor: f64,
        max_position_embeddings: f64,
    },
    /// YaRN: interpolation for the long wavelengths, extrapolation for the
    /// short ones, a linear ramp between, and cos/sin scaled by
    /// `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        attention_factor: f64,
        truncate: bool,
    },
}

impl Rope {
    /// The inverse frequencies of a head of `head_dim` dimensions, as
    /// Hugging Face's `transformers` computes them for the same settings:
    /// in fp32, step by step as it does, so both rotate alike at any
    /// position.
    pub fn inv_freq(&self, head_dim: i64) -> Vec<f32> {
        let dim = head_dim as f32;
        let theta = self.theta as f32;
        // base ** (arange(0, dim, 2) / dim), then its inverse.
        let powers: Vec<f32> = (0..head_dim / 2)
            .map(|i| theta.powf((2 * i) as f32 / dim))
            .collect();
        let plain: Vec<f32> = powers.iter().map(|p| 1.0 / p).collect();
        match &self.scaling {
            // The base as it is, up to the positions the model was made for
            // (see [`Rope::inv_freq_at`] for longer sequences).
            RopeScaling::None | RopeScaling::Dynamic { .. } => plain,
            RopeScaling::Linear { factor } => {
                let factor = *factor as f32;
                plain.iter().map(|f| f / factor).collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let (factor, low, high) = (
                    *factor as f32,
                    *low_freq_factor as f32,
                    *high_freq_factor as f32,
                );
                let old_f = *old as f32;
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old_f / wavelen - low) / (high - low);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect()
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast,
                beta_slow,
                truncate,
                ..
            } => {
                // The correction range in f64, as Python's math computes it.
                let dim64 = head_dim as f64;
                let correction = |rotations: f64| {
                    dim64 * (original / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction(*beta_fast), correction(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim64 - 1.0));
                if low == high {
                    high += 0.001;
                }
                let factor = *factor as f32;
                powers
                    .iter()
                    .enumerate()
                    .map(|(i, &p)| {
                        let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let (interpolated, extrapolated) = (1.0 / (factor * p), 1.0 / p);
                        interpolated * (1.0 - extrapolation) + extrapolated * extrapolation
                    })
                    .collect()
            }
        }
    }

    /// Whether the frequencies depend on the length of the sequence
    /// (dynamic NTK scaling).
    pub fn per_sequence(&self) -> bool {
        matches!(self.scaling, RopeScaling::Dynamic { .. })
    }

    /// The inverse frequencies for a sequence of `length` tokens: those of
    /// [`Rope::inv_freq`] but with dynamic scaling, whose base grows for a
    /// sequence longer than the model's positions. In fp32, step by step as
    /// `transformers` computes them (`_compute_dynamic_ntk_parameters`).
    pub fn inv_freq_at(&self, head_dim: i64, length: i64) -> Vec<f32> {
        let RopeScaling::Dynamic {
            factor,
            max_position_embeddings: most,
        } = self.scaling
        else {
            return self.inv_freq(head_dim);
        };
        if (length as f64) <= most {
            return self.inv_freq(head_dim);
        }
        let (factor, most, length) = (factor as f32, most as f32, length as f32);
        let exponent = (head_dim as f64 / (head_dim - 2) as f64) as f32;
        let base = self.theta as f32 * ((factor * length / most) - (factor - 1.0)).powf(exponent);
        let dim = head_dim as f32;
        (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim))
            .collect()
    }

    /// What cos and sin are multiplied by (YaRN's attention factor; 1
    /// otherwise).
    pub fn attention_factor(&self) -> f64 {
        match &self.scaling {
            RopeScaling::Yarn {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// A rotary embedding ready to apply to heads of one size: its inverse
/// frequencies (fp32, as the reference computes the angles), the factor of
/// cos and sin, and the frequencies on the device they were last used on
/// (made once there rather than copied at every call).
#[derive(Debug)]
pub struct Rotary {
    inv_freq: Vec<f32>,
    factor: f64,
    on_device: std::sync::Mutex<Option<(tch::Device, Tensor)>>,
    /// The settings, for frequencies that depend on a sequence's length.
    rope: Rope,
    head_dim: i64,
}

impl Clone for Rotary {
    fn clone(&self) -> Rotary {
        Rotary {
            inv_freq: self.inv_freq.clone(),
            factor: self.factor,
            on_device: std::sync::Mutex::new(None),
            rope: self.rope.clone(),
            head_dim: self.head_dim,
        }
    }
}

impl Rotary {
    pub fn new(rope: &Rope, head_dim: i64) -> Rotary {
        Rotary {
            inv_freq: rope.inv_freq(head_dim),
            factor: rope.attention_factor(),
            on_device: std::sync::Mutex::new(None),
            rope: rope.clone(),
            head_dim,
        }
    }

    /// Whether each token's frequencies depend on its sequence's length
    /// (dynamic NTK scaling).
    pub fn per_sequence(&self) -> bool {
        self.rope.per_sequence()
    }

    /// The positions [`rope`] takes for tokens at `positions` of sequences
    /// of `lengths` tokens: `[L]`, or, where the frequencies depend on the
    /// length, `[L, 1 + E/2]` fp32 rows of the position and its sequence's
    /// frequencies, made once here on the host for a micro-batch (not at
    /// every layer's rotation).
    pub fn positions(
        &self,
        positions: &[i64],
        lengths: &[i64],
        device: tch::Device,
    ) -> Result<Tensor, tch::TchError> {
        if !self.per_sequence() {
            return Tensor::from_slice(positions).f_to_device(device);
        }
        let half = self.head_dim / 2;
        let mut by_length: std::collections::BTreeMap<i64, Vec<f32>> = Default::default();
        let mut rows = Vec::with_capacity(positions.len() * (1 + half as usize));
        for (position, length) in positions.iter().zip(lengths) {
            rows.push(*position as f32);
            rows.extend_from_slice(
                by_length
                    .entry(*length)
                    .or_insert_with(|| self.rope.inv_freq_at(self.head_dim, *length)),
            );
        }
        Tensor::from_slice(&rows)
            .f_view([positions.len() as i64, 1 + half])?
            .f_to_device(device)
    }

    /// The inverse frequencies on `device`.
    fn frequencies(&self, device: tch::Device) -> Result<Tensor, tch::TchError> {
        let mut cached = self
            .on_device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((on, tensor)) = cached.as_ref()
            && *on == device
        {
            return Ok(tensor.shallow_clone());
        }
        let tensor = Tensor::from_slice(&self.inv_freq).f_to_device(device)?;
        *cached = Some((device, tensor.shallow_clone()));
        Ok(tensor)
    }
}

fn linear(vs: nn::Path, input: i64, output: i64, bias: bool) -> nn::Linear {
    nn::linear(
        vs,
        input,
        output,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// Rotary position embedding of `x` `[B, H, L, E]` at `positions` `[L]`,
/// or `[L, 1 + E/2]` (position, its frequencies) where the frequencies
/// depend on the sequence's length ([`Rotary::positions`]) (rotate-half
/// form).
pub fn rope(x: &Tensor, positions: &Tensor, rotary: &Rotary) -> Result<Tensor, tch::TchError> {
    let e = x.size()[3];
    let half = e / 2;
    if rotary.inv_freq.len() as i64 != half {
        return Err(tch::TchError::Shape(format!(
            "a rotary embedding of {} frequencies for heads of {e} dimensions",
            rotary.inv_freq.len()
        )));
    }
    let angles = if positions.dim() == 2 {
        // A position and its sequence's frequencies per token.
        if positions.size()[1] != 1 + half {
            return Err(tch::TchError::Shape(format!(
                "rotary rows of {} values for heads of {e} dimensions",
                positions.size()[1]
            )));
        }
        positions
            .f_narrow(1, 0, 1)?
            .f_mul(&positions.f_narrow(1, 1, half)?)? // [L, half]
    } else {
        let inv_freq = rotary.frequencies(x.device())?;
        positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(1)?
            .f_mul(&inv_freq.f_unsqueeze(0)?)? // [L, half]
    };
    let (mut cos, mut sin) = (angles.f_cos()?, angles.f_sin()?);
    if rotary.factor != 1.0 {
        cos = cos.f_mul_scalar(rotary.factor)?;
        sin = sin.f_mul_scalar(rotary.factor)?;
    }
    let x1 = x.f_narrow(3, 0, half)?;
    let x2 = x.f_narrow(3, half, half)?;
    let first = x1.f_mul(&cos)?.f_sub(&x2.f_mul(&sin)?)?;
    let second = x2.f_mul(&cos)?.f_add(&x1.f_mul(&sin)?)?;
    // The angles are fp32; the result keeps the input's kind.
    Tensor::f_cat(&[first, second], 3)?.f_to_kind(x.kind())
}

impl Llama {
    /// A model of shape `spec` whose variables live under `vs` (initialised by
    /// libtorch's generator: seed it first for a reproducible model).
    pub fn new(vs: &nn::Path, spec: &ModelSpec) -> Result<Llama, ModelError> {
        Llama::with_architecture(vs, spec, &Architecture::default())
    }

    /// A model of shape `spec` and `architecture` (a Hugging Face model's,
    /// for instance) whose variables live under `vs`.
    pub fn with_architecture(
        vs: &nn::Path,
        spec: &ModelSpec,
        architecture: &Architecture,
    ) -> Result<Llama, ModelError> {
        spec.validate()
            .map_err(|e| ModelError::Shape(e.to_string()))?;
        let (h, f, v) = (
            i64::from(spec.hidden),
            i64::from(spec.ffn),
            i64::from(spec.vocab),
        );
        let head_dim = h / i64::from(spec.heads);
        let kv = i64::from(spec.kv_heads) * head_dim;
        let eps = architecture.norm_eps;
        let blocks = (0..spec.layers)
            .map(|i| {
                let p = vs / "layers" / i;
                Block {
                    attention_norm: RmsNorm::new(&p / "attention_norm", h, eps),
                    wq: linear(&p / "wq", h, h, architecture.qkv_bias),
                    wk: linear(&p / "wk", h, kv, architecture.qkv_bias),
                    wv: linear(&p / "wv", h, kv, architecture.qkv_bias),
                    wo: linear(&p / "wo", h, h, architecture.output_bias),
                    mlp_norm: RmsNorm::new(&p / "mlp_norm", h, eps),
                    gate: linear(&p / "gate", h, f, false),
                    up: linear(&p / "up", h, f, false),
                    down: linear(&p / "down", f, h, false),
                }
            })
            .collect();
        let embedding = nn::embedding(vs / "embedding", v, h, Default::default());
        let head = if architecture.tied_embeddings {
            nn::Linear {
                ws: embedding.ws.shallow_clone(),
                bs: None,
            }
        } else {
            linear(vs / "head", h, v, false)
        };
        Ok(Llama {
            spec: spec.clone(),
            architecture: architecture.clone(),
            embedding,
            blocks,
            norm: RmsNorm::new(vs / "norm", h, eps),
            head,
            rotary: Rotary::new(&architecture.rope, head_dim),
            precision: Precision::Fp32,
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// Every parameter under its name in a Hugging Face Llama-family
    /// checkpoint (`model.layers.0.self_attn.q_proj.weight`, ...); a tied
    /// output projection is not listed (it is the embedding's table).
    pub fn hf_parameters(&self) -> Vec<(String, Tensor)> {
        let mut named = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embedding.ws.shallow_clone(),
        )];
        let mut linear = |name: String, layer: &nn::Linear| {
            named.push((format!("{name}.weight"), layer.ws.shallow_clone()));
            if let Some(bias) = &layer.bs {
                named.push((format!("{name}.bias"), bias.shallow_clone()));
            }
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let at = format!("model.layers.{i}");
            linear(format!("{at}.self_attn.q_proj"), &block.wq);
            linear(format!("{at}.self_attn.k_proj"), &block.wk);
            linear(format!("{at}.self_attn.v_proj"), &block.wv);
            linear(format!("{at}.self_attn.o_proj"), &block.wo);
            linear(format!("{at}.mlp.gate_proj"), &block.gate);
            linear(format!("{at}.mlp.up_proj"), &block.up);
            linear(format!("{at}.mlp.down_proj"), &block.down);
        }
        if !self.architecture.tied_embeddings {
            linear("lm_head".to_string(), &self.head);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            named.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                block.attention_norm.weight().shallow_clone(),
            ));
            named.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                block.mlp_norm.weight().shallow_clone(),
            ));
        }
        named.push((
            "model.norm.weight".to_string(),
            self.norm.weight().shallow_clone(),
        ));
        named
    }

    /// The same model computing in `precision` (its parameters unchanged).
    pub fn with_precision(mut self, precision: Precision) -> Llama {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// `layer` applied to `x` in the model's precision: in bf16 both the
    /// input and the (fp32) weight are cast, so the product is bf16 and the
    /// weight's gradient comes back fp32.
    pub(crate) fn linear(&self, layer: &nn::Linear, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self.precision {
            Precision::Fp32 => Ok(layer.forward(x)),
            Precision::Bf16 => {
                let kind = self.precision.compute_kind();
                let bias = layer.bs.as_ref().map(|b| b.f_to_kind(kind)).transpose()?;
                x.f_to_kind(kind)?
                    .f_linear(&layer.ws.f_to_kind(kind)?, bias.as_ref())
            }
        }
    }

    /// One layer's MLP (SwiGLU) on normalised rows `y`.
    pub(crate) fn mlp(&self, block: &Block, y: &Tensor) -> Result<Tensor, tch::TchError> {
        let hidden = self
            .linear(&block.gate, y)?
            .f_silu()?
            .f_mul(&self.linear(&block.up, y)?)?;
        self.linear(&block.down, &hidden)
    }

    /// Logits `[1, L, vocab]` for one row of `tokens` `[L]` holding packed
    /// documents of `documents` tokens each (in order, summing to L).
    pub fn forward(&self, tokens: &Tensor, documents: &[i64]) -> Result<Tensor, ModelError> {
        let l = tokens.size().first().copied().unwrap_or(0);
        let total: i64 = documents.iter().sum();
        if total != l {
            return Err(ModelError::Documents {
                documents: total,
                tokens: l,
            });
        }
        // Each document's positions start at 0.
        let positions: Vec<i64> = documents.iter().flat_map(|n| 0..*n).collect();
        let lengths: Vec<i64> = documents
            .iter()
            .flat_map(|n| std::iter::repeat_n(*n, *n as usize))
            .collect();
        let positions = self
            .rotary
            .positions(&positions, &lengths, tokens.device())?;
        let heads = i64::from(self.spec.heads);
        let kv_heads = i64::from(self.spec.kv_heads);
        let head_dim = i64::from(self.spec.hidden) / heads;
        let mut x = self.embedding.forward(&tokens.f_unsqueeze(0)?); // [1, L, h]
        for block in &self.blocks {
            let y = block.attention_norm.forward(&x)?;
            let split = |t: Tensor, n: i64| -> Result<Tensor, tch::TchError> {
                t.f_view([1, l, n, head_dim])?.f_transpose(1, 2)
            };
            let q = rope(
                &split(self.linear(&block.wq, &y)?, heads)?,
                &positions,
                &self.rotary,
            )?;
            let k = rope(
                &split(self.linear(&block.wk, &y)?, kv_heads)?,
                &positions,
                &self.rotary,
            )?;
            let v = split(self.linear(&block.wv, &y)?, kv_heads)?;
            let (k, v) = if kv_heads == heads {
                (k, v)
            } else {
                let group = heads / kv_heads;
                (
                    k.f_repeat_interleave_self_int(group, 1, None)?,
                    v.f_repeat_interleave_self_int(group, 1, None)?,
                )
            };
            // Causal attention inside each document only.
            let mut outs = Vec::with_capacity(documents.len());
            let mut start = 0;
            for &n in documents {
                if n == 0 {
                    continue;
                }
                let part = |t: &Tensor| t.f_narrow(2, start, n);
                let (q, k, v) = (part(&q)?, part(&k)?, part(&v)?);
                // libtorch's CPU flash kernel, whose backward ring attention
                // is held to; elsewhere its public attention, which picks the
                // device's fused kernel.
                let o = if q.device() == tch::Device::Cpu {
                    Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
                        &q,
                        &k,
                        &v,
                        0.0,
                        true,
                        None::<Tensor>,
                        None,
                    )?
                    .0
                } else {
                    Tensor::f_scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        None::<Tensor>,
                        0.0,
                        true,
                        None,
                        false,
                    )?
                };
                outs.push(o);
                start += n;
            }
            let attended = Tensor::f_cat(&outs, 2)?
                .f_transpose(1, 2)?
                .f_contiguous()?
                .f_view([1, l, heads * head_dim])?;
            x = x.f_add(&self.linear(&block.wo, &attended)?)?;
            let y = block.mlp_norm.forward(&x)?;
            x = x.f_add(&self.mlp(block, &y)?)?;
        }
        Ok(self.linear(&self.head, &self.norm.forward(&x)?)?)
    }

    /// Mean next-token cross-entropy over a row of packed documents: each
    /// document predicts its own next tokens (no target crosses a document).
    pub fn loss(&self, tokens: &Tensor, documents: &[i64]) -> Result<Tensor, ModelError> {
        let (sum, count) = self.loss_sum(tokens, documents)?;
        if count == 0 {
            return Err(ModelError::Shape(
                "no document has two tokens: nothing to predict".to_string(),
            ));
        }
        Ok(sum.f_div_scalar(count as f64)?)
    }

    /// The summed next-token cross-entropy of a row of packed documents and
    /// the number of predicted tokens: the pieces of a loss normalised over a
    /// whole global batch.
    pub fn loss_sum(
        &self,
        tokens: &Tensor,
        documents: &[i64],
    ) -> Result<(Tensor, i64), ModelError> {
        let logits = self.forward(tokens, documents)?.f_squeeze_dim(0)?;
        let mut inputs = Vec::new();
        let mut targets = Vec::new();
        let mut start = 0;
        for &n in documents {
            if n > 1 {
                inputs.push(logits.f_narrow(0, start, n - 1)?);
                targets.push(tokens.f_narrow(0, start + 1, n - 1)?);
            }
            start += n;
        }
        if inputs.is_empty() {
            return Ok((Tensor::f_zeros([], (Kind::Float, tokens.device()))?, 0));
        }
        let inputs = Tensor::f_cat(&inputs, 0)?;
        let targets = Tensor::f_cat(&targets, 0)?;
        let count = targets.size()[0];
        let sum = inputs.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
            &targets,
            None::<Tensor>,
            tch::Reduction::Sum,
            -100,
        )?;
        Ok((sum, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::OptimizerConfig;

    /// `--precision` names each format as reports do.
    #[test]
    fn precisions_are_named_on_the_command_line_as_in_reports() {
        use clap::ValueEnum;
        for precision in Precision::value_variants() {
            assert_eq!(crate::flag_name(precision), precision.name());
        }
    }

    fn tiny() -> ModelSpec {
        ModelSpec::preset("tiny").unwrap()
    }

    fn model(seed: i64) -> (nn::VarStore, Llama) {
        crate::seeded(seed, || {
            let vs = nn::VarStore::new(tch::Device::Cpu);
            let m = Llama::new(&vs.root(), &tiny()).unwrap();
            (vs, m)
        })
    }

    fn tokens(text: &str) -> Tensor {
        let ids: Vec<i64> = crate::data::tokenize(text)
            .iter()
            .map(|t| i64::from(*t))
            .collect();
        Tensor::from_slice(&ids)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn packed_documents_equal_separate_ones() {
        let (_vs, m) = model(1);
        let (a, b) = (
            tokens("the first document"),
            tokens("a second, longer document here"),
        );
        let (la, lb) = (a.size()[0], b.size()[0]);
        let packed = m.forward(&Tensor::cat(&[&a, &b], 0), &[la, lb]).unwrap();
        let alone_a = m.forward(&a, &[la]).unwrap();
        let alone_b = m.forward(&b, &[lb]).unwrap();
        assert!(max_diff(&packed.narrow(1, 0, la), &alone_a) < 1e-5);
        assert!(max_diff(&packed.narrow(1, la, lb), &alone_b) < 1e-5);
    }

    #[test]
    fn rotary_embeddings_depend_only_on_relative_position() {
        // Shifting every position by the same amount leaves q·k unchanged.
        let rotary = Rotary::new(&Rope::default(), 8);
        let (q, k) = crate::seeded(3, || {
            (
                Tensor::randn([1, 2, 5, 8], (Kind::Float, tch::Device::Cpu)),
                Tensor::randn([1, 2, 5, 8], (Kind::Float, tch::Device::Cpu)),
            )
        });
        let at = |offset: i64| {
            let p = Tensor::arange_start(offset, offset + 5, (Kind::Int64, tch::Device::Cpu));
            let (qr, kr) = (
                rope(&q, &p, &rotary).unwrap(),
                rope(&k, &p, &rotary).unwrap(),
            );
            qr.matmul(&kr.transpose(2, 3))
        };
        assert!(max_diff(&at(0), &at(1000)) < 1e-3);
        // And rotating changes the vectors (it is not the identity).
        let p = Tensor::arange(5, (Kind::Int64, tch::Device::Cpu));
        assert!(max_diff(&rope(&q, &p, &rotary).unwrap(), &q) > 1e-3);
    }

    #[test]
    fn same_seed_same_model_and_it_saves_and_loads() {
        let (vs, m) = model(7);
        let (_, again) = model(7);
        let t = tokens("reproducible");
        let n = t.size()[0];
        let out = m.forward(&t, &[n]).unwrap();
        assert!(max_diff(&out, &again.forward(&t, &[n]).unwrap()) == 0.0);
        let path =
            std::env::temp_dir().join(format!("weft-model-{}.safetensors", std::process::id()));
        vs.save(&path).unwrap();
        let (mut other_vs, other) = model(8);
        assert!(max_diff(&out, &other.forward(&t, &[n]).unwrap()) > 0.0);
        other_vs.load(&path).unwrap();
        assert!(max_diff(&out, &other.forward(&t, &[n]).unwrap()) == 0.0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_few_steps_of_adamw_lower_the_loss() {
        let (vs, m) = model(11);
        let mut opt = nn::AdamW::default().build(&vs, 3e-3).unwrap();
        let (a, b) = (
            tokens("hello weft, hello weft"),
            tokens("ring attention is exact"),
        );
        let docs = [a.size()[0], b.size()[0]];
        let row = Tensor::cat(&[&a, &b], 0);
        let first = m.loss(&row, &docs).unwrap().double_value(&[]);
        for _ in 0..30 {
            let loss = m.loss(&row, &docs).unwrap();
            opt.backward_step(&loss);
        }
        let last = m.loss(&row, &docs).unwrap().double_value(&[]);
        assert!(last < first * 0.7, "loss {first} -> {last}");
    }

    #[test]
    fn bad_document_lengths_are_refused() {
        let (_vs, m) = model(1);
        let err = m.forward(&tokens("abc"), &[2]).unwrap_err();
        assert!(err.to_string().contains("documents of 2 tokens"), "{err}");
        assert!(m.loss(&tokens(""), &[1]).is_err());
    }
}
