//! The c10d collectives through the shim, on Gloo over loopback: one thread per
//! rank, each with its own store connection and process group.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use tch::{Kind, Tensor};
use weft_trainer::comm::{CommError, ProcessGroup, Store};

/// Runs `body` on `world` ranks at once and returns their results by rank.
fn on_ranks<R: Send + 'static>(
    world: u32,
    timeout: Duration,
    body: impl Fn(ProcessGroup) -> R + Send + Sync + Clone + 'static,
) -> Vec<R> {
    let port = common::free_port();
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let body = body.clone();
            std::thread::spawn(move || {
                let (_store, group) = common::join(rank, world, port, timeout);
                body(group)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

fn zeros(n: i64) -> Tensor {
    Tensor::zeros([n], (Kind::Float, tch::Device::Cpu))
}

#[test]
fn all_reduce_sums_over_every_rank() {
    let out = on_ranks(3, Duration::from_secs(10), |mut g| {
        let r = g.rank() as f32;
        let mut t = Tensor::from_slice(&[r, 10.0 * r, 1.0]);
        g.all_reduce_sum(&mut t).unwrap();
        values(&t)
    });
    for v in out {
        assert_eq!(v, vec![3.0, 30.0, 3.0]);
    }
}

#[test]
fn send_and_recv_around_a_ring() {
    let out = on_ranks(4, Duration::from_secs(10), |mut g| {
        let (rank, world) = (g.rank(), g.world());
        let mine = Tensor::from_slice(&[rank as f32, rank as f32 + 0.5]);
        let mut got = zeros(2);
        let (next, prev) = ((rank + 1) % world, (rank + world - 1) % world);
        // Even ranks send first, odd ranks receive first: no deadlock.
        if rank % 2 == 0 {
            g.send(&mine, next, 7).unwrap();
            g.recv(&mut got, prev, 7).unwrap();
        } else {
            g.recv(&mut got, prev, 7).unwrap();
            g.send(&mine, next, 7).unwrap();
        }
        (prev, values(&got))
    });
    for (prev, got) in out {
        assert_eq!(got, vec![prev as f32, prev as f32 + 0.5]);
    }
}

#[test]
fn all_to_all_with_uneven_splits() {
    // Rank r sends (r + 1 + s) rows to rank s; each row holds 100·r + s.
    let out = on_ranks(3, Duration::from_secs(10), |mut g| {
        let (rank, world) = (g.rank() as i64, g.world() as i64);
        let input_splits: Vec<i64> = (0..world).map(|s| rank + 1 + s).collect();
        let output_splits: Vec<i64> = (0..world).map(|s| s + 1 + rank).collect();
        let rows: Vec<f32> = (0..world)
            .flat_map(|s| std::iter::repeat_n((100 * rank + s) as f32, (rank + 1 + s) as usize))
            .collect();
        let input = Tensor::from_slice(&rows);
        let mut output = zeros(output_splits.iter().sum::<i64>());
        g.all_to_all(&mut output, &input, &output_splits, &input_splits)
            .unwrap();
        (rank, values(&output))
    });
    for (rank, got) in out {
        let expected: Vec<f32> = (0..3i64)
            .flat_map(|s| std::iter::repeat_n((100 * s + rank) as f32, (s + 1 + rank) as usize))
            .collect();
        assert_eq!(got, expected, "rank {rank}");
    }
}

#[test]
fn broadcast_and_barrier() {
    let out = on_ranks(3, Duration::from_secs(10), |mut g| {
        let mut t = if g.rank() == 1 {
            Tensor::from_slice(&[7.0f32, 8.0, 9.0])
        } else {
            zeros(3)
        };
        g.broadcast(&mut t, 1).unwrap();
        g.barrier().unwrap();
        values(&t)
    });
    for v in out {
        assert_eq!(v, vec![7.0, 8.0, 9.0]);
    }
}

#[test]
fn bad_calls_are_refused_before_they_can_hang() {
    let out = on_ranks(2, Duration::from_secs(10), |mut g| {
        let t = Tensor::from_slice(&[1.0f32]);
        let bad_peer = g.send(&t, 5, 0).unwrap_err();
        let self_peer = g.send(&t, g.rank(), 0).unwrap_err();
        let mut out = zeros(1);
        let bad_splits = g.all_to_all(&mut out, &t, &[1], &[1]).unwrap_err();
        let strided = Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu)).transpose(0, 1);
        let not_contiguous = g.send(&strided, 1 - g.rank(), 0).unwrap_err();
        (g.rank(), bad_peer, self_peer, bad_splits, not_contiguous)
    });
    let (rank, bad_peer, self_peer, bad_splits, not_contiguous) = &out[0];
    assert!(
        bad_peer.to_string().contains("peer 5 is not another rank"),
        "{bad_peer}"
    );
    assert!(
        self_peer.to_string().contains(&format!("peer {rank}")),
        "{self_peer}"
    );
    assert!(
        bad_splits.to_string().contains("for a world of 2"),
        "{bad_splits}"
    );
    assert!(
        not_contiguous.to_string().contains("not contiguous"),
        "{not_contiguous}"
    );
    assert_eq!(bad_peer.category(), "collective_input");
}

#[test]
fn a_peer_that_never_sends_is_a_timeout_not_a_hang() {
    let out = on_ranks(2, Duration::from_secs(2), |mut g| {
        if g.rank() == 0 {
            let mut t = zeros(1);
            let start = Instant::now();
            let err = g.recv(&mut t, 1, 3).unwrap_err();
            Some((err, start.elapsed()))
        } else {
            // Rank 1 stays alive past rank 0's timeout without sending.
            std::thread::sleep(Duration::from_secs(4));
            None
        }
    });
    let (err, elapsed) = out[0].clone().unwrap();
    assert!(
        matches!(
            err,
            CommError::Operation {
                operation: "recv",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().to_lowercase().contains("timed out"),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[test]
fn a_client_with_no_server_fails_with_the_address() {
    let port = common::free_port();
    let start = Instant::now();
    let err = Store::open("127.0.0.1", port, 2, false, Duration::from_secs(1)).unwrap_err();
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert_eq!(err.category(), "rendezvous");
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// NCCL where there is no GPU (or no NCCL in this build): an error saying
/// so, at once, never a crash or a hang.
#[test]
fn an_nccl_group_without_a_gpu_is_an_error_naming_why() {
    if tch::Cuda::device_count() > 0 && weft_trainer::comm::nccl_built() {
        return; // A GPU machine with NCCL: the selfcheck runs NCCL for real.
    }
    let port = common::free_port();
    let store = Store::open("127.0.0.1", port, 1, true, Duration::from_secs(5)).unwrap();
    let start = Instant::now();
    let err = ProcessGroup::nccl(&store, 0, 1, 0, Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.category(), "process_group");
    let text = err.to_string();
    if weft_trainer::comm::nccl_built() {
        assert!(text.contains("GPU"), "{text}");
    } else {
        assert!(text.contains("built without NCCL"), "{text}");
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// The other ranks wait for rank 0's save past the collectives' timeout
/// (a model written to a slow volume), and go on when it is done.
#[test]
fn peers_wait_for_a_save_longer_than_a_collective_may_take() {
    let started = Instant::now();
    let out = on_ranks(3, Duration::from_secs(1), |mut g| {
        let rank = g.rank();
        let saved = weft_trainer::train::save_while_peers_wait(
            rank,
            &mut g,
            tch::Device::Cpu,
            || -> Result<(), CommError> {
                std::thread::sleep(Duration::from_secs(3));
                Ok(())
            },
        );
        (saved.is_ok(), g.barrier().is_ok())
    });
    assert_eq!(out, vec![(true, true); 3]);
    assert!(started.elapsed() >= Duration::from_secs(3));
}

/// A save that fails on rank 0 ends the others' wait with an error that
/// says so, at once, not after a collective's timeout.
#[test]
fn peers_hear_at_once_that_rank_0_could_not_save() {
    let started = Instant::now();
    let out = on_ranks(3, Duration::from_secs(30), |mut g| {
        let rank = g.rank();
        weft_trainer::train::save_while_peers_wait(
            rank,
            &mut g,
            tch::Device::Cpu,
            || -> Result<(), CommError> {
                std::thread::sleep(Duration::from_millis(500));
                Err(CommError::Operation {
                    operation: "save",
                    message: "the disk is full".to_string(),
                })
            },
        )
        .map_err(|e| e.to_string())
    });
    assert!(
        out[0].as_ref().unwrap_err().contains("the disk is full"),
        "{out:?}"
    );
    for said in &out[1..] {
        assert!(
            said.as_ref()
                .unwrap_err()
                .contains("rank 0 could not write"),
            "{out:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}
