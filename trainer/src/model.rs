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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything fp32: what the CPU runs by default.
    #[default]
    Fp32,
    /// bf16 products and activations, fp32 master weights: what GPUs run.
    Bf16,
}

impl Precision {
    /// `fp32` or `bf16`.
    pub fn parse(text: &str) -> Result<Precision, ModelError> {
        match text {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(ModelError::Shape(format!(
                "precision {other:?} is neither fp32 nor bf16"
            ))),
        }
    }

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
    fn new(vs: nn::Path, dim: i64) -> RmsNorm {
        RmsNorm {
            weight: vs.ones("weight", &[dim]),
            eps: 1e-5,
        }
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
    pub(crate) embedding: nn::Embedding,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: RmsNorm,
    pub(crate) head: nn::Linear,
    pub(crate) rope_theta: f64,
    precision: Precision,
}

fn linear(vs: nn::Path, input: i64, output: i64) -> nn::Linear {
    nn::linear(
        vs,
        input,
        output,
        nn::LinearConfig {
            bias: false,
            ..Default::default()
        },
    )
}

/// Rotary position embedding of `x` `[B, H, L, E]` at `positions` `[L]`
/// (rotate-half form, base `theta`).
pub fn rope(x: &Tensor, positions: &Tensor, theta: f64) -> Result<Tensor, tch::TchError> {
    let e = x.size()[3];
    let half = e / 2;
    let device = x.device();
    let inv_freq = Tensor::f_arange(half, (Kind::Float, device))?
        .f_mul_scalar(-2.0 * theta.ln() / e as f64)?
        .f_exp()?;
    let angles = positions
        .f_to_kind(Kind::Float)?
        .f_unsqueeze(1)?
        .f_mul(&inv_freq.f_unsqueeze(0)?)?; // [L, half]
    let (cos, sin) = (angles.f_cos()?, angles.f_sin()?);
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
        spec.validate()
            .map_err(|e| ModelError::Shape(e.to_string()))?;
        let (h, f, v) = (
            i64::from(spec.hidden),
            i64::from(spec.ffn),
            i64::from(spec.vocab),
        );
        let kv = i64::from(spec.kv_heads) * (h / i64::from(spec.heads));
        let blocks = (0..spec.layers)
            .map(|i| {
                let p = vs / "layers" / i;
                Block {
                    attention_norm: RmsNorm::new(&p / "attention_norm", h),
                    wq: linear(&p / "wq", h, h),
                    wk: linear(&p / "wk", h, kv),
                    wv: linear(&p / "wv", h, kv),
                    wo: linear(&p / "wo", h, h),
                    mlp_norm: RmsNorm::new(&p / "mlp_norm", h),
                    gate: linear(&p / "gate", h, f),
                    up: linear(&p / "up", h, f),
                    down: linear(&p / "down", f, h),
                }
            })
            .collect();
        Ok(Llama {
            spec: spec.clone(),
            embedding: nn::embedding(vs / "embedding", v, h, Default::default()),
            blocks,
            norm: RmsNorm::new(vs / "norm", h),
            head: linear(vs / "head", h, v),
            rope_theta: 10_000.0,
            precision: Precision::Fp32,
        })
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
                x.f_to_kind(kind)?
                    .f_linear(&layer.ws.f_to_kind(kind)?, None::<Tensor>)
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
        let positions = Tensor::from_slice(&positions).f_to_device(tokens.device())?;
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
                self.rope_theta,
            )?;
            let k = rope(
                &split(self.linear(&block.wk, &y)?, kv_heads)?,
                &positions,
                self.rope_theta,
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
        let (q, k) = crate::seeded(3, || {
            (
                Tensor::randn([1, 2, 5, 8], (Kind::Float, tch::Device::Cpu)),
                Tensor::randn([1, 2, 5, 8], (Kind::Float, tch::Device::Cpu)),
            )
        });
        let at = |offset: i64| {
            let p = Tensor::arange_start(offset, offset + 5, (Kind::Int64, tch::Device::Cpu));
            let (qr, kr) = (
                rope(&q, &p, 10_000.0).unwrap(),
                rope(&k, &p, 10_000.0).unwrap(),
            );
            qr.matmul(&kr.transpose(2, 3))
        };
        assert!(max_diff(&at(0), &at(1000)) < 1e-3);
        // And rotating changes the vectors (it is not the identity).
        let p = Tensor::arange(5, (Kind::Int64, tch::Device::Cpu));
        assert!(max_diff(&rope(&q, &p, 10_000.0).unwrap(), &q) > 1e-3);
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
