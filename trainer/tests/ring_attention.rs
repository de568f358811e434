//! Ring attention over real Gloo collectives equals plain causal attention.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tch::{Kind, Tensor};
use weft_planner::plan::zigzag_ranges;
use weft_trainer::attention::{Partial, ZigzagShard, ring_attention_forward};
use weft_trainer::comm::{ProcessGroup, Store};

const HEADS: i64 = 2;
const HEAD_DIM: i64 = 8;

fn qkv(length: i64) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(7);
    let shape = [1, HEADS, length, HEAD_DIM];
    let opts = (Kind::Float, tch::Device::Cpu);
    (
        Tensor::randn(shape, opts),
        Tensor::randn(shape, opts),
        Tensor::randn(shape, opts),
    )
}

fn slice(t: &Tensor, range: [u64; 2]) -> Tensor {
    t.narrow(2, range[0] as i64, (range[1] - range[0]) as i64)
        .contiguous()
}

fn max_error_over_a_ring(world: u32, length: i64) -> f64 {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // libtorch's generator is global: draw the data once, before the rank threads.
    let (q, k, v) = qkv(length);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let (q, k, v) = (q.copy(), k.copy(), v.copy());
            std::thread::spawn(move || {
                let store =
                    Store::open("127.0.0.1", port, world, rank == 0, Duration::from_secs(20))
                        .unwrap();
                let mut group =
                    ProcessGroup::gloo(&store, rank, world, "127.0.0.1", Duration::from_secs(20))
                        .unwrap();
                let ranges = &zigzag_ranges(length as u64, world)[rank as usize];
                let d = world as usize;
                // The 2d chunk lengths, from the same split the plan uses.
                let all = zigzag_ranges(length as u64, world);
                let mut chunk_lengths = vec![0i64; 2 * d];
                for (i, r) in all.iter().enumerate() {
                    chunk_lengths[i] = (r[0][1] - r[0][0]) as i64;
                    chunk_lengths[2 * d - 1 - i] = (r[1][1] - r[1][0]) as i64;
                }
                let shard = ZigzagShard {
                    chunks: [rank as usize, 2 * d - 1 - rank as usize],
                    chunk_lengths,
                    q: [slice(&q, ranges[0]), slice(&q, ranges[1])],
                    k: [slice(&k, ranges[0]), slice(&k, ranges[1])],
                    v: [slice(&v, ranges[0]), slice(&v, ranges[1])],
                };
                let ring: Vec<u32> = (0..world).collect();
                let out = ring_attention_forward(&mut group, &ring, &shard).unwrap();
                // Plain causal attention over the whole sequence, in one process.
                let reference = Partial::compute(&q, &k, &v, true).unwrap().out;
                (0..2)
                    .map(|c| {
                        (&out[c] - slice(&reference, ranges[c]))
                            .abs()
                            .max()
                            .double_value(&[])
                    })
                    .fold(0.0, f64::max)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold(0.0, f64::max)
}

#[test]
fn ring_attention_matches_plain_causal_attention() {
    // Degree 1 is plain attention (one range, no ring); rings start at 2.
    for (world, length) in [(2, 40), (2, 7), (3, 61), (4, 64), (4, 37)] {
        let err = max_error_over_a_ring(world, length);
        eprintln!("{world} ranks, {length} tokens: max |ring - plain| = {err:.2e}");
        assert!(
            err < 1e-5,
            "{world} ranks, {length} tokens: max error {err}"
        );
    }
}
