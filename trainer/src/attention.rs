//! Distributed causal attention: ring attention over the ranks that share a
//! sequence, with zigzag (head-tail) load balance and the log-sum-exp merge of
//! partial results in fp32 (`shared/references/systems.md` §3).
//!
//! A sequence split over a ring of d ranks is cut into 2d chunks; rank i of the
//! ring holds chunks i and 2d−1−i ([`weft_planner::plan::zigzag_ranges`]). Each
//! of the d ring steps, a rank attends its query chunks to the key/value chunks
//! it holds (a chunk before its own in full, its own causally, a later one not
//! at all), merges the partial outputs by their log-sum-exp, and passes the
//! key/value chunks to the next rank. The result equals plain causal attention
//! over the whole sequence, to floating-point rounding.
//!
//! This is the forward pass of one document per ring; packed documents,
//! hierarchical rings and the backward pass follow.

use tch::{Kind, Tensor};

use crate::comm::{CommError, ProcessGroup};

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
        let (out, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
            q,
            k,
            v,
            0.0,
            causal,
            None::<Tensor>,
            None,
        )?;
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

/// This rank's part of one sequence in a ring: its two zigzag chunks of
/// queries, keys and values, each `[B, H, L_c, E]`.
#[derive(Debug)]
pub struct ZigzagShard {
    /// Chunk indices (of the sequence's 2d chunks) this rank holds: i and 2d−1−i.
    pub chunks: [usize; 2],
    /// Tokens in each of the sequence's 2d chunks: a rank receiving another
    /// rank's keys and values must know their sizes (chunks differ by a token
    /// when the length does not divide; gloo aborts the process on a size
    /// mismatch rather than returning an error).
    pub chunk_lengths: Vec<i64>,
    pub q: [Tensor; 2],
    pub k: [Tensor; 2],
    pub v: [Tensor; 2],
}

/// What the forward keeps for the backward: per query chunk, the merged output
/// `[B, H, L_c, E]` and log-sum-exp `[B, H, L_c]`, fp32.
#[derive(Debug)]
pub struct RingOutput {
    pub out: [Tensor; 2],
    pub lse: [Tensor; 2],
}

/// Gradients of one rank's chunks, fp32.
#[derive(Debug)]
pub struct RingGrads {
    pub dq: [Tensor; 2],
    pub dk: [Tensor; 2],
    pub dv: [Tensor; 2],
}

/// This rank's position in `ring`, and the ranks before and after it.
fn ring_position(group: &ProcessGroup, ring: &[u32]) -> Result<(usize, u32, u32), AttentionError> {
    let d = ring.len();
    let me = ring
        .iter()
        .position(|r| *r == group.rank())
        .ok_or(AttentionError::NotInRing {
            rank: group.rank(),
            ring: d,
        })?;
    Ok((me, ring[(me + 1) % d], ring[(me + d - 1) % d]))
}

/// Token counts of the two chunks that ring position `owner` holds.
fn owner_sizes(shard: &ZigzagShard, owner: usize, d: usize) -> [i64; 2] {
    [
        shard.chunk_lengths[owner],
        shard.chunk_lengths[2 * d - 1 - owner],
    ]
}

/// Ring attention forward for one causal sequence over the ranks `ring` (in
/// ring order), where this rank holds `shard`.
pub fn ring_attention_forward(
    group: &mut ProcessGroup,
    ring: &[u32],
    shard: &ZigzagShard,
) -> Result<RingOutput, AttentionError> {
    let d = ring.len();
    let (me, next, prev) = ring_position(group, ring)?;
    for c in 0..2 {
        let expected = shard.chunk_lengths.get(shard.chunks[c]).copied();
        let size = shard.k[c].size();
        if shard.q[c].size() != size
            || size.get(2).copied() != expected
            || shard.chunk_lengths.len() != 2 * d
        {
            return Err(AttentionError::Shape { chunk: c });
        }
    }
    // The key/value chunks this rank currently holds, and whose they were.
    let mut held_k = [shard.k[0].f_contiguous()?, shard.k[1].f_contiguous()?];
    let mut held_v = [shard.v[0].f_contiguous()?, shard.v[1].f_contiguous()?];
    let mut partial: [Option<Partial>; 2] = [None, None];
    for step in 0..d {
        let owner = (me + d - step) % d;
        let kv_chunks = [owner, 2 * d - 1 - owner];
        for (qi, &a) in shard.chunks.iter().enumerate() {
            for (ki, &b) in kv_chunks.iter().enumerate() {
                if b > a {
                    continue; // a later chunk: masked out entirely
                }
                let p = Partial::compute(&shard.q[qi], &held_k[ki], &held_v[ki], a == b)?;
                partial[qi] = Some(match partial[qi].take() {
                    None => p,
                    Some(acc) => acc.merge(p)?,
                });
            }
        }
        if step + 1 < d {
            // Next step this rank holds the chunks of the rank one further back.
            let sizes = owner_sizes(shard, (me + d - step - 1) % d, d);
            held_k = pass_along(group, &held_k, sizes, next, prev, me, 2 * step as i32)?;
            held_v = pass_along(group, &held_v, sizes, next, prev, me, 2 * step as i32 + 1)?;
        }
    }
    let [a, b] = partial;
    // Every query chunk attends at least to itself (the causal diagonal).
    match (a, b) {
        (Some(a), Some(b)) => Ok(RingOutput {
            out: [a.out, b.out],
            lse: [a.lse, b.lse],
        }),
        _ => Err(AttentionError::Shape { chunk: 0 }),
    }
}

/// Ring attention backward: given the forward's merged outputs and
/// log-sum-exps and the gradient of this rank's outputs, the gradients of its
/// queries, keys and values. Every block's contribution is recomputed from the
/// merged log-sum-exp (so it is exact), dQ accumulates here, and dK/dV (fp32)
/// travel around the ring with their keys and values, arriving back at their
/// owner after d passes.
pub fn ring_attention_backward(
    group: &mut ProcessGroup,
    ring: &[u32],
    shard: &ZigzagShard,
    forward: &RingOutput,
    grad_out: &[Tensor; 2],
) -> Result<RingGrads, AttentionError> {
    let d = ring.len();
    let (me, next, prev) = ring_position(group, ring)?;
    let float = |t: &Tensor| t.f_to_kind(Kind::Float);
    // Fresh fp32 accumulators (to_kind of an fp32 tensor would alias it).
    let zeros = |t: &Tensor| Tensor::f_zeros(t.size().as_slice(), (Kind::Float, t.device()));
    let mut dq = [zeros(&shard.q[0])?, zeros(&shard.q[1])?];
    let mut held_k = [shard.k[0].f_contiguous()?, shard.k[1].f_contiguous()?];
    let mut held_v = [shard.v[0].f_contiguous()?, shard.v[1].f_contiguous()?];
    let mut held_dk = [zeros(&held_k[0])?, zeros(&held_k[1])?];
    let mut held_dv = [zeros(&held_v[0])?, zeros(&held_v[1])?];
    // Tags apart from the forward's.
    let base = 1 << 20;
    for step in 0..d {
        let owner = (me + d - step) % d;
        let kv_chunks = [owner, 2 * d - 1 - owner];
        for (qi, &a) in shard.chunks.iter().enumerate() {
            for (ki, &b) in kv_chunks.iter().enumerate() {
                if b > a {
                    continue;
                }
                let (g_q, g_k, g_v) =
                    Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu_backward(
                        &grad_out[qi],
                        &shard.q[qi],
                        &held_k[ki],
                        &held_v[ki],
                        &forward.out[qi],
                        &forward.lse[qi],
                        0.0,
                        a == b,
                        None::<Tensor>,
                        None,
                    )?;
                dq[qi] = dq[qi].f_add(&float(&g_q)?)?;
                held_dk[ki] = held_dk[ki].f_add(&float(&g_k)?)?;
                held_dv[ki] = held_dv[ki].f_add(&float(&g_v)?)?;
            }
        }
        let sizes = owner_sizes(shard, (me + d - step - 1) % d, d);
        let tag = base + 4 * step as i32;
        if step + 1 < d {
            held_k = pass_along(group, &held_k, sizes, next, prev, me, tag)?;
            held_v = pass_along(group, &held_v, sizes, next, prev, me, tag + 1)?;
        }
        // The gradients move on every step, the last one bringing them home.
        if d > 1 {
            held_dk = pass_along(group, &held_dk, sizes, next, prev, me, tag + 2)?;
            held_dv = pass_along(group, &held_dv, sizes, next, prev, me, tag + 3)?;
        }
    }
    Ok(RingGrads {
        dq,
        dk: held_dk,
        dv: held_dv,
    })
}

/// Sends `chunks` to `next` and receives two chunks of `sizes` tokens (other
/// dimensions as `chunks`) from `prev`. Even ring positions send first and odd
/// ones receive first, so blocking sends never wait on each other all around
/// the ring.
fn pass_along(
    group: &mut ProcessGroup,
    chunks: &[Tensor; 2],
    sizes: [i64; 2],
    next: u32,
    prev: u32,
    position: usize,
    tag: i32,
) -> Result<[Tensor; 2], AttentionError> {
    let shaped = |c: usize| {
        let mut shape = chunks[c].size();
        shape[2] = sizes[c];
        Tensor::f_empty(shape.as_slice(), (chunks[c].kind(), chunks[c].device()))
    };
    let mut received = [shaped(0)?, shaped(1)?];
    let send = |group: &mut ProcessGroup| -> Result<(), CommError> {
        group.send(&chunks[0], next, 2 * tag)?;
        group.send(&chunks[1], next, 2 * tag + 1)
    };
    if position.is_multiple_of(2) {
        send(group)?;
        let [r0, r1] = &mut received;
        group.recv(r0, prev, 2 * tag)?;
        group.recv(r1, prev, 2 * tag + 1)?;
    } else {
        let [r0, r1] = &mut received;
        group.recv(r0, prev, 2 * tag)?;
        group.recv(r1, prev, 2 * tag + 1)?;
        send(group)?;
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, tch::Device::Cpu))
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
