//! The cost model: time and memory of a sequence's share of a training step on a
//! GPU, from the model's shapes and the GPU's constants.
//!
//! Accounting (see `shared/references/systems.md` §2):
//! - Linear modules, forward, per layer: `2 · tokens · layer_params` FLOPs.
//! - Causal attention, forward, per layer: `2 · s² · h` FLOPs for a sequence of s tokens.
//! - Training = forward + backward = 3× forward; StreamBP recomputes the forward
//!   chunk by chunk during backward, so 4×.
//! - Ring attention over d ranks (zigzag, so every rank does 1/d of the work):
//!   d steps; in each but the first, a rank sends its K and V chunk (bf16) to its
//!   neighbour while computing on the chunk it holds. Backward circulates K, V
//!   again plus dK, dV in fp32. Step time = max(compute, transfer) + latency.
//! - Activation memory: what weft's own engine (`trainer/src/step.rs`) keeps,
//!   tensor by tensor ([`CostModel::layer_linear_bytes`] and
//!   [`CostModel::layer_attention_bytes`]): per token per layer,
//!   10·h + 4·h_kv + 4·f elements in fp32; in bf16 mixed precision the
//!   residual stream and the norms' normalised rows stay fp32 and the rest is
//!   bf16. That is more than the 34·h bytes of a fused engine (Korthikanti et
//!   al.): the planner places sequences for the engine that runs them, and
//!   `trainer/bench/memory` measures the engine beside this prediction. With
//!   StreamBP only the layer inputs (fp32) are kept, plus one layer's backward
//!   over the rank's tokens and one chunk's working set.
//! - Model states are sharded over all ranks (ZeRO-3 style, 16 bytes/param in
//!   mixed precision), plus two layers of gathered bf16 weights.
//! - Gradient synchronisation is the same for every plan and overlaps the
//!   backward pass; it is not modelled.
//!
//! Efficiency factors turn peak FLOP/s and line rates into achieved ones. They
//! default to values typical of H100-class systems and are meant to be replaced
//! by profiles the trainer measures.

use crate::cluster::GpuModel;
use crate::model::ModelSpec;

const BF16: f64 = 2.0;
const FP32: f64 = 4.0;
const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Tunable constants of the cost model.
#[derive(Clone, Debug, PartialEq)]
pub struct CostCoefficients {
    /// Fraction of peak bf16 FLOP/s that linear-module GEMMs reach.
    pub linear_efficiency: f64,
    /// Fraction of peak that attention kernels reach.
    pub attention_efficiency: f64,
    /// Fraction of a link's line rate that transfers reach.
    pub link_efficiency: f64,
    /// Fixed cost of one point-to-point message, seconds.
    pub p2p_latency_s: f64,
    /// Fraction of GPU memory available to the step (allocator reserve, workspaces).
    pub usable_memory_fraction: f64,
    /// Where steps backpropagate with StreamBP (exact backprop streamed
    /// along the sequence: less activation memory, one more forward).
    pub streambp: StreamBp,
    /// StreamBP's smallest chunk, tokens: a streamed rank backpropagates
    /// in chunks of this times the largest power of two that costs it no
    /// more memory ([`CostModel::stream_chunk`]).
    pub streambp_chunk: u64,
    /// Seconds one StreamBP chunk adds per layer whatever its length: the
    /// fixed costs of its small graphs (kernel launches, short matrix
    /// products), which make small chunks slow. `weft-trainer profile`
    /// measures it.
    pub streambp_chunk_overhead_s: f64,
    /// A cap on what one rank holds, whatever its memory says: a worker's
    /// configured budget (the CPU trainer uses it to plan context
    /// parallelism at small scale), in tokens of plain backprop. A streamed
    /// step holds as many more tokens as fit the activation memory that
    /// many tokens take in plain backprop (see [`CostModel::token_capacity`]).
    pub max_tokens_per_rank: Option<u64>,
    /// The precision the step keeps its activations in.
    pub precision: ActivationPrecision,
}

/// Where a plan's steps stream their backward (StreamBP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamBp {
    /// Plain backprop everywhere.
    #[default]
    Off,
    /// Every ring streams.
    Always,
    /// The planner chooses per ring: weft streams the rings where that is
    /// faster than the wider ring plain backprop needs, or where only
    /// streaming fits (the other strategies, which do not choose, stream
    /// every ring). A model with this setting prices plain backprop; see
    /// [`CostModel::with_streaming`] for the streamed prices.
    PerRing,
}

impl StreamBp {
    /// Whether StreamBP may run at all.
    pub fn enabled(self) -> bool {
        self != StreamBp::Off
    }
}

/// The precision of a training step's activations: bf16 mixed precision
/// (fp32 weights and residual stream, bf16 products), as GPUs train, or fp32
/// throughout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationPrecision {
    #[default]
    Bf16,
    Fp32,
}

impl ActivationPrecision {
    /// Bytes of one element of the products (projections, attention, MLP).
    pub fn compute_bytes(self) -> f64 {
        match self {
            ActivationPrecision::Bf16 => BF16,
            ActivationPrecision::Fp32 => FP32,
        }
    }
}

impl Default for CostCoefficients {
    fn default() -> Self {
        CostCoefficients {
            linear_efficiency: 0.55,
            attention_efficiency: 0.40,
            link_efficiency: 0.80,
            p2p_latency_s: 15e-6,
            usable_memory_fraction: 0.90,
            streambp: StreamBp::Off,
            streambp_chunk: 4096,
            // About a hundred kernel launches of a few microseconds each.
            streambp_chunk_overhead_s: 5e-4,
            max_tokens_per_rank: None,
            precision: ActivationPrecision::Bf16,
        }
    }
}

/// The cost model for one model on a cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub model: ModelSpec,
    pub coefficients: CostCoefficients,
}

impl CostModel {
    pub fn new(model: ModelSpec, coefficients: CostCoefficients) -> Self {
        CostModel {
            model,
            coefficients,
        }
    }

    /// Whether this model prices a streamed step (StreamBP's memory and its
    /// recomputation).
    pub fn streams(&self) -> bool {
        self.coefficients.streambp == StreamBp::Always
    }

    /// This model pricing a streamed step (`true`) or a plain one, whatever
    /// its own setting: what a ring the planner chose for costs.
    pub fn with_streaming(&self, streamed: bool) -> CostModel {
        let mut model = self.clone();
        model.coefficients.streambp = if streamed {
            StreamBp::Always
        } else {
            StreamBp::Off
        };
        model
    }

    fn layers(&self) -> f64 {
        f64::from(self.model.layers)
    }

    fn hidden(&self) -> f64 {
        f64::from(self.model.hidden)
    }

    /// Forward passes per training step: 1, or 2 with StreamBP's recomputation.
    fn forward_passes(&self) -> f64 {
        if self.streams() { 2.0 } else { 1.0 }
    }

    /// Share of a step's compute spent in forward passes (the first one only:
    /// what offloaded copies to the host can hide under).
    pub fn forward_share(&self) -> f64 {
        1.0 / self.training_multiplier()
    }

    /// Training FLOPs multiplier over one forward pass.
    fn training_multiplier(&self) -> f64 {
        self.forward_passes() + 2.0
    }

    fn linear_flops_per_s(&self, gpu: &GpuModel) -> f64 {
        gpu.peak_bf16_tflops * 1e12 * self.coefficients.linear_efficiency
    }

    fn attention_flops_per_s(&self, gpu: &GpuModel) -> f64 {
        gpu.peak_bf16_tflops * 1e12 * self.coefficients.attention_efficiency
    }

    /// Seconds for the linear modules of `tokens` tokens through every layer, and
    /// the LM head, forward and backward.
    pub fn linear_time(&self, tokens: f64, gpu: &GpuModel) -> f64 {
        tokens * self.model.linear_flops_per_token() * self.training_multiplier()
            / self.linear_flops_per_s(gpu)
    }

    /// Causal attention FLOPs of one sequence, one layer, forward.
    pub fn attention_flops_forward(&self, length: f64) -> f64 {
        self.model.attention_flops_forward(length)
    }

    /// Seconds of attention compute for a whole sequence on one GPU, all layers,
    /// forward and backward (no communication).
    pub fn attention_compute_time(&self, length: f64, gpu: &GpuModel) -> f64 {
        self.layers() * self.attention_flops_forward(length) * self.training_multiplier()
            / self.attention_flops_per_s(gpu)
    }

    /// Bytes one rank sends per ring step, per layer, forward (K and V, bf16) and
    /// backward (K and V again, dK and dV in fp32), for a chunk of `chunk` tokens.
    pub fn ring_step_bytes(&self, chunk: f64) -> (f64, f64) {
        let kv = self.model.kv_width();
        let forward = chunk * 2.0 * kv * BF16;
        let backward = chunk * 2.0 * kv * BF16 + chunk * 2.0 * kv * FP32;
        (forward, backward)
    }

    /// Seconds of ring attention for one sequence of `length` tokens over a ring
    /// of `degree` ranks whose slowest hop moves `bytes_per_s`, on GPUs of model
    /// `gpu`, all layers, forward and backward. With degree 1, plain attention.
    pub fn ring_attention_time(
        &self,
        length: f64,
        degree: u32,
        bytes_per_s: f64,
        gpu: &GpuModel,
    ) -> f64 {
        self.packed_ring_time(&[length], degree, bytes_per_s, gpu)
            .total_s
    }

    /// Ring attention for documents packed into one ring pass: every ring step
    /// carries a chunk of each document, and its compute covers each document's
    /// causal block (no attention across documents). All layers, forward and
    /// backward, per rank.
    pub fn packed_ring_time(
        &self,
        lengths: &[f64],
        degree: u32,
        bytes_per_s: f64,
        gpu: &GpuModel,
    ) -> RingTime {
        self.hierarchical_ring_time(lengths, 1, degree, bytes_per_s, bytes_per_s, gpu)
    }

    /// Ring attention over a hierarchical ring: `outer` node-local inner rings
    /// of `inner` ranks (see [`crate::plan::Group::inner_ring`]). Each inner
    /// round is `inner` ring steps whose hops move `intra_bytes_per_s`; the
    /// inter-node transfer of each round (`inter_bytes_per_s` per rank) starts
    /// with the round and is hidden behind it. One outer ring is a flat ring.
    pub fn hierarchical_ring_time(
        &self,
        lengths: &[f64],
        outer: u32,
        inner: u32,
        intra_bytes_per_s: f64,
        inter_bytes_per_s: f64,
        gpu: &GpuModel,
    ) -> RingTime {
        let (outer_f, inner_f) = (f64::from(outer.max(1)), f64::from(inner.max(1)));
        let d = outer_f * inner_f;
        let flops = self.attention_flops_per_s(gpu);
        // Zigzag: each of the d steps holds 1/d² of a document's forward work on every rank.
        let step_forward: f64 = lengths
            .iter()
            .map(|s| self.attention_flops_forward(*s) / (d * d) / flops)
            .sum();
        let step_backward = 2.0 * step_forward;
        let compute = self.layers() * d * (self.forward_passes() * step_forward + step_backward);
        if d <= 1.0 {
            return RingTime {
                total_s: compute,
                compute_s: compute,
                hidden_s: 0.0,
            };
        }
        let tokens: f64 = lengths.iter().sum();
        let (bytes_forward, bytes_backward) = self.ring_step_bytes(tokens / d);
        let efficiency = self.coefficients.link_efficiency;
        let (intra, inter) = (
            intra_bytes_per_s * efficiency,
            inter_bytes_per_s * efficiency,
        );
        let latency = self.coefficients.p2p_latency_s;
        let pass = |step: f64, bytes: f64| {
            let round = step + (inner_f - 1.0) * (step.max(bytes / intra) + latency);
            round + (outer_f - 1.0) * round.max(bytes / inter + latency)
        };
        let forward = pass(step_forward, bytes_forward);
        let backward = pass(step_backward, bytes_backward);
        // The transfers compute hides: each hop inside a node behind its
        // ring step, each hop between inner rings behind the compute of the
        // round it overlaps (not behind other transfers).
        let hidden = |step: f64, bytes: f64| {
            (inner_f - 1.0) * outer_f * step.min(bytes / intra)
                + (outer_f - 1.0) * (inner_f * step).min(bytes / inter)
        };
        RingTime {
            total_s: self.layers() * (self.forward_passes() * forward + backward),
            compute_s: compute,
            hidden_s: self.layers()
                * (self.forward_passes() * hidden(step_forward, bytes_forward)
                    + hidden(step_backward, bytes_backward)),
        }
    }

    /// Step latency one rank of a ring pays per hop over the whole step (all
    /// layers, every pass). Each pass of a ring of d ranks (flat, or
    /// `outer` inner rings of `inner`) pays it on `outer · (inner − 1)` hops
    /// at least, which is d/2 or more for every shape.
    pub fn ring_latency_s(&self) -> f64 {
        self.coefficients.p2p_latency_s * self.layers() * (self.forward_passes() + 1.0)
    }

    /// Bytes one rank of a ring of `degree` ranks sends over the whole step
    /// (all layers, forward and backward) when it passes `passes` chunks of
    /// keys and values (with their gradients in the backward) to a neighbour:
    /// `degree − 1` in a flat ring; in a hierarchical ring of `outer` inner
    /// rings of `inner` ranks, `outer × (inner − 1)` inside the node and
    /// `outer − 1` to the next inner ring.
    pub fn ring_bytes_per_rank(&self, length: f64, degree: u32, passes: u32) -> f64 {
        if degree <= 1 {
            return 0.0;
        }
        let (f, b) = self.ring_step_bytes(length / f64::from(degree));
        self.layers() * f64::from(passes) * (self.forward_passes() * f + b)
    }

    /// Bytes that move per token when the remapping layer carries it between the
    /// linear layout and the attention layout and back, all layers, forward and
    /// backward: Q, K, V in and O out (bf16), and their gradients.
    pub fn remap_bytes_per_token(&self) -> f64 {
        let per_layer = (2.0 * self.hidden() + 2.0 * self.model.kv_width()) * BF16;
        self.layers() * per_layer * (self.forward_passes() + 1.0)
    }

    /// Bytes of one element of the step's products.
    fn compute_bytes(&self) -> f64 {
        self.coefficients.precision.compute_bytes()
    }

    /// Bytes the engine keeps per token per layer in the linear layout for
    /// plain backprop (`project_qkv` and `finish_layer` in
    /// `trainer/src/step.rs`, graphs alive until the layer's backward):
    /// - fp32 always (the residual stream): the sum after attention, both
    ///   norms' normalised rows and the layer's output, 4·h;
    /// - in the products' precision: both norms' outputs (2·h), the rotated
    ///   q, k, v rows (h + 2·h_kv), the attention output the output
    ///   projection keeps (h), and SwiGLU's gate, its SiLU, the up
    ///   projection and their product (4·f).
    ///
    /// In fp32 that is 10·h + 4·h_kv + 4·f elements with
    /// [`Self::layer_attention_bytes`], what `trainer/bench/memory` measures
    /// per layer on models that differ in h_kv and f.
    pub fn layer_linear_bytes(&self) -> f64 {
        let (h, kv, f) = (
            self.hidden(),
            self.model.kv_width(),
            f64::from(self.model.ffn),
        );
        4.0 * h * FP32 + (4.0 * h + 2.0 * kv + 4.0 * f) * self.compute_bytes()
    }

    /// Bytes the ring keeps per token per layer in the attention layout for
    /// its backward: the rank's queries, keys and values, the output (in the
    /// products' precision) and the log-sum-exp per head (fp32).
    pub fn layer_attention_bytes(&self) -> f64 {
        (2.0 * self.hidden() + 2.0 * self.model.kv_width()) * self.compute_bytes()
            + FP32 * f64::from(self.model.heads)
    }

    /// Activation bytes kept per token (all layers) for the linear-layout
    /// tokens: every layer's [`Self::layer_linear_bytes`]; with StreamBP,
    /// those of its longest-lived phase, the ring's backward
    /// ([`Self::step_bytes`]): the layers' inputs (fp32) and the residual's
    /// share of the gradient.
    pub fn activation_bytes_per_token(&self) -> f64 {
        if self.streams() {
            (self.layers() + 1.0) * self.hidden() * FP32
        } else {
            self.layers() * self.layer_linear_bytes()
        }
    }

    /// Bytes kept per token of the attention layout (all layers; with
    /// StreamBP one layer's, in the ring's backward: what the ring keeps for
    /// it, the fp32 gradients of the queries, keys and values, and their
    /// rows in the products' precision).
    pub fn attention_bytes_per_token(&self) -> f64 {
        if self.streams() {
            let qkv = self.hidden() + 2.0 * self.model.kv_width();
            self.layer_attention_bytes() + qkv * (FP32 + self.compute_bytes())
        } else {
            self.layers() * self.layer_attention_bytes()
        }
    }

    /// Bytes per token of the head and loss: the logits, their fp32
    /// log-softmax and the gradients of both.
    fn logit_bytes_per_token(&self) -> f64 {
        f64::from(self.model.vocab) * (self.compute_bytes() + 3.0 * FP32)
    }

    /// Bytes of the bf16 weight copies an engine that does not shard its
    /// weights keeps for the backward, as weft's trainer does today: every
    /// layer's in plain backprop, one layer's with StreamBP (its chunks'
    /// graphs); none in fp32, where the weights are used as they are. A
    /// sharded (ZeRO-3) engine gathers them two layers at a time instead,
    /// which [`Self::model_state_bytes`] counts.
    pub fn unsharded_weight_copy_bytes(&self) -> f64 {
        match self.coefficients.precision {
            ActivationPrecision::Fp32 => 0.0,
            ActivationPrecision::Bf16 => {
                let layers = if self.streams() { 1.0 } else { self.layers() };
                layers * BF16 * self.model.layer_params()
            }
        }
    }

    /// Share of a token's activation memory a rank keeps when `ratio` of the
    /// middle layers' activations is offloaded to host memory (ByteScale's
    /// selective offloading: the first and last layers' always stay).
    pub fn offload_kept(&self, ratio: f64) -> f64 {
        let l = self.layers();
        if l <= 2.0 {
            return 1.0;
        }
        (2.0 + (1.0 - ratio.clamp(0.0, 1.0)) * (l - 2.0)) / l
    }

    /// Seconds to copy `ratio` of the middle layers' activations of `tokens`
    /// tokens to host memory one way (device to host in the forward, back in
    /// the backward, each on its own DMA engine).
    pub fn offload_transfer_time(&self, tokens: f64, ratio: f64, gpu: &GpuModel) -> f64 {
        let bytes = tokens
            * (self.activation_bytes_per_token() + self.attention_bytes_per_token())
            * (1.0 - self.offload_kept(ratio));
        bytes / (gpu.pcie_gbytes_per_s * 1e9 * self.coefficients.link_efficiency)
    }

    /// ByteScale's offload ratio for a sequence of `length` tokens on ranks of
    /// `capacity` tokens (Eq. 3): the ratio that needs the fewest ranks while
    /// the copies hide under the forward compute (both scale alike with the
    /// ranks, so it is decided for the whole sequence), and among those the
    /// smallest. Returns (ratio, ranks).
    pub fn offload_plan(&self, length: u64, capacity: u64, gpu: &GpuModel) -> (f64, u32) {
        let s = length as f64;
        let c = capacity.max(1) as f64;
        let plain = (s / c).ceil().max(1.0);
        if self.layers() <= 2.0 || length <= capacity {
            return (0.0, plain as u32);
        }
        // The most the forward compute hides.
        let forward = (self.linear_time(s, gpu) + self.attention_compute_time(s, gpu))
            / self.training_multiplier();
        let full = self.offload_transfer_time(s, 1.0, gpu);
        let most = if full > 0.0 {
            (forward / full).min(1.0)
        } else {
            1.0
        };
        let ranks = (s * self.offload_kept(most) / c).ceil().max(1.0);
        // The smallest ratio that still fits on that many ranks.
        let l = self.layers();
        let needed = 1.0 - (l * ranks * c / s - 2.0) / (l - 2.0);
        // (A hair more, so rounding never leaves a token over the capacity.)
        ((needed + 1e-9).clamp(0.0, most), ranks as u32)
    }

    /// Memory, bytes, of a rank that holds `linear_tokens` tokens in the linear
    /// layout and `attention_tokens` in the attention layout, in a world of
    /// `world` ranks: its share of the model's states and
    /// [`Self::step_bytes`].
    pub fn rank_memory_bytes(&self, linear_tokens: f64, attention_tokens: f64, world: u32) -> f64 {
        self.model_state_bytes(world) + self.step_bytes(linear_tokens, attention_tokens)
    }

    /// A rank's share of the model's weights, gradients and optimiser
    /// moments in a world of `world` ranks, and two layers of gathered bf16
    /// weights (the one computing and the next).
    pub fn model_state_bytes(&self, world: u32) -> f64 {
        16.0 * self.model.params() / f64::from(world.max(1))
            + 2.0 * BF16 * self.model.layer_params()
    }

    /// What a step adds to a rank's memory: activations of `linear_tokens`
    /// tokens in the linear layout and `attention_tokens` in the attention
    /// layout, and the logits (with StreamBP, its peak: see
    /// [`Self::streamed_step_bytes`]).
    pub fn step_bytes(&self, linear_tokens: f64, attention_tokens: f64) -> f64 {
        if linear_tokens <= 0.0 && attention_tokens <= 0.0 {
            return 0.0;
        }
        if self.streams() {
            return self.streamed_step_bytes(linear_tokens, attention_tokens);
        }
        linear_tokens * (self.activation_bytes_per_token() + self.logit_bytes_per_token())
            + attention_tokens * self.attention_bytes_per_token()
    }

    /// StreamBP's peak (`Pass::streamed` in `trainer/src/step.rs`): the
    /// layers' fp32 inputs, which live through the whole step, and the
    /// largest of the three phases that come and go on top of them:
    /// - the head and loss, chunk by chunk: the last layer's output and its
    ///   gradient over every row, one chunk's logits and their gradients,
    ///   and the head weight's gradient before it is added to the
    ///   accumulated one;
    /// - a layer's rebuilt rest (output projection, residual, MLP), chunk by
    ///   chunk: the incoming gradient, the residual's share, the attention
    ///   output (and in bf16 its gradient beside the fp32 one), what the ring
    ///   keeps, and one chunk's graph;
    /// - the ring's backward over every row: the residual's share, what the
    ///   ring keeps, the fp32 gradients of the queries, keys and values and
    ///   their rows.
    ///
    /// Short sequences peak in the first two (one chunk's logits and graph
    /// outweigh their rows), long ones in the ring's backward, so a larger
    /// chunk costs nothing until its phase overtakes the ring's.
    pub fn streamed_step_bytes(&self, linear_tokens: f64, attention_tokens: f64) -> f64 {
        self.streamed_step_bytes_in(
            linear_tokens,
            attention_tokens,
            self.coefficients.streambp_chunk,
        )
    }

    /// [`Self::streamed_step_bytes`] in chunks of `chunk` tokens.
    pub fn streamed_step_bytes_in(
        &self,
        linear_tokens: f64,
        attention_tokens: f64,
        chunk: u64,
    ) -> f64 {
        let (h, cb) = (self.hidden(), self.compute_bytes());
        let chunk = linear_tokens.min(chunk.max(1) as f64);
        let inputs = linear_tokens * self.layers() * h * FP32;
        let head = linear_tokens * 2.0 * h * FP32
            + chunk * self.logit_bytes_per_token()
            + self.head_gradient_bytes();
        let attention_gradient_copies = if cb < FP32 { 2.0 } else { 1.0 };
        let rebuilt = linear_tokens * (2.0 * h * FP32 + attention_gradient_copies * h * cb)
            + attention_tokens * self.layer_attention_bytes()
            + chunk * self.layer_linear_bytes();
        let ring = linear_tokens * h * FP32 + attention_tokens * self.attention_bytes_per_token();
        inputs + head.max(rebuilt).max(ring)
    }

    /// The chunk a streamed rank with `linear_tokens` and `attention_tokens`
    /// tokens backpropagates in: the job's chunk times the largest power of
    /// two that costs no more memory than the job's chunk (each chunk costs
    /// [`CostCoefficients::streambp_chunk_overhead_s`] a layer, so fewer are
    /// faster). A rank whose peak is the ring's backward (long sequences)
    /// grows its chunk until the chunk's phases catch up with it; one whose
    /// peak is a chunk's keeps the job's. Memory never grows past what the
    /// job's chunk needs, so a plan that fits with it fits as run, and a
    /// chunk is never longer than the rank's tokens need.
    pub fn stream_chunk(&self, linear_tokens: f64, attention_tokens: f64) -> u64 {
        let smallest = self.coefficients.streambp_chunk.max(1);
        let peak = self.streamed_step_bytes_in(linear_tokens, attention_tokens, smallest);
        let mut chunk = smallest;
        while (chunk as f64) < linear_tokens {
            let wider = chunk.saturating_mul(2);
            if wider == chunk
                || self.streamed_step_bytes_in(linear_tokens, attention_tokens, wider) > peak
            {
                break;
            }
            chunk = wider;
        }
        chunk
    }

    /// Seconds the chunks of a streamed rank's `linear_tokens` tokens add to
    /// its step, in chunks of `chunk` tokens (see
    /// [`CostCoefficients::streambp_chunk_overhead_s`]).
    pub fn stream_chunk_overhead_s(&self, linear_tokens: f64, chunk: u64) -> f64 {
        let chunks = (linear_tokens / chunk.max(1) as f64).ceil();
        chunks * self.layers() * self.coefficients.streambp_chunk_overhead_s
    }

    /// The head weight's gradient as a chunk's backward makes it, in the
    /// products' precision, before it is added to the gradient the step
    /// accumulates (`trainer/bench/memory` measures the head's phase with
    /// it, at chunks of 64 to 1,024 tokens, in fp32 and bf16).
    fn head_gradient_bytes(&self) -> f64 {
        f64::from(self.model.vocab) * self.hidden() * self.compute_bytes()
    }

    /// Memory a rank may use, bytes.
    pub fn memory_budget_bytes(&self, gpu: &GpuModel) -> f64 {
        gpu.memory_gib * GIB * self.coefficients.usable_memory_fraction
    }

    /// Memory a rank of a world of `world` may use, bytes: its GPU's
    /// ([`Self::memory_budget_bytes`]), or less where a token budget
    /// ([`CostCoefficients::max_tokens_per_rank`]) caps it: the model's
    /// states and what that many tokens take in plain backprop.
    pub fn rank_budget_bytes(&self, gpu: &GpuModel, world: u32) -> f64 {
        let memory = self.memory_budget_bytes(gpu);
        match self.coefficients.max_tokens_per_rank {
            Some(cap) => {
                let t = cap as f64;
                memory.min(
                    self.model_state_bytes(world) + self.with_streaming(false).step_bytes(t, t),
                )
            }
            None => memory,
        }
    }

    /// How many tokens one rank can hold (same layout for linear and attention).
    pub fn token_capacity(&self, gpu: &GpuModel, world: u32) -> u64 {
        let room = self.memory_budget_bytes(gpu) - self.model_state_bytes(world);
        if room <= 0.0 {
            return 0;
        }
        let capacity = if self.streams() {
            // A step's memory is not proportional to its tokens (a chunk's
            // share is capped): the most that fit, found by search.
            last_fitting(|n| self.step_bytes(n as f64, n as f64) <= room)
        } else {
            (room / self.step_bytes(1.0, 1.0)).floor() as u64
        };
        self.coefficients
            .max_tokens_per_rank
            .map_or(capacity, |cap| {
                capacity.min(self.tokens_in_plain_memory_of(cap))
            })
    }

    /// The most tokens whose step memory ([`Self::step_bytes`]) is within
    /// what `tokens` take in plain backprop: `tokens` itself, or more with
    /// StreamBP.
    fn tokens_in_plain_memory_of(&self, tokens: u64) -> u64 {
        if !self.streams() || tokens == 0 {
            return tokens;
        }
        let t = tokens as f64;
        let budget = self.with_streaming(false).step_bytes(t, t);
        let fits = |n: u64| self.step_bytes(n as f64, n as f64) <= budget;
        // (Fewer than `tokens` for a model so shallow that StreamBP keeps
        // more a token.)
        last_fitting(fits)
    }
}

/// The largest count for which `fits` holds, where it holds up to some
/// count and for none past it (memory that grows with the tokens), found by
/// doubling, then bisection; 0 when not even 1 fits.
pub fn last_fitting(fits: impl Fn(u64) -> bool) -> u64 {
    let (mut lo, mut hi) = (0u64, 1u64);
    while fits(hi) && hi < u64::MAX / 2 {
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Time of a ring pass, how much of it is computation, and how much
/// transfer time compute hides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RingTime {
    pub total_s: f64,
    pub compute_s: f64,
    pub hidden_s: f64,
}

/// Bytes of a GiB, for reporting.
pub fn gib(bytes: f64) -> f64 {
    bytes / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h100() -> GpuModel {
        GpuModel::preset("h100").unwrap()
    }

    fn cost(model: &str, streambp: bool) -> CostModel {
        CostModel::new(ModelSpec::preset(model).unwrap(), Default::default())
            .with_streaming(streambp)
    }

    #[test]
    fn attention_is_quadratic_and_linear_is_linear() {
        let c = cost("llama-7b", false);
        let g = h100();
        let a1 = c.attention_compute_time(8192.0, &g);
        let a2 = c.attention_compute_time(16384.0, &g);
        assert!((a2 / a1 - 4.0).abs() < 1e-9);
        let l1 = c.linear_time(8192.0, &g);
        let l2 = c.linear_time(16384.0, &g);
        assert!((l2 / l1 - 2.0).abs() < 1e-9);
        // The FLOP crossover of llama-7b is s* = 2h + 2h_kv + 3f = 49,408 tokens;
        // with attention kernels less efficient than GEMMs it comes earlier.
        let at = |s: f64| c.attention_compute_time(s, &g) / c.linear_time(s, &g);
        assert!(at(49_408.0) > 1.0 && at(8192.0) < 1.0);
    }

    #[test]
    fn ring_of_one_is_plain_attention_and_rings_add_only_overhead() {
        let c = cost("llama-7b", false);
        let g = h100();
        let plain = c.attention_compute_time(65536.0, &g);
        assert!((c.ring_attention_time(65536.0, 1, 1e9, &g) - plain).abs() / plain < 1e-12);
        for d in [2u32, 4, 8, 64] {
            let ring = c.ring_attention_time(65536.0, d, 50e9, &g);
            assert!(ring >= plain / f64::from(d) * 0.999, "degree {d}");
        }
        // Slow links make rings slower, never faster.
        assert!(
            c.ring_attention_time(8192.0, 8, 5e9, &g) > c.ring_attention_time(8192.0, 8, 400e9, &g)
        );
    }

    #[test]
    fn selective_offloading_fits_a_long_sequence_on_fewer_ranks_with_the_copies_hidden() {
        let g = h100();
        let c = cost("llama-7b", false);
        assert_eq!(c.offload_kept(0.0), 1.0);
        assert!((c.offload_kept(1.0) - 2.0 / 32.0).abs() < 1e-12);
        let capacity = 10_000;
        // Short enough to fit on one rank: nothing to offload.
        assert_eq!(c.offload_plan(8_000, capacity, &g), (0.0, 1));
        for length in [65_536u64, 262_144, 2_097_152] {
            let plain = length.div_ceil(capacity) as u32;
            let (ratio, ranks) = c.offload_plan(length, capacity, &g);
            assert!((0.0..=1.0).contains(&ratio), "{length}: ratio {ratio}");
            assert!(
                ranks < plain,
                "{length}: {ranks} ranks, {plain} without offloading"
            );
            // The kept activations fit those ranks...
            let kept = length as f64 * c.offload_kept(ratio);
            assert!(kept <= f64::from(ranks) * capacity as f64 + 1.0);
            // ...and the copies hide under the forward compute.
            let s = length as f64;
            let forward =
                (c.linear_time(s, &g) + c.attention_compute_time(s, &g)) * c.forward_share();
            assert!(c.offload_transfer_time(s, ratio, &g) <= forward * (1.0 + 1e-9));
        }
    }

    #[test]
    fn streambp_trades_memory_for_compute() {
        let plain = cost("llama-7b", false);
        let stream = cost("llama-7b", true);
        let g = h100();
        assert!(stream.token_capacity(&g, 64) > 4 * plain.token_capacity(&g, 64));
        assert!(stream.linear_time(1000.0, &g) > plain.linear_time(1000.0, &g));
        // llama-7b keeps 235,648 bytes/token/layer in weft's engine (bf16:
        // 16h fp32 + (6h + 4h_kv + 4f)·2 + 4·heads), 7.54 MB per token over
        // 32 layers, split between the linear and the attention layout; a
        // fused engine keeps 34h = 4.46 MB (Korthikanti, systems.md).
        let total = plain.activation_bytes_per_token() + plain.attention_bytes_per_token();
        assert!((total / 1e6 - 7.54).abs() < 0.01, "{total}");
        // fp32 keeps the products at twice the bytes, the residual stream as it is.
        let fp32 = CostModel::new(
            plain.model.clone(),
            CostCoefficients {
                precision: ActivationPrecision::Fp32,
                ..Default::default()
            },
        );
        let h = 4096.0 * 32.0;
        let fp32_total = fp32.activation_bytes_per_token() + fp32.attention_bytes_per_token();
        assert!(
            (fp32_total - total - (6.0 * h + 4.0 * h + 4.0 * 11008.0 * 32.0) * 2.0).abs() < 1.0
        );
    }

    #[test]
    fn a_token_budget_is_plain_backprops_memory_and_streambp_holds_more_in_it() {
        let g = h100();
        let budget = |streambp: bool| {
            let mut c = cost("llama-7b", streambp);
            c.coefficients.max_tokens_per_rank = Some(1_000);
            c
        };
        let (plain, stream) = (budget(false), budget(true));
        assert_eq!(plain.token_capacity(&g, 64), 1_000);
        let held = stream.token_capacity(&g, 64);
        assert!(held > 4_000, "{held}");
        let bytes = |c: &CostModel, n: u64| c.step_bytes(n as f64, n as f64);
        assert!(bytes(&stream, held) <= bytes(&plain, 1_000));
        assert!(bytes(&stream, held + 1) > bytes(&plain, 1_000));
    }

    #[test]
    fn streambp_peaks_in_its_largest_phase_and_chunks_grow_while_memory_allows() {
        let stream = cost("llama-7b", true);
        let in_chunks =
            |tokens: f64, chunk: u64| stream.streamed_step_bytes_in(tokens, tokens, chunk);
        // A long rank peaks in the ring's backward: a chunk 4x the job's costs
        // no memory.
        let long = 131_072.0;
        assert_eq!(in_chunks(long, 4096), in_chunks(long, 16_384));
        // A short one peaks in a chunk's phase: the chunk's share counts.
        let short = 16_384.0;
        assert!(in_chunks(short, 16_384) > in_chunks(short, 4096));
        // Whatever the phase, the inputs of every layer stay (fp32).
        assert!(in_chunks(long, 4096) > long * 32.0 * 4096.0 * 4.0);
        // The chunk: the job's times the largest power of two that costs no
        // memory. A short rank keeps the job's; a long one grows it, up to
        // where the chunk's phases catch up with the ring's.
        assert_eq!(stream.stream_chunk(short, short), 4096);
        let grown = stream.stream_chunk(long, long);
        assert!(
            grown >= 16_384 && (grown / 4096).is_power_of_two(),
            "{grown}"
        );
        assert_eq!(in_chunks(long, grown), in_chunks(long, 4096));
        assert!(grown >= 131_072 || in_chunks(long, 2 * grown) > in_chunks(long, 4096));
        // Never longer than the rank's tokens need.
        assert_eq!(stream.stream_chunk(1000.0, 1000.0), 4096);
        // Fewer chunks cost less time.
        assert!(
            stream.stream_chunk_overhead_s(long, 16_384)
                < stream.stream_chunk_overhead_s(long, 4096)
        );
        assert_eq!(stream.stream_chunk_overhead_s(0.0, 4096), 0.0);
    }

    #[test]
    fn big_models_need_many_ranks_for_their_states() {
        let c = cost("llama-70b", false);
        let g = h100();
        assert_eq!(c.token_capacity(&g, 8), 0, "70B does not fit on one node");
        assert!(c.token_capacity(&g, 512) > 1000);
    }
}
