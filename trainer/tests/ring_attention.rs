//! Ring attention over real Gloo collectives equals plain causal attention, in
//! its output and in all its gradients.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tch::{Kind, Tensor};
use weft_planner::plan::zigzag_ranges;
use weft_trainer::attention::{
    Partial, ZigzagShard, ring_attention_backward, ring_attention_forward,
};
use weft_trainer::comm::{ProcessGroup, Store};

const HEADS: i64 = 2;
const HEAD_DIM: i64 = 8;

fn random(length: i64) -> Tensor {
    Tensor::randn(
        [1, HEADS, length, HEAD_DIM],
        (Kind::Float, tch::Device::Cpu),
    )
}

fn slice(t: &Tensor, range: [u64; 2]) -> Tensor {
    t.narrow(2, range[0] as i64, (range[1] - range[0]) as i64)
        .contiguous()
}

/// Largest error of the ring against plain attention: [output, dQ, dK, dV].
fn max_error_over_a_ring(world: u32, length: i64) -> [f64; 4] {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // libtorch's generator is global: draw the data once, before the rank threads.
    tch::manual_seed(7);
    let (q, k, v, g) = (
        random(length),
        random(length),
        random(length),
        random(length),
    );
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (q, k, v, g) = (q.copy(), k.copy(), v.copy(), g.copy());
            std::thread::spawn(move || {
                let store =
                    Store::open("127.0.0.1", port, world, rank == 0, Duration::from_secs(20))
                        .unwrap();
                let mut group =
                    ProcessGroup::gloo(&store, rank, world, "127.0.0.1", Duration::from_secs(20))
                        .unwrap();
                let d = world as usize;
                // This rank's chunks and every chunk's length, from the plan's split.
                let all = zigzag_ranges(length as u64, world);
                let mut chunk_lengths = vec![0i64; 2 * d];
                for (i, r) in all.iter().enumerate() {
                    chunk_lengths[i] = (r[0][1] - r[0][0]) as i64;
                    chunk_lengths[2 * d - 1 - i] = (r[1][1] - r[1][0]) as i64;
                }
                let ranges = &all[rank as usize];
                let two = |t: &Tensor| [slice(t, ranges[0]), slice(t, ranges[1])];
                let shard = ZigzagShard {
                    chunks: [rank as usize, 2 * d - 1 - rank as usize],
                    chunk_lengths,
                    q: two(&q),
                    k: two(&k),
                    v: two(&v),
                };
                let ring: Vec<u32> = (0..world).collect();
                let forward = ring_attention_forward(&mut group, &ring, &shard).unwrap();
                let grads =
                    ring_attention_backward(&mut group, &ring, &shard, &forward, &two(&g)).unwrap();
                // Plain causal attention over the whole sequence in one process,
                // and its gradients.
                let reference = Partial::compute(&q, &k, &v, true).unwrap();
                let (dq, dk, dv) =
                    Tensor::internal_scaled_dot_product_flash_attention_for_cpu_backward(
                        &g,
                        &q,
                        &k,
                        &v,
                        &reference.out,
                        &reference.lse,
                        0.0,
                        true,
                        None::<Tensor>,
                        None,
                    );
                let err = |mine: &[Tensor; 2], full: &Tensor| {
                    (0..2)
                        .map(|c| {
                            (&mine[c] - slice(full, ranges[c]))
                                .abs()
                                .max()
                                .double_value(&[])
                        })
                        .fold(0.0, f64::max)
                };
                [
                    err(&forward.out, &reference.out),
                    err(&grads.dq, &dq),
                    err(&grads.dk, &dk),
                    err(&grads.dv, &dv),
                ]
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold([0.0; 4], |acc, e| std::array::from_fn(|i| acc[i].max(e[i])))
}

#[test]
fn ring_attention_and_its_gradients_match_plain_causal_attention() {
    // Degree 1 is plain attention (one range, no ring); rings start at 2.
    for (world, length) in [(2, 40), (2, 7), (3, 61), (4, 64), (4, 37)] {
        let [out, dq, dk, dv] = max_error_over_a_ring(world, length);
        eprintln!(
            "{world} ranks, {length} tokens: max |ring - plain| output {out:.1e}, dQ {dq:.1e}, dK {dk:.1e}, dV {dv:.1e}"
        );
        for (what, err) in [("output", out), ("dQ", dq), ("dK", dk), ("dV", dv)] {
            assert!(
                err < 1e-5,
                "{world} ranks, {length} tokens: {what} error {err}"
            );
        }
    }
}
