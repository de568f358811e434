//! The distributed training step: forward and backward of the model over one
//! step plan, on this rank, with the other ranks of the plan.
//!
//! Every rank holds the whole model (data parallel) and the plan's tokens:
//! - the linear modules (embedding, norms, projections, MLP, head and loss)
//!   run on the micro-batch's linear layout ([`StepPlan::linear_layout`]);
//! - per layer, queries, keys and values (rotated at their tokens' true
//!   positions) move to the attention layout through the remap's all-to-all,
//!   ring attention runs over every ring group this rank belongs to, and the
//!   attention output moves back.
//!
//! Autograd cannot see through the collectives, so each layer is cut at them:
//! the local pieces are libtorch graphs whose cut points are leaves, and the
//! backward walks the layers in reverse, feeding each graph its output's
//! gradient, carrying gradients through the remap (each direction's backward
//! is the other direction) and through the ring's own backward. The loss is
//! the summed next-token cross-entropy divided by the number of predicted
//! tokens of the *global* batch, so after the gradient all-reduce every plan,
//! on any number of ranks, yields the gradient of one process over the whole
//! batch.

use std::time::Instant;

use serde::Serialize;
use tch::nn::Module;
use tch::{Kind, Tensor};
use weft_planner::plan::{MicroBatch, StepPlan, TokenRun, zigzag_chunk_start};

use crate::attention::{
    AttentionError, DocShard, RingOutput, RingShard, chunks_of, ring_attention_backward,
    ring_attention_forward,
};
use crate::comm::{CommError, ProcessGroup};
use crate::data::Batch;
use crate::model::{Block, Llama, ModelError, Rotary, rope};
use crate::remap::{Remap, RemapError};

/// What went wrong in a training step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Attention(#[from] AttentionError),
    #[error(transparent)]
    Remap(#[from] RemapError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("the step plan is for {plan} ranks, but {world} ranks are running")]
    World { plan: u32, world: u32 },
    #[error("the step plan does not match the batch: {0}")]
    PlanBatch(String),
    #[error("the batch has no token to predict (every sequence is a single token)")]
    NothingToPredict,
}

impl StepError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            StepError::Comm(e) => e.category(),
            StepError::Attention(e) => e.category(),
            StepError::Remap(e) => e.category(),
            StepError::Model(e) => e.category(),
            StepError::Torch(_) => "torch",
            StepError::World { .. } | StepError::PlanBatch(_) => "plan_mismatch",
            StepError::NothingToPredict => "data_config",
        }
    }
}

/// Seconds this rank spent on each kind of work in one step.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTimes {
    /// Ring attention, forward and backward, with its point-to-point transfers.
    pub attention_s: f64,
    /// The remap's all-to-alls, both ways.
    pub remap_s: f64,
    /// The gradient all-reduce.
    pub all_reduce_s: f64,
    /// Everything, from the first micro-batch to the reduced gradients.
    pub total_s: f64,
}

/// A kind of work inside a step's forward and backward, timed where it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkKind {
    RingAttention,
    RingAttentionBackward,
    Remap,
}

impl WorkKind {
    /// Its name as a trace span.
    pub fn span_name(self) -> &'static str {
        match self {
            WorkKind::RingAttention => "ring_attention",
            WorkKind::RingAttentionBackward => "ring_attention_backward",
            WorkKind::Remap => "remap",
        }
    }
}

/// When one piece of work of a step ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub kind: WorkKind,
    pub micro_batch: u32,
    pub start: Instant,
    pub end: Instant,
}

impl Interval {
    /// Work of `kind` in `micro_batch` from `start` to now.
    fn until_now(kind: WorkKind, micro_batch: u32, start: Instant) -> Interval {
        Interval {
            kind,
            micro_batch,
            start,
            end: Instant::now(),
        }
    }

    pub fn seconds(&self) -> f64 {
        self.end.duration_since(self.start).as_secs_f64()
    }
}

/// What one rank did in one step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutcome {
    /// This rank's summed next-token loss (not yet normalised).
    pub loss_sum: f64,
    /// Predicted tokens of the global batch (the loss normaliser).
    pub predicted: i64,
    pub times: StepTimes,
    /// Tokens this rank held in the attention and in the linear layouts, over
    /// all micro-batches.
    pub attention_tokens: i64,
    pub linear_tokens: i64,
    /// When its ring attention (forward and backward) and remaps ran, in
    /// order (for its trace).
    pub intervals: Vec<Interval>,
}

/// One document of a ring group, as this rank holds it.
#[derive(Clone, Debug)]
struct DocPart {
    position: usize,
    chunk_lengths: Vec<i64>,
    /// Rows of this rank's two chunks, in layout order.
    rows: [i64; 2],
}

/// A ring group this rank belongs to, and its documents.
#[derive(Clone, Debug)]
struct RingPart {
    ring: Vec<u32>,
    /// Inner ring size of a hierarchical ring; 0: flat.
    inner_ring: u32,
    docs: Vec<DocPart>,
}

/// The ring groups of micro-batch `mb` that `rank` belongs to, in plan order:
/// the order of its attention layout.
fn ring_parts(plan: &StepPlan, mb: &MicroBatch, rank: u32) -> Result<Vec<RingPart>, StepError> {
    let mut parts = Vec::new();
    for group in &mb.groups {
        let Some(me) = group.ranks.iter().position(|r| *r == rank) else {
            continue;
        };
        let d = group.ranks.len();
        let mut docs = Vec::with_capacity(group.sequences.len());
        for (position, id) in group.sequences.iter().enumerate() {
            let length = plan
                .sequences
                .iter()
                .find(|s| s.id == *id)
                .map(|s| s.length)
                .ok_or_else(|| {
                    StepError::PlanBatch(format!("group lists sequence {id}, which has no plan"))
                })?;
            let start = |c: usize| zigzag_chunk_start(length, d as u32, c as u64) as i64;
            let chunk_lengths: Vec<i64> = (0..2 * d).map(|c| start(c + 1) - start(c)).collect();
            let mine = chunks_of(me, position, d);
            docs.push(DocPart {
                position,
                rows: [chunk_lengths[mine[0]], chunk_lengths[mine[1]]],
                chunk_lengths,
            });
        }
        parts.push(RingPart {
            ring: group.ranks.clone(),
            inner_ring: group.inner_ring,
            docs,
        });
    }
    Ok(parts)
}

/// Token ids, positions and next-token targets (−100: none, at a document's
/// end) of a layout's runs.
struct TokenRows {
    tokens: Vec<i64>,
    positions: Vec<i64>,
    /// Each token's sequence length (for rotary frequencies that depend on it).
    lengths: Vec<i64>,
    targets: Vec<i64>,
}

impl TokenRows {
    fn of(runs: &[TokenRun], batch: &Batch) -> Result<TokenRows, StepError> {
        let mut rows = TokenRows {
            tokens: Vec::new(),
            positions: Vec::new(),
            lengths: Vec::new(),
            targets: Vec::new(),
        };
        for run in runs {
            let sample = batch.samples.get(run.sequence as usize).ok_or_else(|| {
                StepError::PlanBatch(format!(
                    "the plan places sequence {}, but the batch has {} sequences",
                    run.sequence,
                    batch.samples.len()
                ))
            })?;
            let tokens = &sample.tokens;
            if run.end as usize > tokens.len() {
                return Err(StepError::PlanBatch(format!(
                    "the plan places tokens up to {} of sequence {}, which has {}",
                    run.end,
                    run.sequence,
                    tokens.len()
                )));
            }
            for p in run.start as usize..run.end as usize {
                rows.tokens.push(i64::from(tokens[p]));
                rows.positions.push(p as i64);
                rows.lengths.push(tokens.len() as i64);
                rows.targets
                    .push(tokens.get(p + 1).map_or(-100, |t| i64::from(*t)));
            }
        }
        Ok(rows)
    }
}

/// Head layout of the model.
#[derive(Clone, Copy, Debug)]
struct Heads {
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl Heads {
    fn of(model: &Llama) -> Heads {
        let spec = model.spec();
        let heads = i64::from(spec.heads);
        Heads {
            heads,
            kv_heads: i64::from(spec.kv_heads),
            head_dim: i64::from(spec.hidden) / heads,
        }
    }

    fn q_width(self) -> i64 {
        self.heads * self.head_dim
    }

    fn kv_width(self) -> i64 {
        self.kv_heads * self.head_dim
    }
}

/// Rows `[n, heads·E]` as `[1, heads, n, E]`.
fn heads_first(rows: &Tensor, heads: i64, head_dim: i64) -> Result<Tensor, tch::TchError> {
    let n = rows.size()[0];
    rows.f_reshape([n, heads, head_dim])?
        .f_transpose(0, 1)?
        .f_unsqueeze(0)?
        .f_contiguous()
}

/// `[1, heads, n, E]` as rows `[n, heads·E]`.
fn rows_first(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let size = t.size();
    let (heads, n, e) = (size[1], size[2], size[3]);
    t.f_squeeze_dim(0)?
        .f_transpose(0, 1)?
        .f_contiguous()?
        .f_reshape([n, heads * e])
}

/// Writes `t` (`[1, heads, r, E]`) into rows `offset..offset + r`, columns
/// `column..column + heads·E` of `rows` (`[n, width]`), in place: what
/// [`rows_first`] gives, without a copy of its own.
fn write_rows_first(
    rows: &Tensor,
    offset: i64,
    column: i64,
    t: &Tensor,
) -> Result<(), tch::TchError> {
    let size = t.size();
    let (heads, r, e) = (size[1], size[2], size[3]);
    tch::no_grad(|| {
        rows.f_narrow(0, offset, r)?
            .f_narrow(1, column, heads * e)?
            .f_view([r, heads, e])?
            .f_permute([1, 0, 2])?
            .f_copy_(&t.f_squeeze_dim(0)?)
    })?;
    Ok(())
}

/// Rotates rows `[n, heads·E]` at `positions` `[n]`.
fn rope_rows(
    rows: &Tensor,
    positions: &Tensor,
    heads: i64,
    head_dim: i64,
    rotary: &Rotary,
) -> Result<Tensor, tch::TchError> {
    rows_first(&rope(
        &heads_first(rows, heads, head_dim)?,
        positions,
        rotary,
    )?)
}

/// The attention half of a layer's linear modules: queries, keys and values
/// of `x`, rotated, as rows `[n, (H + 2·H_kv)·E]`.
fn project_qkv(
    model: &Llama,
    block: &Block,
    x: &Tensor,
    positions: &Tensor,
    h: Heads,
) -> Result<Tensor, tch::TchError> {
    let y = block.attention_norm.forward(x)?;
    let q = rope_rows(
        &model.linear(&block.wq, &y)?,
        positions,
        h.heads,
        h.head_dim,
        &model.rotary,
    )?;
    let k = rope_rows(
        &model.linear(&block.wk, &y)?,
        positions,
        h.kv_heads,
        h.head_dim,
        &model.rotary,
    )?;
    let v = model.linear(&block.wv, &y)?;
    Tensor::f_cat(&[q, k, v], 1)
}

/// The rest of a layer: output projection, residual, MLP.
fn finish_layer(
    model: &Llama,
    block: &Block,
    x: &Tensor,
    attended: &Tensor,
) -> Result<Tensor, tch::TchError> {
    let x = x.f_add(&model.linear(&block.wo, attended)?)?;
    let y = block.mlp_norm.forward(&x)?;
    x.f_add(&model.mlp(block, &y)?)
}

/// What the forward of one ring group keeps for its backward.
struct RingSaved {
    shard: RingShard,
    forward: Vec<RingOutput>,
}

/// Ring attention over every group of `parts`, on attention-layout rows
/// `[n, (H + 2·H_kv)·E]`; returns output rows `[n, H·E]`.
fn attend(
    group: &mut ProcessGroup,
    parts: &[RingPart],
    qkv: &Tensor,
    h: Heads,
) -> Result<(Tensor, Vec<RingSaved>), StepError> {
    let (qw, kw) = (h.q_width(), h.kv_width());
    let mut offset = 0;
    // Each chunk's output is written into its rows as it comes (made once
    // the first ring is done, so it does not add to the ring's own peak).
    let rows_of = || Tensor::f_zeros([qkv.size()[0], qw], (qkv.kind(), qkv.device()));
    let mut out: Option<Tensor> = None;
    let mut written = 0;
    let mut saved = Vec::with_capacity(parts.len());
    for part in parts {
        let mut docs = Vec::with_capacity(part.docs.len());
        for doc in &part.docs {
            let mut pieces: Vec<[Tensor; 3]> = Vec::with_capacity(2);
            for n in doc.rows {
                let rows = qkv.f_narrow(0, offset, n)?;
                offset += n;
                pieces.push([
                    heads_first(&rows.f_narrow(1, 0, qw)?, h.heads, h.head_dim)?,
                    heads_first(&rows.f_narrow(1, qw, kw)?, h.kv_heads, h.head_dim)?,
                    heads_first(&rows.f_narrow(1, qw + kw, kw)?, h.kv_heads, h.head_dim)?,
                ]);
            }
            let [[q0, k0, v0], [q1, k1, v1]] = <[[Tensor; 3]; 2]>::try_from(pieces)
                .map_err(|_| StepError::PlanBatch("a document without two chunks".into()))?;
            docs.push(DocShard {
                position: doc.position,
                chunk_lengths: doc.chunk_lengths.clone(),
                q: [q0, q1],
                k: [k0, k1],
                v: [v0, v1],
            });
        }
        let shard = RingShard { docs };
        let forward = ring_attention_forward(group, &part.ring, part.inner_ring, &shard)?;
        let out = match &mut out {
            Some(out) => out,
            None => out.insert(rows_of()?),
        };
        for doc in &forward {
            for chunk in &doc.out {
                write_rows_first(out, written, 0, chunk)?;
                written += chunk.size()[2];
            }
        }
        saved.push(RingSaved { shard, forward });
    }
    rows_covered(written, qkv.size()[0])?;
    Ok((out.map_or_else(rows_of, Ok)?, saved))
}

/// The backward of [`attend`]: from the gradient of its output rows to the
/// gradient of its `[n, (H + 2·H_kv)·E]` input rows, in `grad`'s kind (the
/// ring accumulates in fp32). `grad` is let go once split by head, and each
/// ring's gradients are written into their rows as they come, so no second
/// copy of either spans all the rows.
fn attend_backward(
    group: &mut ProcessGroup,
    parts: &[RingPart],
    saved: &[RingSaved],
    grad: Tensor,
    h: Heads,
) -> Result<Tensor, StepError> {
    let (qw, kw) = (h.q_width(), h.kv_width());
    let (n, kind, device) = (grad.size()[0], grad.kind(), grad.device());
    // Made once the first ring is done, so it does not add to its peak.
    let rows_of = || Tensor::f_zeros([n, qw + 2 * kw], (kind, device));
    let mut rows: Option<Tensor> = None;
    let mut offset = 0;
    let mut by_part = Vec::with_capacity(parts.len());
    for part in parts {
        let mut grad_out = Vec::with_capacity(part.docs.len());
        for doc in &part.docs {
            let [a, b] = doc.rows;
            let first = heads_first(&grad.f_narrow(0, offset, a)?, h.heads, h.head_dim)?;
            let second = heads_first(&grad.f_narrow(0, offset + a, b)?, h.heads, h.head_dim)?;
            offset += a + b;
            grad_out.push([first, second]);
        }
        by_part.push(grad_out);
    }
    drop(grad);
    let mut written = 0;
    for ((part, saved), grad_out) in parts.iter().zip(saved).zip(by_part) {
        let grads = ring_attention_backward(
            group,
            &part.ring,
            part.inner_ring,
            &saved.shard,
            &saved.forward,
            &grad_out,
        )?;
        drop(grad_out);
        let rows = match &mut rows {
            Some(rows) => rows,
            None => rows.insert(rows_of()?),
        };
        for g in &grads {
            for c in 0..2 {
                write_rows_first(rows, written, 0, &g.dq[c])?;
                write_rows_first(rows, written, qw, &g.dk[c])?;
                write_rows_first(rows, written, qw + kw, &g.dv[c])?;
                written += g.dq[c].size()[2];
            }
        }
    }
    rows_covered(written, n)?;
    Ok(rows.map_or_else(rows_of, Ok)?)
}

/// The ring groups' rows cover the layout's, as `ring_parts` lays them out:
/// no row of a result is left unwritten.
fn rows_covered(written: i64, rows: i64) -> Result<(), StepError> {
    if written == rows {
        Ok(())
    } else {
        Err(StepError::PlanBatch(format!(
            "the ring groups hold {written} rows of this rank's {rows} in the attention layout"
        )))
    }
}

/// The gradient libtorch accumulated on a leaf, zeros when it has none.
fn grad_of(leaf: &Tensor) -> Result<Tensor, tch::TchError> {
    let g = leaf.grad();
    if g.defined() {
        Ok(g)
    } else {
        leaf.f_zeros_like()
    }
}

/// Backpropagates `grad` into the graph that produced `output` (accumulating
/// into parameters and leaves).
fn backward_from(output: &Tensor, grad: &Tensor) -> Result<(), tch::TchError> {
    output.f_mul(&grad.f_detach()?)?.f_sum(None)?.f_backward()
}

/// Moves rows between the layouts, or not at all when the micro-batch has no
/// remap; times the move.
struct Layouts {
    remap: Option<Remap>,
    /// The micro-batch whose rows it moves.
    micro_batch: u32,
    /// When each move ran.
    ran: Vec<Interval>,
}

impl Layouts {
    fn move_to_attention(
        &mut self,
        group: &mut ProcessGroup,
        x: &Tensor,
    ) -> Result<Tensor, StepError> {
        self.timed(group, x, Remap::to_attention)
    }

    fn move_to_linear(
        &mut self,
        group: &mut ProcessGroup,
        x: &Tensor,
    ) -> Result<Tensor, StepError> {
        self.timed(group, x, Remap::to_linear)
    }

    fn timed(
        &mut self,
        group: &mut ProcessGroup,
        x: &Tensor,
        direction: fn(&Remap, &mut ProcessGroup, &Tensor) -> Result<Tensor, RemapError>,
    ) -> Result<Tensor, StepError> {
        let Some(remap) = &self.remap else {
            return Ok(x.shallow_clone());
        };
        settle(x.device());
        let t = Instant::now();
        let out = direction(remap, group, x)?;
        settle(x.device());
        self.ran
            .push(Interval::until_now(WorkKind::Remap, self.micro_batch, t));
        Ok(out)
    }
}

/// Waits for the work queued on `device` (a GPU runs it asynchronously), so
/// a component's seconds are its own; nothing to wait for on the CPU.
pub(crate) fn settle(device: tch::Device) {
    if let tch::Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// One layer's forward state, kept for its backward.
struct LayerSaved {
    /// The layer's input (a leaf) and output.
    input: Tensor,
    output: Tensor,
    /// Queries, keys and values in the linear layout (the first graph's output).
    qkv: Tensor,
    /// The attention output in the linear layout (the second graph's leaf).
    attended: Tensor,
    rings: Vec<RingSaved>,
}

/// How a run's backward passes keep what they need. The step plan says it
/// per ring ([`weft_planner::plan::Group::stream_bp_chunk`]) and
/// [`forward_backward`] follows the plan; this is what plans are made with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backprop {
    /// Every layer keeps its activations from the forward (libtorch graphs).
    #[default]
    Plain,
    /// StreamBP on every ring: the forward keeps only each layer's input;
    /// the backward recomputes each layer and backpropagates its tokens in
    /// chunks of `chunk_tokens` rows along the sequence, so one chunk's
    /// intermediates are alive at a time.
    Streamed { chunk_tokens: u64 },
    /// StreamBP on the rings the planner chooses (weft: where it is faster
    /// than the wider ring plain backprop needs, or where only it fits; the
    /// other strategies stream every ring), plain backprop on the others.
    PerRing { chunk_tokens: u64 },
}

impl Backprop {
    /// The chunk of StreamBP, `None` for plain backprop.
    pub fn chunk_tokens(self) -> Option<u64> {
        match self {
            Backprop::Plain => None,
            Backprop::Streamed { chunk_tokens } | Backprop::PerRing { chunk_tokens } => {
                Some(chunk_tokens)
            }
        }
    }

    /// Where the plans may stream.
    pub fn planned(self) -> weft_planner::cost::StreamBp {
        use weft_planner::cost::StreamBp;
        match self {
            Backprop::Plain => StreamBp::Off,
            Backprop::Streamed { .. } => StreamBp::Always,
            Backprop::PerRing { .. } => StreamBp::PerRing,
        }
    }
}

/// A micro-batch's token ids, positions and targets in the linear layout.
struct Rows<'a> {
    tokens: &'a Tensor,
    positions: &'a Tensor,
    targets: &'a Tensor,
}

/// The row ranges `(start, length)` of `rows` rows in chunks of `chunk`; one
/// empty range when there are no rows, so every computation still yields a
/// (zero-row) result of the right width.
fn chunk_ranges(rows: i64, chunk: u64) -> Vec<(i64, i64)> {
    let chunk = i64::try_from(chunk).unwrap_or(i64::MAX).max(1);
    if rows == 0 {
        return vec![(0, 0)];
    }
    (0..rows)
        .step_by(chunk as usize)
        .map(|start| (start, chunk.min(rows - start)))
        .collect()
}

/// `f` over the chunks of `rows` rows, each result written into its rows of
/// one tensor as it comes (so a full-row result never exists twice).
fn by_chunks(
    rows: i64,
    chunk: u64,
    mut f: impl FnMut(i64, i64) -> Result<Tensor, StepError>,
) -> Result<Tensor, StepError> {
    let mut out: Option<Tensor> = None;
    for (start, n) in chunk_ranges(rows, chunk) {
        let piece = f(start, n)?;
        let whole = match &out {
            Some(whole) => whole,
            None => {
                let mut size = piece.size();
                size[0] = rows;
                out.insert(Tensor::f_empty(&size, (piece.kind(), piece.device()))?)
            }
        };
        tch::no_grad(|| whole.f_narrow(0, start, n)?.f_copy_(&piece))?;
    }
    // `chunk_ranges` gives at least one range.
    out.ok_or_else(|| StepError::PlanBatch("no chunk to compute".into()))
}

/// A leaf copy of rows `start..start + n` of `t`, for a chunk's own graph.
fn leaf_rows(t: &Tensor, start: i64, n: i64) -> Result<Tensor, tch::TchError> {
    Ok(t.f_narrow(0, start, n)?.f_detach()?.set_requires_grad(true))
}

/// One micro-batch's forward and backward on this rank.
struct Pass<'a> {
    model: &'a Llama,
    group: &'a mut ProcessGroup,
    parts: &'a [RingPart],
    layouts: &'a mut Layouts,
    heads: Heads,
    /// Predicted tokens of the global batch.
    predicted: i64,
    device: tch::Device,
    outcome: &'a mut StepOutcome,
    /// The micro-batch it runs (its intervals say so).
    micro_batch: u32,
}

impl Pass<'_> {
    /// Ring attention over this rank's groups, timed.
    fn attend(&mut self, qkv_attention: &Tensor) -> Result<(Tensor, Vec<RingSaved>), StepError> {
        settle(self.device);
        let t = Instant::now();
        let result = attend(self.group, self.parts, qkv_attention, self.heads)?;
        settle(self.device);
        self.ran(WorkKind::RingAttention, t);
        Ok(result)
    }

    /// The backward of ring attention over this rank's groups, timed.
    fn attend_backward(
        &mut self,
        rings: &[RingSaved],
        grad_attention: Tensor,
    ) -> Result<Tensor, StepError> {
        settle(self.device);
        let t = Instant::now();
        let grad = attend_backward(self.group, self.parts, rings, grad_attention, self.heads)?;
        settle(self.device);
        self.ran(WorkKind::RingAttentionBackward, t);
        Ok(grad)
    }

    /// Records work of `kind` from `start` to now.
    fn ran(&mut self, kind: WorkKind, start: Instant) {
        self.outcome
            .intervals
            .push(Interval::until_now(kind, self.micro_batch, start));
    }

    /// The head and the summed next-token loss of rows `x` against
    /// `targets`, added to the outcome and backpropagated as this rank's
    /// share of the global mean loss.
    fn head_and_loss(&mut self, x: &Tensor, targets: &Tensor) -> Result<(), StepError> {
        let model = self.model;
        let logits = model.linear(&model.head, &model.norm.forward(x)?)?;
        let loss_sum = logits.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
            targets,
            None::<Tensor>,
            tch::Reduction::Sum,
            -100,
        )?;
        self.outcome.loss_sum += loss_sum.f_double_value(&[])?;
        loss_sum.f_div_scalar(self.predicted as f64)?.f_backward()?;
        Ok(())
    }

    /// Plain backprop: every layer's graphs live from its forward to its
    /// backward, cut at the collectives.
    fn plain(&mut self, rows: &Rows) -> Result<(), StepError> {
        let model = self.model;
        let embedded = model.embedding.forward(rows.tokens);
        let mut x = embedded.f_detach()?.set_requires_grad(true);
        let mut layers = Vec::with_capacity(model.blocks.len());
        for block in &model.blocks {
            let qkv = project_qkv(model, block, &x, rows.positions, self.heads)?;
            let qkv_attention = self
                .layouts
                .move_to_attention(self.group, &qkv.f_detach()?)?;
            let (out, rings) = self.attend(&qkv_attention)?;
            let attended = self
                .layouts
                .move_to_linear(self.group, &out)?
                .f_detach()?
                .set_requires_grad(true);
            let output = finish_layer(model, block, &x, &attended)?;
            let next = output.f_detach()?.set_requires_grad(true);
            layers.push(LayerSaved {
                input: x,
                output,
                qkv,
                attended,
                rings,
            });
            x = next;
        }
        self.head_and_loss(&x, rows.targets)?;

        // Backward, layer by layer in reverse.
        let mut grad = grad_of(&x)?;
        for layer in layers.iter().rev() {
            backward_from(&layer.output, &grad)?;
            let grad_attended = self
                .layouts
                .move_to_attention(self.group, &grad_of(&layer.attended)?)?;
            let grad_qkv = self.attend_backward(&layer.rings, grad_attended)?;
            let grad_qkv = self.layouts.move_to_linear(self.group, &grad_qkv)?;
            backward_from(&layer.qkv, &grad_qkv)?;
            grad = grad_of(&layer.input)?;
        }
        backward_from(&embedded, &grad)?;
        Ok(())
    }

    /// StreamBP composed with ring attention and the remap.
    ///
    /// The forward runs without graphs and keeps each layer's input only. The
    /// head and loss run chunk by chunk, forward and backward together, so
    /// the rank's full logits never exist. Each layer's backward then:
    /// 1. recomputes the queries, keys and values of the rank's tokens chunk
    ///    by chunk (no graph), moves them to the attention layout and runs the
    ///    ring forward again: the keys and values go round the ring once, and
    ///    the output and log-sum-exp are the forward's own (the same
    ///    operations on the same inputs, in the same order);
    /// 2. per chunk of rows, rebuilds the rest of the layer (output
    ///    projection, residual, norm, SwiGLU) as a graph on the chunk's
    ///    input and attention output, and backpropagates the chunk's share of
    ///    the layer's output gradient: the weight gradients accumulate, and
    ///    the chunk's attention-output and residual gradients come out;
    /// 3. runs the ring backward once for all the rank's tokens (keys, values
    ///    and their fp32 gradients go round the ring as in plain backprop);
    /// 4. per chunk again, rebuilds the projections as a graph and
    ///    backpropagates the chunk's query, key and value gradients.
    ///
    /// It is exact because every operation outside attention acts on each
    /// token on its own (rows of a chunk do not see each other), so the
    /// chunks' graphs together are the layer's graph, and attention itself
    /// is differentiated over all the rank's tokens at once, as in plain
    /// backprop; only the order of the weight-gradient sums changes.
    ///
    /// What it costs: one more forward of every layer (its linear modules in
    /// chunks, its attention in one ring pass), so keys and values travel
    /// round the ring three times per layer instead of two; the remap moves
    /// the queries, keys and values and the attention output once more. What
    /// stays alive for a layer's backward is its input, the ring's queries,
    /// keys, values, output and log-sum-exp of that one layer, and one
    /// chunk's working set.
    fn streamed(&mut self, rows: &Rows, chunk_tokens: u64) -> Result<(), StepError> {
        let model = self.model;
        let h = self.heads;
        let n = rows.tokens.size()[0];
        let mut x = tch::no_grad(|| model.embedding.forward(rows.tokens));
        // Forward: the layers' inputs only.
        let mut inputs = Vec::with_capacity(model.blocks.len());
        for block in &model.blocks {
            let (attended, _) = self.attention_output(block, &x, rows, chunk_tokens)?;
            let output = tch::no_grad(|| {
                by_chunks(n, chunk_tokens, |start, len| {
                    Ok(finish_layer(
                        model,
                        block,
                        &x.f_narrow(0, start, len)?,
                        &attended.f_narrow(0, start, len)?,
                    )?)
                })
            })?;
            inputs.push(std::mem::replace(&mut x, output));
        }

        // Head and loss, chunk by chunk, forward and backward at once.
        let mut grad = by_chunks(n, chunk_tokens, |start, len| {
            let xc = leaf_rows(&x, start, len)?;
            self.head_and_loss(&xc, &rows.targets.f_narrow(0, start, len)?)?;
            Ok(grad_of(&xc)?)
        })?;

        drop(x);
        // Backward, layer by layer in reverse.
        for (block, input) in model.blocks.iter().zip(&inputs).rev() {
            let (attended, rings) = self.attention_output(block, input, rows, chunk_tokens)?;
            // The gradient through the residual, kept for after the ring.
            let through_residual = input.f_zeros_like()?;
            let grad_qkv = {
                let grad_out = std::mem::replace(&mut grad, Tensor::new());
                // A chunk's rows of the incoming gradient are spent once its
                // backward ran: where the kinds agree, the attention output's
                // gradient takes their place, so no second tensor of the
                // rank's rows is made.
                let in_place = grad_out.kind() == attended.kind();
                let chunk_backward = |start: i64, len: i64| -> Result<Tensor, StepError> {
                    let xc = leaf_rows(input, start, len)?;
                    let ac = leaf_rows(&attended, start, len)?;
                    let output = finish_layer(model, block, &xc, &ac)?;
                    backward_from(&output, &grad_out.f_narrow(0, start, len)?)?;
                    tch::no_grad(|| {
                        through_residual
                            .f_narrow(0, start, len)?
                            .f_copy_(&grad_of(&xc)?)
                    })?;
                    Ok(grad_of(&ac)?)
                };
                let grad_attended = if in_place {
                    for (start, len) in chunk_ranges(n, chunk_tokens) {
                        let g = chunk_backward(start, len)?;
                        tch::no_grad(|| grad_out.f_narrow(0, start, len)?.f_copy_(&g))?;
                    }
                    grad_out
                } else {
                    let grad_attended = by_chunks(n, chunk_tokens, chunk_backward)?;
                    drop(grad_out);
                    grad_attended
                };
                drop(attended);
                let grad_attention = self.layouts.move_to_attention(self.group, &grad_attended)?;
                drop(grad_attended);
                let grad_qkv = self.attend_backward(&rings, grad_attention)?;
                drop(rings);
                self.layouts.move_to_linear(self.group, &grad_qkv)?
            };
            // The gradient into the layer's input: through the residual
            // plus through the projections, added in place into the first.
            for (start, len) in chunk_ranges(n, chunk_tokens) {
                let xc = leaf_rows(input, start, len)?;
                let qkv = project_qkv(
                    model,
                    block,
                    &xc,
                    &rows.positions.f_narrow(0, start, len)?,
                    h,
                )?;
                backward_from(&qkv, &grad_qkv.f_narrow(0, start, len)?)?;
                tch::no_grad(|| {
                    through_residual
                        .f_narrow(0, start, len)?
                        .f_add_(&grad_of(&xc)?)
                        .map(|_| ())
                })?;
            }
            drop(grad_qkv);
            grad = through_residual;
        }
        // The embedding's gradient, added row by row into the table's own:
        // libtorch's embedding backward would first build a whole table of
        // gradients (vocabulary × hidden) to add, more than a chunk holds.
        let mut table = model.embedding.ws.grad();
        if table.defined() {
            tch::no_grad(|| table.f_index_add_(0, rows.tokens, &grad.f_to_kind(table.kind())?))
                .map(|_| ())?;
        } else {
            let embedded = model.embedding.forward(rows.tokens);
            backward_from(&embedded, &grad)?;
        }
        Ok(())
    }

    /// A layer's attention output in the linear layout, with what the ring
    /// keeps for its backward, computed without graphs: the projections chunk
    /// by chunk, then one ring pass.
    fn attention_output(
        &mut self,
        block: &Block,
        x: &Tensor,
        rows: &Rows,
        chunk_tokens: u64,
    ) -> Result<(Tensor, Vec<RingSaved>), StepError> {
        let (model, h) = (self.model, self.heads);
        let _no_grad = tch::no_grad_guard();
        let qkv = by_chunks(x.size()[0], chunk_tokens, |start, len| {
            Ok(project_qkv(
                model,
                block,
                &x.f_narrow(0, start, len)?,
                &rows.positions.f_narrow(0, start, len)?,
                h,
            )?)
        })?;
        let qkv_attention = self.layouts.move_to_attention(self.group, &qkv)?;
        drop(qkv);
        let (out, rings) = self.attend(&qkv_attention)?;
        let attended = self.layouts.move_to_linear(self.group, &out)?;
        Ok((attended, rings))
    }
}

/// Checks that the plan is for this world and this batch.
pub fn check_plan(plan: &StepPlan, batch: &Batch, world: u32) -> Result<(), StepError> {
    if plan.world_size != world {
        return Err(StepError::World {
            plan: plan.world_size,
            world,
        });
    }
    plan.check()
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    // Refused, not run as something else.
    if let Some((mb, group)) = plan.micro_batches.iter().find_map(|mb| {
        mb.groups
            .iter()
            .find(|g| g.offload > 0.0)
            .map(|g| (mb.index, g))
    }) {
        return Err(StepError::PlanBatch(format!(
            "micro-batch {mb} offloads a share {} of a group's activations to host memory, which this engine does not do",
            group.offload
        )));
    }
    if plan.sequences.len() != batch.samples.len() {
        return Err(StepError::PlanBatch(format!(
            "the plan has {} sequences, the batch {}",
            plan.sequences.len(),
            batch.samples.len()
        )));
    }
    for (i, (seq, sample)) in plan.sequences.iter().zip(&batch.samples).enumerate() {
        if seq.id != i as u64 || seq.length != sample.tokens.len() as u64 {
            return Err(StepError::PlanBatch(format!(
                "the plan's sequence {} has {} tokens, the batch's sequence {i} has {}",
                seq.id,
                seq.length,
                sample.tokens.len()
            )));
        }
    }
    Ok(())
}

/// Predicted tokens of a batch: every token but each sequence's last.
pub fn predicted_tokens(batch: &Batch) -> i64 {
    batch
        .samples
        .iter()
        .map(|s| s.tokens.len().saturating_sub(1) as i64)
        .sum()
}

/// Forward and backward of `plan` on this rank: accumulates into the model's
/// parameter gradients this rank's share of the gradient of the global mean
/// loss. Summed over all ranks (the gradient all-reduce) it is the gradient
/// one process computes over the whole batch. Each micro-batch
/// backpropagates as the plan says for this rank (plain, or StreamBP in its
/// chunks; see [`StepPlan::stream_bp_chunk`]); a rank's peers in a ring
/// backpropagate alike, so their collectives match.
pub fn forward_backward(
    model: &Llama,
    group: &mut ProcessGroup,
    plan: &StepPlan,
    batch: &Batch,
) -> Result<StepOutcome, StepError> {
    let (rank, world) = (group.rank(), group.world());
    check_plan(plan, batch, world)?;
    let predicted = predicted_tokens(batch);
    if predicted == 0 {
        return Err(StepError::NothingToPredict);
    }
    let h = Heads::of(model);
    let started = Instant::now();
    let mut outcome = StepOutcome {
        predicted,
        ..Default::default()
    };
    let device = model.head.ws.device();
    for mb in &plan.micro_batches {
        let parts = ring_parts(plan, mb, rank)?;
        let routes = if mb.remap {
            plan.remap_routes(mb.index, rank)
        } else {
            None
        };
        let mut layouts = Layouts {
            remap: routes
                .map(|r| Remap::new(&r, rank, world).on_device(device))
                .transpose()?,
            micro_batch: mb.index,
            ran: Vec::new(),
        };
        let rows = TokenRows::of(&plan.linear_layout(mb.index, rank), batch)?;
        let attention_rows: i64 = parts
            .iter()
            .flat_map(|p| p.docs.iter().map(|d| d.rows[0] + d.rows[1]))
            .sum();
        let expected = layouts
            .remap
            .as_ref()
            .map_or(rows.tokens.len() as i64, Remap::attention_rows);
        if attention_rows != expected {
            return Err(StepError::PlanBatch(format!(
                "micro-batch {}: rank {rank}'s ring groups hold {attention_rows} tokens, its attention layout {expected}",
                mb.index
            )));
        }
        outcome.attention_tokens += attention_rows;
        outcome.linear_tokens += rows.tokens.len() as i64;
        let tokens = Tensor::from_slice(&rows.tokens).f_to_device(device)?;
        let positions = model
            .rotary
            .positions(&rows.positions, &rows.lengths, device)?;
        let targets = Tensor::from_slice(&rows.targets).f_to_device(device)?;

        let rows = Rows {
            tokens: &tokens,
            positions: &positions,
            targets: &targets,
        };
        let mut pass = Pass {
            model,
            group,
            parts: &parts,
            layouts: &mut layouts,
            heads: h,
            predicted,
            device,
            outcome: &mut outcome,
            micro_batch: mb.index,
        };
        match plan.stream_bp_chunk(mb.index, rank) {
            None => pass.plain(&rows)?,
            Some(chunk_tokens) => pass.streamed(&rows, chunk_tokens)?,
        }
        outcome.intervals.append(&mut layouts.ran);
    }
    settle(device);
    outcome.times.total_s = started.elapsed().as_secs_f64();
    outcome.intervals.sort_by_key(|i| i.start);
    // The seconds of each kind of work are those of its intervals.
    let seconds_in = |kinds: &[WorkKind]| -> f64 {
        outcome
            .intervals
            .iter()
            .filter(|i| kinds.contains(&i.kind))
            .map(Interval::seconds)
            .sum()
    };
    let attention_s = seconds_in(&[WorkKind::RingAttention, WorkKind::RingAttentionBackward]);
    let remap_s = seconds_in(&[WorkKind::Remap]);
    outcome.times.attention_s = attention_s;
    outcome.times.remap_s = remap_s;
    Ok(outcome)
}

/// The model's variables by name, in name order: the same order on every
/// rank (the variable store itself is a hash map).
pub fn named_parameters(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Zeroes every parameter's gradient, giving one to any parameter that has
/// none yet, so every rank reduces the same list of tensors.
pub fn zero_gradients(params: &[(String, Tensor)]) -> Result<(), StepError> {
    for (_, p) in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.f_zero_()?;
        } else {
            p.f_mul_scalar(0.0)?.f_sum(None)?.f_backward()?;
        }
    }
    Ok(())
}

/// Sums every parameter's gradient over all ranks, in one all-reduce; returns
/// the seconds it took.
pub fn all_reduce_gradients(
    params: &[(String, Tensor)],
    group: &mut ProcessGroup,
) -> Result<f64, StepError> {
    let t = Instant::now();
    if params.is_empty() || group.world() == 1 {
        return Ok(t.elapsed().as_secs_f64());
    }
    let grads: Vec<Tensor> = params
        .iter()
        .map(|(_, p)| grad_of(p).and_then(|g| g.f_reshape([-1])))
        .collect::<Result<_, _>>()?;
    let mut flat = Tensor::f_cat(&grads, 0)?.f_contiguous()?;
    group.all_reduce_sum(&mut flat)?;
    let mut offset = 0;
    for (name, p) in params {
        let n = p.numel() as i64;
        let mut g = p.grad();
        if !g.defined() {
            return Err(StepError::PlanBatch(format!(
                "parameter {name} has no gradient (call zero_gradients first)"
            )));
        }
        g.f_copy_(&flat.f_narrow(0, offset, n)?.f_view_as(p)?)?;
        offset += n;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// One process's reference: the gradient of the mean next-token loss over the
/// whole batch, each sequence on its own, accumulated into the model's
/// parameter gradients. Returns the loss.
pub fn reference_forward_backward(model: &Llama, batch: &Batch) -> Result<f64, StepError> {
    let predicted = predicted_tokens(batch);
    if predicted == 0 {
        return Err(StepError::NothingToPredict);
    }
    let device = model.head.ws.device();
    let mut total = 0.0;
    for sample in &batch.samples {
        let ids: Vec<i64> = sample.tokens.iter().map(|t| i64::from(*t)).collect();
        let tokens = Tensor::from_slice(&ids).f_to_device(device)?;
        let (sum, count) = model.loss_sum(&tokens, &[ids.len() as i64])?;
        if count == 0 {
            continue;
        }
        total += sum.f_double_value(&[])?;
        sum.f_div_scalar(predicted as f64)?.f_backward()?;
    }
    Ok(total / predicted as f64)
}

/// A ring shape for a ring of `size` ranks, drawn from `rng`: flat (0), or
/// hierarchical with inner rings of any size that divides it (1: every hop
/// between inner rings).
pub fn random_inner_ring(rng: &mut weft_planner::rng::SplitMix64, size: u32) -> u32 {
    let shapes: Vec<u32> = std::iter::once(0)
        .chain((1..size).filter(|i| size.is_multiple_of(*i)))
        .collect();
    shapes[rng.below(shapes.len() as u64) as usize]
}

/// A random valid step plan for `lengths` on `world` ranks, drawn from `rng`:
/// one or two micro-batches, ranks cut into ring groups of random sizes (flat
/// or hierarchical rings in random rank order), each sequence given to a random group (so
/// groups pack several documents, and degrees from 1 to the world size occur
/// in one step), remap on or off. `selfcheck` and the tests run these against
/// the single-process reference.
pub fn random_plan(
    rng: &mut weft_planner::rng::SplitMix64,
    lengths: &[u64],
    world: u32,
    model: &weft_planner::model::ModelSpec,
) -> Result<StepPlan, StepError> {
    use weft_planner::layout::{Layout, LayoutGroup, LayoutMicroBatch, Routing};
    let cluster = weft_planner::cluster::parse_cluster(&format!("1x{world}"))
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    let topology = weft_planner::topology::Topology::new(&cluster)
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    let ctx = weft_planner::PlanContext {
        limits: Default::default(),
        topology,
        cost: weft_planner::cost::CostModel::new(model.clone(), Default::default()),
    };
    let micro_batches = 1 + rng.below(2.min(lengths.len() as u64).max(1)) as usize;
    let mut layout = Layout {
        strategy: "random".to_string(),
        micro_batches: Vec::with_capacity(micro_batches),
        routing: Routing::ClosestNic,
    };
    for _ in 0..micro_batches {
        let mut ranks: Vec<u32> = (0..world).collect();
        for i in (1..ranks.len()).rev() {
            ranks.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut groups = Vec::new();
        let mut rest = &ranks[..];
        while !rest.is_empty() {
            let size = 1 + rng.below(rest.len() as u64) as usize;
            groups.push(LayoutGroup {
                ranks: rest[..size].to_vec(),
                sequences: Vec::new(),
                inner_ring: random_inner_ring(rng, size as u32),
                offload: 0.0,
                stream_bp: false,
            });
            rest = &rest[size..];
        }
        layout.micro_batches.push(LayoutMicroBatch {
            groups,
            remap: rng.below(2) == 1,
        });
    }
    for seq in 0..lengths.len() {
        // The first sequences go one to each micro-batch, so none is empty.
        let mb = if seq < micro_batches {
            seq
        } else {
            rng.below(micro_batches as u64) as usize
        };
        let groups = &mut layout.micro_batches[mb].groups;
        let g = rng.below(groups.len() as u64) as usize;
        groups[g].sequences.push(seq);
    }
    for mb in &mut layout.micro_batches {
        mb.groups.retain(|g| !g.sequences.is_empty());
    }
    let plan = weft_planner::build_plan(&ctx, lengths, &layout);
    plan.check()
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    Ok(plan)
}

/// `plan` with each of its rings streaming its backward (StreamBP, chunks
/// of `chunk` tokens) or not, drawn from `rng`: a coin per group, one per
/// micro-batch where it is remapped, the same for groups that share a rank
/// (see [`weft_planner::plan::Group::stream_bp_chunk`]). What a plan that
/// chooses per ring gives the engine, at random.
pub fn random_stream_bp(
    rng: &mut weft_planner::rng::SplitMix64,
    mut plan: StepPlan,
    chunk: u64,
) -> Result<StepPlan, StepError> {
    for mb in &mut plan.micro_batches {
        let everyone = rng.below(2) == 1;
        let mut chosen: std::collections::BTreeMap<u32, bool> = Default::default();
        for group in &mut mb.groups {
            let streams = if mb.remap {
                everyone
            } else {
                // A rank already in a group of this micro-batch decides.
                let earlier = group.ranks.iter().find_map(|r| chosen.get(r).copied());
                earlier.unwrap_or_else(|| rng.below(2) == 1)
            };
            for &r in &group.ranks {
                chosen.insert(r, streams);
            }
            group.stream_bp_chunk = if streams { chunk } else { 0 };
        }
    }
    plan.check()
        .map_err(|e| StepError::PlanBatch(e.to_string()))?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    fn batch(lengths: &[usize]) -> Batch {
        Batch {
            samples: lengths
                .iter()
                .enumerate()
                .map(|(i, n)| Sample {
                    index: i as u64,
                    document: i,
                    tokens: vec![7; *n],
                })
                .collect(),
        }
    }

    fn plan(lengths: &[usize], world: u32) -> StepPlan {
        let spec = weft_planner::model::ModelSpec::preset("tiny").unwrap();
        let lengths: Vec<u64> = lengths.iter().map(|l| *l as u64).collect();
        random_plan(
            &mut weft_planner::rng::SplitMix64::new(1),
            &lengths,
            world,
            &spec,
        )
        .unwrap()
    }

    #[test]
    fn a_plan_for_another_world_or_batch_is_refused_by_name() {
        let p = plan(&[10, 20], 3);
        let err = check_plan(&p, &batch(&[10, 20]), 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the step plan is for 3 ranks, but 2 ranks are running"
        );
        assert_eq!(err.category(), "plan_mismatch");
        let err = check_plan(&p, &batch(&[10, 21]), 3).unwrap_err();
        assert!(err.to_string().contains("sequence 1 has 21"), "{err}");
        let err = check_plan(&p, &batch(&[10]), 3).unwrap_err();
        assert!(
            err.to_string().contains("2 sequences, the batch 1"),
            "{err}"
        );
        assert!(check_plan(&p, &batch(&[10, 20]), 3).is_ok());
        let mut offloading = p.clone();
        offloading.micro_batches[0].groups[0].offload = 0.5;
        let err = check_plan(&offloading, &batch(&[10, 20]), 3).unwrap_err();
        assert!(
            err.to_string().contains("which this engine does not do"),
            "{err}"
        );
    }

    #[test]
    fn chunks_cover_the_rows_once_in_order() {
        assert_eq!(chunk_ranges(0, 4), vec![(0, 0)]);
        assert_eq!(chunk_ranges(10, 4), vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(chunk_ranges(3, 1), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(chunk_ranges(3, u64::MAX), vec![(0, 3)]);
    }

    #[test]
    fn ring_parts_hold_exactly_each_ranks_attention_layout() {
        let lengths = [1, 5, 40, 77, 3, 120];
        for world in 1..=6 {
            for seed in 0..5 {
                let spec = weft_planner::model::ModelSpec::preset("tiny").unwrap();
                let l: Vec<u64> = lengths.iter().map(|x| *x as u64).collect();
                let mut rng = weft_planner::rng::SplitMix64::new(seed);
                let p = random_plan(&mut rng, &l, world, &spec).unwrap();
                for mb in &p.micro_batches {
                    for rank in 0..world {
                        let parts = ring_parts(&p, mb, rank).unwrap();
                        let rows: i64 = parts
                            .iter()
                            .flat_map(|x| x.docs.iter().map(|d| d.rows[0] + d.rows[1]))
                            .sum();
                        let layout: u64 = p
                            .attention_layout(mb.index, rank)
                            .iter()
                            .map(TokenRun::len)
                            .sum();
                        assert_eq!(rows as u64, layout, "world {world}, rank {rank}");
                    }
                }
            }
        }
    }
}
