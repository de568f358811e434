//! Ring attention over real Gloo collectives equals plain causal attention per
//! document, in its output and in all its gradients: flat and hierarchical
//! rings, one document per ring, and
//! several packed documents sharing a ring (some shorter than the ring's
//! chunk count, so some chunks are empty), with as many key/value heads as
//! query heads or fewer (grouped-query attention).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use tch::{Kind, Tensor};
use weft_planner::plan::group_zigzag;
use weft_trainer::attention::{
    DocShard, Partial, RingShard, ring_attention_backward, ring_attention_forward,
};

const HEAD_DIM: i64 = 8;

fn random(heads: i64, length: i64) -> Tensor {
    Tensor::randn(
        [1, heads, length, HEAD_DIM],
        (Kind::Float, tch::Device::Cpu),
    )
}

/// Keys or values expanded to `heads` query heads, as grouped-query attention reads them.
fn expand(kv: &Tensor, heads: i64) -> Tensor {
    kv.repeat_interleave_self_int(heads / kv.size()[1], 1, None)
}

/// The gradient of expanded keys or values summed back to `kv_heads` heads.
fn reduce(grad: &Tensor, kv_heads: i64) -> Tensor {
    let s = grad.size();
    grad.reshape([s[0], kv_heads, s[1] / kv_heads, s[2], s[3]])
        .sum_dim_intlist(Some(&[2i64][..]), false, None)
}

fn slice(t: &Tensor, range: [u64; 2]) -> Tensor {
    t.narrow(2, range[0] as i64, (range[1] - range[0]) as i64)
        .contiguous()
}

/// One document's data: queries, keys, values and the gradient of the output.
struct Doc {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
}

impl Doc {
    fn copy(&self) -> Doc {
        Doc {
            q: self.q.copy(),
            k: self.k.copy(),
            v: self.v.copy(),
            g: self.g.copy(),
        }
    }
}

/// Largest error of the ring against plain per-document attention:
/// [output, dQ, dK, dV].
fn max_error_over_a_ring(
    world: u32,
    inner_ring: u32,
    lengths: &[i64],
    heads: i64,
    kv_heads: i64,
) -> [f64; 4] {
    let port = common::free_port();
    // libtorch's generator is global: draw the data once, before the rank threads.
    tch::manual_seed(7);
    let docs: Vec<Doc> = lengths
        .iter()
        .map(|l| Doc {
            q: random(heads, *l),
            k: random(kv_heads, *l),
            v: random(kv_heads, *l),
            g: random(heads, *l),
        })
        .collect();
    let lengths = lengths.to_vec();
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let docs: Vec<Doc> = docs.iter().map(Doc::copy).collect();
            let lengths = lengths.clone();
            std::thread::spawn(move || {
                let (_store, mut group) = common::join(rank, world, port, Duration::from_secs(20));
                let d = world as usize;
                // Each document's split, as the plan gives it (rotated by position).
                let splits: Vec<Vec<Vec<[u64; 2]>>> = lengths
                    .iter()
                    .enumerate()
                    .map(|(p, l)| group_zigzag(*l as u64, world, p))
                    .collect();
                let shard = RingShard {
                    docs: docs
                        .iter()
                        .enumerate()
                        .map(|(p, doc)| {
                            // Chunk lengths by chunk index: position i of the
                            // rotated split holds chunks j and 2d−1−j, j = (i+p) mod d.
                            let mut chunk_lengths = vec![0i64; 2 * d];
                            for (i, r) in splits[p].iter().enumerate() {
                                let j = (i + p) % d;
                                chunk_lengths[j] = (r[0][1] - r[0][0]) as i64;
                                chunk_lengths[2 * d - 1 - j] = (r[1][1] - r[1][0]) as i64;
                            }
                            let mine = &splits[p][rank as usize];
                            let two = |t: &Tensor| [slice(t, mine[0]), slice(t, mine[1])];
                            DocShard {
                                position: p,
                                chunk_lengths,
                                q: two(&doc.q),
                                k: two(&doc.k),
                                v: two(&doc.v),
                            }
                        })
                        .collect(),
                };
                let ring: Vec<u32> = (0..world).collect();
                let forward =
                    ring_attention_forward(&mut group, &ring, inner_ring, &shard).unwrap();
                let grad_out: Vec<[Tensor; 2]> = docs
                    .iter()
                    .enumerate()
                    .map(|(p, doc)| {
                        let mine = &splits[p][rank as usize];
                        [slice(&doc.g, mine[0]), slice(&doc.g, mine[1])]
                    })
                    .collect();
                let grads = ring_attention_backward(
                    &mut group, &ring, inner_ring, &shard, &forward, &grad_out,
                )
                .unwrap();
                let mut worst = [0.0f64; 4];
                for (p, doc) in docs.iter().enumerate() {
                    // Plain causal attention over this document alone, and its gradients.
                    let (k, v) = (expand(&doc.k, heads), expand(&doc.v, heads));
                    let reference = Partial::compute(&doc.q, &k, &v, true).unwrap();
                    let (dq, dk, dv) =
                        Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                            &doc.g,
                            &doc.q,
                            &k,
                            &v,
                            &reference.out,
                            &reference.lse,
                            0.0,
                            true,
                            None::<Tensor>,
                            None,
                        );
                    let (dk, dv) = (reduce(&dk, kv_heads), reduce(&dv, kv_heads));
                    let mine = &splits[p][rank as usize];
                    let err = |got: &[Tensor; 2], full: &Tensor| {
                        (0..2)
                            .filter(|c| mine[*c][1] > mine[*c][0])
                            .map(|c| {
                                (&got[c] - slice(full, mine[c]))
                                    .abs()
                                    .max()
                                    .double_value(&[])
                            })
                            .fold(0.0, f64::max)
                    };
                    let errors = [
                        err(&forward[p].out, &reference.out),
                        err(&grads[p].dq, &dq),
                        err(&grads[p].dk, &dk),
                        err(&grads[p].dv, &dv),
                    ];
                    for i in 0..4 {
                        worst[i] = worst[i].max(errors[i]);
                    }
                }
                worst
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold([0.0; 4], |acc, e| std::array::from_fn(|i| acc[i].max(e[i])))
}

fn check(world: u32, lengths: &[i64]) {
    check_heads(world, lengths, 2, 2);
}

fn check_heads(world: u32, lengths: &[i64], heads: i64, kv_heads: i64) {
    check_ring(world, 0, lengths, heads, kv_heads);
}

fn check_ring(world: u32, inner_ring: u32, lengths: &[i64], heads: i64, kv_heads: i64) {
    let [out, dq, dk, dv] = max_error_over_a_ring(world, inner_ring, lengths, heads, kv_heads);
    eprintln!(
        "{world} ranks (inner rings of {inner_ring}), {heads} heads / {kv_heads} kv heads, documents {lengths:?}: max |ring - plain| output {out:.1e}, dQ {dq:.1e}, dK {dk:.1e}, dV {dv:.1e}"
    );
    for (what, err) in [("output", out), ("dQ", dq), ("dK", dk), ("dV", dv)] {
        assert!(
            err < 1e-5,
            "{world} ranks, inner rings of {inner_ring}, {lengths:?}: {what} error {err}"
        );
    }
}

#[test]
fn one_document_per_ring_matches_plain_causal_attention() {
    // Degree 1 is plain attention (one range, no ring); rings start at 2.
    for (world, length) in [(2, 40), (2, 7), (3, 61), (4, 64), (4, 37)] {
        check(world, &[length]);
    }
}

#[test]
fn packed_documents_match_attention_within_each_document() {
    for world in [2, 3, 4] {
        check(world, &[40, 7, 3, 61, 1]);
    }
}

#[test]
fn grouped_query_attention_moves_fewer_heads_and_stays_exact() {
    for world in [2, 4] {
        check_heads(world, &[40, 7, 61], 4, 2);
        check_heads(world, &[33], 6, 1);
    }
}

#[test]
fn hierarchical_rings_match_plain_causal_attention() {
    // Inner rings of 2 over 2 and 3 "nodes", of 3 over 2, of 1 (every hop
    // between inner rings); one document, packed ones with empty chunks, GQA.
    for (world, inner) in [(4, 2), (6, 2), (6, 3), (3, 1)] {
        check_ring(world, inner, &[61], 2, 2);
        check_ring(world, inner, &[40, 7, 3, 61, 1], 4, 2);
    }
}
