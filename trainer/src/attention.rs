//! Distributed causal attention: ring attention over the ranks that share a
//! sequence, with zigzag (head-tail) load balance and the log-sum-exp merge of
//! partial results in fp32 (`shared/references/systems.md` §3).
//!
//! A sequence split over a ring of d ranks is cut into 2d chunks; ring
//! position i holds chunks i and 2d−1−i, rotated by the document's position
//! in its group ([`weft_planner::plan::group_zigzag`]). Each
//! of the d ring steps, a rank attends its query chunks to the key/value chunks
//! it holds (a chunk before its own in full, its own causally, a later one not
//! at all), merges the partial outputs by their log-sum-exp, and passes the
//! key/value chunks to the next rank. The result equals plain causal attention
//! over the whole sequence, to floating-point rounding.
//!
//! A ring group may carry several documents packed together: they share the
//! ring's steps (one message per step carries every document's chunks), each
//! is split zigzag with its own rotation, and no token attends across
//! documents. The backward pass recomputes every block from the merged
//! log-sum-exp and sends dK/dV back around the ring. Keys and values may have
//! fewer heads than queries (grouped-query attention): they travel the ring
//! unexpanded, and each block expands them and sums their gradients back.
//!
//! A ring may be hierarchical (the plan's `inner_ring`): its d ranks are O
//! inner rings of I consecutive ranks, one per node. Position (o, i) = o·I + i
//! spends round a of O going round its inner ring (I steps, I − 1 hops over
//! NVLink), holding the chunks of position (o − a, i − b) at step b; at the end
//! of the round it passes the chunks it started the round with to (o + 1, i),
//! over its own NIC. In the backward, dK/dV go round the inner ring with their
//! chunks and come back to where the round started (I hops), then move on to
//! the next inner ring with the chunks they belong to; after the last round
//! they reach their owner. Every rank still meets every chunk once, so the
//! result is the flat ring's, to rounding. A flat ring is one inner ring.

use tch::{Kind, Tensor};

use crate::comm::{CommError, ProcessGroup};
use crate::kernel::Kernel;

/// What went wrong in distributed attention.
#[derive(Debug, thiserror::Error)]
pub enum AttentionError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("ring of {ring} ranks, but this rank ({rank}) is not in it")]
    NotInRing { rank: u32, ring: usize },
    #[error("query chunk {chunk} and its key/value chunk have different shapes")]
    Shape { chunk: usize },
}

impl AttentionError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            AttentionError::Comm(e) => e.category(),
            AttentionError::Torch(_) => "torch",
            AttentionError::NotInRing { .. } | AttentionError::Shape { .. } => "attention_input",
        }
    }
}

/// A partial attention result: output `[B, H, L, E]` and log-sum-exp `[B, H, L]`, fp32.
#[derive(Debug)]
pub struct Partial {
    pub out: Tensor,
    pub lse: Tensor,
}

impl Partial {
    /// Attention of `q` to `k`/`v`, causal or not, with its log-sum-exp.
    pub fn compute(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        causal: bool,
    ) -> Result<Partial, AttentionError> {
        let (out, lse) = Kernel::for_query(q).forward(q, k, v, causal)?;
        Ok(Partial {
            out: out.f_to_kind(Kind::Float)?,
            lse: lse.f_to_kind(Kind::Float)?,
        })
    }

    /// Merges two partial results over disjoint keys: the softmax-weighted
    /// combination, exactly what attention over the union would give.
    pub fn merge(self, other: Partial) -> Result<Partial, AttentionError> {
        let lse = self.lse.f_logaddexp(&other.lse)?;
        let wa = (&self.lse - &lse).f_exp()?.f_unsqueeze(-1)?;
        let wb = (&other.lse - &lse).f_exp()?.f_unsqueeze(-1)?;
        let out = self.out.f_mul(&wa)?.f_add(&other.out.f_mul(&wb)?)?;
        Ok(Partial { out, lse })
    }
}

/// One document's part, on this rank, of a ring of d ranks: its two zigzag
/// chunks of queries, keys and values, each `[B, H, L_c, E]`.
#[derive(Debug)]
pub struct DocShard {
    /// Position of the document in its group: its zigzag pairs are rotated by
    /// it, as [`weft_planner::plan::group_zigzag`] does.
    pub position: usize,
    /// Tokens in each of the document's 2d chunks. A rank receiving another
    /// rank's keys and values must know their sizes: chunks differ when the
    /// length does not divide, and gloo aborts the process on a size mismatch
    /// rather than returning an error.
    pub chunk_lengths: Vec<i64>,
    pub q: [Tensor; 2],
    pub k: [Tensor; 2],
    pub v: [Tensor; 2],
}

impl DocShard {
    /// This ring position's part of a whole document `[B, H, L, E]` (queries
    /// `q`, keys and values `k`, `v`, which may have fewer heads), split as the
    /// step plan splits the `position`-th document of a group over `ring_len`
    /// ranks ([`weft_planner::plan::group_zigzag`]): ring position i holds
    /// chunks j and 2d−1−j of 2d, j = (i + position) mod d.
    pub fn split(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        position: usize,
        ring_len: u32,
        ring_position: usize,
    ) -> Result<DocShard, AttentionError> {
        let length = q.size().get(2).copied().unwrap_or(0).max(0);
        let d = ring_len.max(1) as usize;
        // 2d chunks whose sizes differ by at most one token, as the plan cuts
        // them (for d = 1 the plan's single range is these two chunks).
        let chunks = 2 * d as i64;
        let start = |c: i64| {
            weft_planner::plan::zigzag_chunk_start(length as u64, d as u32, c as u64) as i64
        };
        let chunk_lengths: Vec<i64> = (0..chunks).map(|c| start(c + 1) - start(c)).collect();
        let held = chunks_of(ring_position, position, d);
        if ring_position >= d {
            return Err(AttentionError::Shape { chunk: 0 });
        }
        let mine = held.map(|c| [start(c as i64) as u64, start(c as i64 + 1) as u64]);
        let part = |t: &Tensor, r: [u64; 2]| -> Result<Tensor, tch::TchError> {
            t.f_narrow(2, r[0] as i64, (r[1] - r[0]) as i64)?
                .f_contiguous()
        };
        let two = |t: &Tensor| -> Result<[Tensor; 2], tch::TchError> {
            Ok([part(t, mine[0])?, part(t, mine[1])?])
        };
        Ok(DocShard {
            position,
            chunk_lengths,
            q: two(q)?,
            k: two(k)?,
            v: two(v)?,
        })
    }
}

/// Plain causal attention over one whole document in one process, and the
/// gradients of `q`, `k`, `v` for output gradient `grad`: the reference
/// distributed attention must match. `k`, `v` may have fewer heads (GQA).
pub fn reference_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: &Tensor,
) -> Result<[Tensor; 4], AttentionError> {
    let heads = q.size()[1];
    let kv_heads = k.size()[1];
    let (ke, ve) = (expand_heads(k, heads)?, expand_heads(v, heads)?);
    let forward = Partial::compute(q, &ke, &ve, true)?;
    let out = forward.out.f_to_kind(q.kind())?;
    let (dq, dk, dv) =
        Kernel::for_query(q).backward(grad, q, &ke, &ve, &out, &forward.lse, true)?;
    Ok([
        forward.out,
        dq,
        reduce_heads(&dk, kv_heads)?,
        reduce_heads(&dv, kv_heads)?,
    ])
}

/// This rank's part of the documents one ring group processes together
/// (packed: they share the ring's steps, and no token attends across
/// documents).
#[derive(Debug)]
pub struct RingShard {
    pub docs: Vec<DocShard>,
}

/// What the forward keeps for the backward, per document and query chunk: the
/// merged output `[B, H, L_c, E]`, in the queries' kind, and log-sum-exp
/// `[B, H, L_c]`, fp32.
#[derive(Debug)]
pub struct RingOutput {
    pub out: [Tensor; 2],
    pub lse: [Tensor; 2],
}

/// Gradients of one document's chunks on this rank, fp32.
#[derive(Debug)]
pub struct RingGrads {
    pub dq: [Tensor; 2],
    pub dk: [Tensor; 2],
    pub dv: [Tensor; 2],
}

/// The chunk indices that ring position `p` holds of the document at
/// `position` in a ring of `d`.
pub fn chunks_of(p: usize, position: usize, d: usize) -> [usize; 2] {
    let j = (p + position) % d;
    [j, 2 * d - 1 - j]
}

/// A ring as this rank runs it: `outer` inner rings of `inner` consecutive
/// ranks (a flat ring is one inner ring of all), and where this rank is in it.
#[derive(Clone, Debug)]
struct RingLayout<'a> {
    ranks: &'a [u32],
    outer: usize,
    inner: usize,
    /// This rank's position: inner ring `o`, place `i` in it.
    o: usize,
    i: usize,
}

impl<'a> RingLayout<'a> {
    /// This rank's place in `ring` run with inner rings of `inner_ring` ranks
    /// (0, or a size that does not divide the ring: flat).
    fn new(group: &ProcessGroup, ring: &'a [u32], inner_ring: u32) -> Result<Self, AttentionError> {
        let d = ring.len();
        let me = ring
            .iter()
            .position(|r| *r == group.rank())
            .ok_or(AttentionError::NotInRing {
                rank: group.rank(),
                ring: d,
            })?;
        let inner = inner_ring as usize;
        let inner = if inner >= 1 && inner < d && d.is_multiple_of(inner) {
            inner
        } else {
            d.max(1)
        };
        Ok(RingLayout {
            ranks: ring,
            outer: d / inner,
            inner,
            o: me / inner,
            i: me % inner,
        })
    }

    fn len(&self) -> usize {
        self.ranks.len()
    }

    fn me(&self) -> usize {
        self.o * self.inner + self.i
    }

    /// The position whose chunks this rank holds at step `b` of round `a`.
    fn owner(&self, a: usize, b: usize) -> usize {
        let o = (self.o + self.outer - a % self.outer) % self.outer;
        let i = (self.i + self.inner - b % self.inner) % self.inner;
        o * self.inner + i
    }

    /// The next and previous ranks of this rank's inner ring, and its parity there.
    fn inner_hop(&self) -> Hop {
        let at = |i: usize| self.ranks[self.o * self.inner + i % self.inner];
        Hop {
            next: at(self.i + 1),
            prev: at(self.i + self.inner - 1),
            position: self.i,
        }
    }

    /// The ranks at this rank's place in the next and previous inner rings.
    fn outer_hop(&self) -> Hop {
        let at = |o: usize| self.ranks[(o % self.outer) * self.inner + self.i];
        Hop {
            next: at(self.o + 1),
            prev: at(self.o + self.outer - 1),
            position: self.o,
        }
    }
}

/// Where an exchange sends, receives from, and this rank's place in that ring
/// (even places send first).
#[derive(Clone, Copy, Debug)]
struct Hop {
    next: u32,
    prev: u32,
    position: usize,
}

/// One block of work at a ring step: query chunk `q` of document `doc`
/// against the held key/value chunk `kv`, causal on the diagonal.
#[derive(Clone, Copy, Debug)]
struct Block {
    doc: usize,
    q: usize,
    kv: usize,
    causal: bool,
}

/// The blocks ring position `me` computes while it holds the key/value chunks
/// of position `owner`: a later chunk is masked out entirely, empty chunks add
/// nothing, and a chunk against itself is causal. Forward and backward use the
/// same blocks.
fn blocks(shard: &RingShard, me: usize, owner: usize, d: usize) -> Vec<Block> {
    let mut out = Vec::new();
    for (i, doc) in shard.docs.iter().enumerate() {
        let mine = chunks_of(me, doc.position, d);
        let theirs = chunks_of(owner, doc.position, d);
        for (qi, &a) in mine.iter().enumerate() {
            for (ki, &b) in theirs.iter().enumerate() {
                if b > a || doc.chunk_lengths[a] == 0 || doc.chunk_lengths[b] == 0 {
                    continue;
                }
                out.push(Block {
                    doc: i,
                    q: qi,
                    kv: ki,
                    causal: a == b,
                });
            }
        }
    }
    out
}

/// Token counts of the chunks that ring position `owner` holds of each document.
fn owner_sizes(shard: &RingShard, owner: usize, d: usize) -> Vec<[i64; 2]> {
    shard
        .docs
        .iter()
        .map(|doc| chunks_of(owner, doc.position, d).map(|c| doc.chunk_lengths[c]))
        .collect()
}

/// Keys or values `[B, H_kv, L, E]` expanded to `heads` query heads
/// (grouped-query attention: each key/value head serves `heads / H_kv` query
/// heads). The ring moves them unexpanded.
fn expand_heads(kv: &Tensor, heads: i64) -> Result<Tensor, tch::TchError> {
    let kv_heads = kv.size().get(1).copied().unwrap_or(heads);
    if kv_heads == heads {
        Ok(kv.shallow_clone())
    } else {
        kv.f_repeat_interleave_self_int(heads / kv_heads, 1, None)
    }
}

/// Key/value heads the kernel takes at a time: all of them without GQA;
/// with it, one, its queries' heads with it, so the keys and values
/// expanded to the queries' heads (and their gradients) exist for one group
/// of heads at a time, not for every head at once.
fn kv_heads_per_call(heads: i64, kv_heads: i64) -> i64 {
    if kv_heads == heads { kv_heads } else { 1 }
}

/// Attention of `q` to `k`/`v` ([`Partial::compute`]), key/value heads a
/// few at a time (see [`kv_heads_per_call`]); `k`, `v` may have fewer heads.
fn grouped_partial(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
) -> Result<Partial, AttentionError> {
    let (heads, kv_heads) = (q.size()[1], k.size()[1]);
    let per_call = kv_heads_per_call(heads, kv_heads);
    if per_call == kv_heads {
        return Partial::compute(
            q,
            &expand_heads(k, heads)?,
            &expand_heads(v, heads)?,
            causal,
        );
    }
    let group = heads / kv_heads;
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for j in (0..kv_heads).step_by(per_call as usize) {
        let q_heads = per_call * group;
        let p = Partial::compute(
            &q.f_narrow(1, j * group, q_heads)?,
            &expand_heads(&k.f_narrow(1, j, per_call)?, q_heads)?,
            &expand_heads(&v.f_narrow(1, j, per_call)?, q_heads)?,
            causal,
        )?;
        outs.push(p.out);
        lses.push(p.lse);
    }
    Ok(Partial {
        out: Tensor::f_cat(&outs, 1)?,
        lse: Tensor::f_cat(&lses, 1)?,
    })
}

/// The backward of one block of attention, added into the fp32 gradients
/// `dq` (of `q`'s heads) and `dk`, `dv` (of `k`'s), in place, key/value
/// heads a few at a time (see [`kv_heads_per_call`]).
#[allow(clippy::too_many_arguments)]
fn grouped_backward_into(
    kernel: Kernel,
    grad: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    causal: bool,
    [dq, dk, dv]: [&Tensor; 3],
) -> Result<(), AttentionError> {
    let (heads, kv_heads) = (q.size()[1], k.size()[1]);
    let per_call = kv_heads_per_call(heads, kv_heads);
    let group = heads / kv_heads;
    let q_heads = per_call * group;
    for j in (0..kv_heads).step_by(per_call as usize) {
        let of_q = |t: &Tensor| t.f_narrow(1, j * group, q_heads);
        let (g_q, g_k, g_v) = kernel.backward(
            &of_q(grad)?,
            &of_q(q)?,
            &expand_heads(&k.f_narrow(1, j, per_call)?, q_heads)?,
            &expand_heads(&v.f_narrow(1, j, per_call)?, q_heads)?,
            &of_q(out)?,
            &of_q(lse)?,
            causal,
        )?;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            let reduce = |g: &Tensor| reduce_heads(g, per_call)?.f_to_kind(Kind::Float);
            let _ = of_q(dq)?.f_add_(&g_q.f_to_kind(Kind::Float)?)?;
            let _ = dk.f_narrow(1, j, per_call)?.f_add_(&reduce(&g_k)?)?;
            let _ = dv.f_narrow(1, j, per_call)?.f_add_(&reduce(&g_v)?)?;
            Ok(())
        })?;
    }
    Ok(())
}

/// The gradient of expanded keys or values summed back to `kv_heads` heads.
fn reduce_heads(grad: &Tensor, kv_heads: i64) -> Result<Tensor, tch::TchError> {
    let size = grad.size();
    let heads = size.get(1).copied().unwrap_or(kv_heads);
    if heads == kv_heads {
        return Ok(grad.shallow_clone());
    }
    let grouped = [size[0], kv_heads, heads / kv_heads, size[2], size[3]];
    grad.f_reshape(grouped)?
        .f_sum_dim_intlist(Some(&[2i64][..]), false, None)
}

/// Checks that every chunk has the length the split says.
fn validate(shard: &RingShard, me: usize, d: usize) -> Result<(), AttentionError> {
    for (i, doc) in shard.docs.iter().enumerate() {
        if doc.chunk_lengths.len() != 2 * d {
            return Err(AttentionError::Shape { chunk: 2 * i });
        }
        // Grouped-query attention: key/value heads divide the query heads.
        let heads = doc.q[0].size().get(1).copied().unwrap_or(0);
        let kv_heads = doc.k[0].size().get(1).copied().unwrap_or(0);
        if kv_heads == 0 || heads % kv_heads != 0 || doc.k[0].size() != doc.v[0].size() {
            return Err(AttentionError::Shape { chunk: 2 * i });
        }
        let mine = chunks_of(me, doc.position, d);
        for (c, chunk) in mine.iter().enumerate() {
            let want = Some(doc.chunk_lengths[*chunk]);
            for t in [&doc.q[c], &doc.k[c], &doc.v[c]] {
                if t.size().get(2).copied() != want {
                    return Err(AttentionError::Shape { chunk: 2 * i + c });
                }
            }
        }
    }
    Ok(())
}

/// Ring attention forward for the documents of one ring group over the ranks
/// `ring` (in ring order; hierarchical with inner rings of `inner_ring` ranks,
/// 0 for flat), where this rank holds `shard`. Returns, per document, the
/// outputs of this rank's two chunks and their log-sum-exps.
pub fn ring_attention_forward(
    group: &mut ProcessGroup,
    ring: &[u32],
    inner_ring: u32,
    shard: &RingShard,
) -> Result<Vec<RingOutput>, AttentionError> {
    let layout = RingLayout::new(group, ring, inner_ring)?;
    let (d, me) = (layout.len(), layout.me());
    validate(shard, me, d)?;
    let own = |t: &[Tensor; 2]| -> Result<[Tensor; 2], tch::TchError> {
        Ok([t[0].f_contiguous()?, t[1].f_contiguous()?])
    };
    let mut held_k = shard
        .docs
        .iter()
        .map(|doc| own(&doc.k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut held_v = shard
        .docs
        .iter()
        .map(|doc| own(&doc.v))
        .collect::<Result<Vec<_>, _>>()?;
    let mut partial: Vec<[Option<Partial>; 2]> = shard.docs.iter().map(|_| [None, None]).collect();
    let mut tags = 0..;
    let mut tag = || 2 * tags.next().unwrap_or(0);
    for a in 0..layout.outer {
        // What this rank passes to the next inner ring at the end of the round.
        let round_start = (shallow(&held_k), shallow(&held_v));
        for b in 0..layout.inner {
            for block in blocks(shard, me, layout.owner(a, b), d) {
                let doc = &shard.docs[block.doc];
                let p = grouped_partial(
                    &doc.q[block.q],
                    &held_k[block.doc][block.kv],
                    &held_v[block.doc][block.kv],
                    block.causal,
                )?;
                partial[block.doc][block.q] = Some(match partial[block.doc][block.q].take() {
                    None => p,
                    Some(acc) => acc.merge(p)?,
                });
            }
            if b + 1 < layout.inner {
                // Next step this rank holds the chunks of the place one further back.
                let sizes = owner_sizes(shard, layout.owner(a, b + 1), d);
                let (hop, t) = (layout.inner_hop(), tag());
                held_k = exchange(group, &held_k, &sizes, hop, t)?;
                held_v = exchange(group, &held_v, &sizes, hop, t + 1)?;
            }
        }
        if a + 1 < layout.outer {
            let sizes = owner_sizes(shard, layout.owner(a + 1, 0), d);
            let (hop, t) = (layout.outer_hop(), tag());
            held_k = exchange(group, &round_start.0, &sizes, hop, t)?;
            held_v = exchange(group, &round_start.1, &sizes, hop, t + 1)?;
        }
    }
    let mut outputs = Vec::with_capacity(shard.docs.len());
    for (doc, parts) in shard.docs.iter().zip(partial) {
        let [a, b] = parts;
        let finish = |p: Option<Partial>, q: &Tensor| -> Result<(Tensor, Tensor), AttentionError> {
            match p {
                // Merged in fp32; the output goes on in the queries' kind
                // (what the backward's kernel expects beside them).
                Some(p) => Ok((p.out.f_to_kind(q.kind())?, p.lse)),
                // An empty chunk: empty output. Every non-empty chunk attends at
                // least to itself, so it always has a partial result.
                None => {
                    let size = q.size();
                    let device = q.device();
                    Ok((
                        Tensor::f_zeros(size.as_slice(), (q.kind(), device))?,
                        Tensor::f_zeros(
                            &size[..size.len().saturating_sub(1)],
                            (Kind::Float, device),
                        )?,
                    ))
                }
            }
        };
        let (out0, lse0) = finish(a, &doc.q[0])?;
        let (out1, lse1) = finish(b, &doc.q[1])?;
        outputs.push(RingOutput {
            out: [out0, out1],
            lse: [lse0, lse1],
        });
    }
    Ok(outputs)
}

/// Ring attention backward: given the forward's merged outputs and
/// log-sum-exps and the gradients of this rank's outputs, the gradients of its
/// queries, keys and values, per document. Every block is recomputed from the
/// merged log-sum-exp (so it is exact); dQ accumulates here, and dK/dV (fp32)
/// travel with their keys and values (see the module documentation), arriving
/// back at their owner at the end.
pub fn ring_attention_backward(
    group: &mut ProcessGroup,
    ring: &[u32],
    inner_ring: u32,
    shard: &RingShard,
    forward: &[RingOutput],
    grad_out: &[[Tensor; 2]],
) -> Result<Vec<RingGrads>, AttentionError> {
    let layout = RingLayout::new(group, ring, inner_ring)?;
    let (d, me) = (layout.len(), layout.me());
    validate(shard, me, d)?;
    if forward.len() != shard.docs.len() || grad_out.len() != shard.docs.len() {
        return Err(AttentionError::Shape { chunk: 0 });
    }
    // Fresh fp32 accumulators (to_kind of an fp32 tensor would alias it).
    let zeros = |t: &Tensor| Tensor::f_zeros(t.size().as_slice(), (Kind::Float, t.device()));
    let pair = |t: &[Tensor; 2], f: &dyn Fn(&Tensor) -> Result<Tensor, tch::TchError>| {
        Ok::<_, tch::TchError>([f(&t[0])?, f(&t[1])?])
    };
    let mut dq = Vec::new();
    let mut held_k = Vec::new();
    let mut held_v = Vec::new();
    let mut held_dk = Vec::new();
    let mut held_dv = Vec::new();
    for doc in &shard.docs {
        dq.push(pair(&doc.q, &zeros)?);
        held_k.push(pair(&doc.k, &|t| t.f_contiguous())?);
        held_v.push(pair(&doc.v, &|t| t.f_contiguous())?);
        held_dk.push(pair(&doc.k, &zeros)?);
        held_dv.push(pair(&doc.v, &zeros)?);
    }
    // Tags apart from the forward's.
    let mut tags = 0..;
    let mut tag = || (1 << 20) + 4 * tags.next().unwrap_or(0);
    for a in 0..layout.outer {
        let round_start = (shallow(&held_k), shallow(&held_v));
        for b in 0..layout.inner {
            for block in blocks(shard, me, layout.owner(a, b), d) {
                let (i, qi, ki) = (block.doc, block.q, block.kv);
                let kernel = Kernel::for_query(&shard.docs[i].q[qi]);
                grouped_backward_into(
                    kernel,
                    &grad_out[i][qi],
                    &shard.docs[i].q[qi],
                    &held_k[i][ki],
                    &held_v[i][ki],
                    &forward[i].out[qi],
                    &forward[i].lse[qi],
                    block.causal,
                    [&dq[i][qi], &held_dk[i][ki], &held_dv[i][ki]],
                )?;
            }
            let (hop, t) = (layout.inner_hop(), tag());
            if b + 1 < layout.inner {
                let sizes = owner_sizes(shard, layout.owner(a, b + 1), d);
                held_k = exchange(group, &held_k, &sizes, hop, t)?;
                held_v = exchange(group, &held_v, &sizes, hop, t + 1)?;
            }
            // The gradients move on every step, the last one bringing them
            // back to where the round started.
            if layout.inner > 1 {
                let sizes = owner_sizes(shard, layout.owner(a, b + 1), d);
                held_dk = exchange(group, &held_dk, &sizes, hop, t + 2)?;
                held_dv = exchange(group, &held_dv, &sizes, hop, t + 3)?;
            }
        }
        if layout.outer > 1 {
            // The round's gradients and (but after the last round) its chunks
            // move on to the next inner ring; after the last round the
            // gradients reach their owner.
            let sizes = owner_sizes(shard, layout.owner(a + 1, 0), d);
            let (hop, t) = (layout.outer_hop(), tag());
            held_dk = exchange(group, &held_dk, &sizes, hop, t)?;
            held_dv = exchange(group, &held_dv, &sizes, hop, t + 1)?;
            if a + 1 < layout.outer {
                held_k = exchange(group, &round_start.0, &sizes, hop, t + 2)?;
                held_v = exchange(group, &round_start.1, &sizes, hop, t + 3)?;
            }
        }
    }
    Ok(dq
        .into_iter()
        .zip(held_dk)
        .zip(held_dv)
        .map(|((dq, dk), dv)| RingGrads { dq, dk, dv })
        .collect())
}

/// Shallow copies of held chunks (the tensors are replaced, never written).
fn shallow(chunks: &[[Tensor; 2]]) -> Vec<[Tensor; 2]> {
    chunks
        .iter()
        .map(|[a, b]| [a.shallow_clone(), b.shallow_clone()])
        .collect()
}

/// Sends every document's two chunks to `hop.next` as one tensor
/// (concatenated along the sequence) and receives the chunks of `sizes` tokens
/// from `hop.prev`. Even ring positions send first and odd ones receive first,
/// so blocking sends never wait on each other all around the ring. Nothing
/// moves when both sides hold no tokens (both know it from the split).
fn exchange(
    group: &mut ProcessGroup,
    chunks: &[[Tensor; 2]],
    sizes: &[[i64; 2]],
    hop: Hop,
    tag: i32,
) -> Result<Vec<[Tensor; 2]>, AttentionError> {
    let Hop {
        next,
        prev,
        position,
    } = hop;
    let Some(first) = chunks.first() else {
        return Ok(Vec::new());
    };
    let flat: Vec<&Tensor> = chunks.iter().flat_map(|c| c.iter()).collect();
    let outgoing = Tensor::f_cat(&flat, 2)?.f_contiguous()?;
    let incoming: i64 = sizes.iter().flatten().sum();
    let mut shape = first[0].size();
    shape[2] = incoming;
    let mut received = Tensor::f_empty(shape.as_slice(), (first[0].kind(), first[0].device()))?;
    let sending = outgoing.size().get(2).copied().unwrap_or(0) > 0;
    if sending || incoming > 0 {
        if position.is_multiple_of(2) {
            group.send(&outgoing, next, tag)?;
            group.recv(&mut received, prev, tag)?;
        } else {
            group.recv(&mut received, prev, tag)?;
            group.send(&outgoing, next, tag)?;
        }
    }
    let flat_sizes: Vec<i64> = sizes.iter().flatten().copied().collect();
    let mut pieces = received.f_split_with_sizes(&flat_sizes, 2)?.into_iter();
    let mut out = Vec::with_capacity(sizes.len());
    for _ in sizes {
        match (pieces.next(), pieces.next()) {
            (Some(a), Some(b)) => out.push([a.f_contiguous()?, b.f_contiguous()?]),
            _ => {
                return Err(AttentionError::Shape {
                    chunk: out.len() * 2,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[i64], seed: i64) -> Tensor {
        crate::seeded(seed, || {
            Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
        })
    }

    #[test]
    fn split_holds_exactly_the_plans_ranges() {
        for length in [1i64, 7, 40, 61, 100] {
            let t =
                Tensor::arange(length, (Kind::Float, tch::Device::Cpu)).reshape([1, 1, length, 1]);
            for d in 2..=5u32 {
                for position in 0..3 {
                    let plan = weft_planner::plan::group_zigzag(length as u64, d, position);
                    for (i, ranges) in plan.iter().enumerate() {
                        let shard = DocShard::split(&t, &t, &t, position, d, i).unwrap();
                        for (chunk, range) in shard.q.iter().zip(ranges) {
                            let got = Vec::<f32>::try_from(chunk.flatten(0, -1)).unwrap();
                            let want: Vec<f32> = (range[0]..range[1]).map(|x| x as f32).collect();
                            assert_eq!(
                                got, want,
                                "length {length}, d {d}, position {position}, rank {i}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn merging_two_halves_of_the_keys_equals_attention_over_all_of_them() {
        let q = random(&[1, 3, 16, 8], 1);
        let k = random(&[1, 3, 32, 8], 2);
        let v = random(&[1, 3, 32, 8], 3);
        let full = Partial::compute(&q, &k, &v, false).unwrap();
        let a = Partial::compute(&q, &k.narrow(2, 0, 12), &v.narrow(2, 0, 12), false).unwrap();
        let b = Partial::compute(&q, &k.narrow(2, 12, 20), &v.narrow(2, 12, 20), false).unwrap();
        let merged = a.merge(b).unwrap();
        let err = (&merged.out - &full.out).abs().max().double_value(&[]);
        let lse_err = (&merged.lse - &full.lse).abs().max().double_value(&[]);
        assert!(err < 1e-5, "output error {err}");
        assert!(lse_err < 1e-5, "log-sum-exp error {lse_err}");
    }
}
