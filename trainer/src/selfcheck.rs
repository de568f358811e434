//! `weft-trainer selfcheck`: what a user runs on a new cluster, as people run
//! nccl-tests. Every rank runs random cases through the distributed attention
//! (random packed documents, random head layouts including grouped-query
//! attention) over the real collectives, forward and backward, and compares
//! its part with plain attention computed whole in one process; the launcher
//! reports the worst error per component.
//!
//! Data is drawn from the seed alone, so every rank draws the same documents
//! without talking; each rank then checks its own chunks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use weft_planner::rng::SplitMix64;

use crate::attention::{
    AttentionError, DocShard, RingShard, reference_attention, ring_attention_backward,
    ring_attention_forward,
};
use crate::comm::{CommError, ProcessGroup, Store};

/// The worst errors one rank saw, against the single-process reference.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SelfcheckReport {
    pub rank: u32,
    pub cases: u32,
    pub documents: u32,
    pub attention_out: f64,
    pub attention_dq: f64,
    pub attention_dk: f64,
    pub attention_dv: f64,
}

impl SelfcheckReport {
    /// The larger errors of two reports.
    pub fn worst(mut self, other: &SelfcheckReport) -> SelfcheckReport {
        self.cases = self.cases.max(other.cases);
        self.documents += other.documents;
        self.attention_out = self.attention_out.max(other.attention_out);
        self.attention_dq = self.attention_dq.max(other.attention_dq);
        self.attention_dk = self.attention_dk.max(other.attention_dk);
        self.attention_dv = self.attention_dv.max(other.attention_dv);
        self
    }

    pub fn max_error(&self) -> f64 {
        [
            self.attention_out,
            self.attention_dq,
            self.attention_dk,
            self.attention_dv,
        ]
        .into_iter()
        .fold(0.0, f64::max)
    }
}

/// Why a selfcheck worker could not finish.
#[derive(Debug, thiserror::Error)]
pub enum SelfcheckError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Attention(#[from] AttentionError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// One case's documents: lengths and head layout, drawn from the seed.
fn case_shape(rng: &mut SplitMix64) -> (Vec<i64>, i64, i64) {
    let documents = 1 + rng.below(4) as usize;
    let lengths = (0..documents).map(|_| 1 + rng.below(300) as i64).collect();
    let (heads, kv_heads) = [(2, 2), (4, 2), (4, 1), (3, 3)][rng.below(4) as usize];
    (lengths, heads, kv_heads)
}

/// Runs `cases` random cases as rank `rank` of `world`, meeting at
/// `127.0.0.1:port`.
pub fn run_worker(
    rank: u32,
    world: u32,
    port: u16,
    seed: u64,
    cases: u32,
) -> Result<SelfcheckReport, SelfcheckError> {
    let store = Store::open("127.0.0.1", port, world, rank == 0, Duration::from_secs(60))?;
    let mut group = ProcessGroup::gloo(&store, rank, world, "127.0.0.1", Duration::from_secs(60))?;
    let ring: Vec<u32> = (0..world).collect();
    let mut rng = SplitMix64::new(seed);
    let mut report = SelfcheckReport {
        rank,
        ..Default::default()
    };
    for case in 0..cases {
        let (lengths, heads, kv_heads) = case_shape(&mut rng);
        tch::manual_seed(seed.wrapping_add(u64::from(case)) as i64);
        let opts = (Kind::Float, tch::Device::Cpu);
        let docs: Vec<[Tensor; 4]> = lengths
            .iter()
            .map(|l| {
                [
                    Tensor::randn([1, heads, *l, 16], opts),
                    Tensor::randn([1, kv_heads, *l, 16], opts),
                    Tensor::randn([1, kv_heads, *l, 16], opts),
                    Tensor::randn([1, heads, *l, 16], opts),
                ]
            })
            .collect();
        let shard = RingShard {
            docs: docs
                .iter()
                .enumerate()
                .map(|(p, [q, k, v, _])| DocShard::split(q, k, v, p, world, rank as usize))
                .collect::<Result<_, _>>()?,
        };
        let grads_out: Vec<[Tensor; 2]> = docs
            .iter()
            .enumerate()
            .map(|(p, [q, _, _, g])| {
                // The output gradient is split like the queries.
                DocShard::split(g, q, q, p, world, rank as usize).map(|s| s.q)
            })
            .collect::<Result<_, _>>()?;
        let forward = ring_attention_forward(&mut group, &ring, &shard)?;
        let grads = ring_attention_backward(&mut group, &ring, &shard, &forward, &grads_out)?;
        for (p, [q, k, v, g]) in docs.iter().enumerate() {
            let [out, dq, dk, dv] = reference_attention(q, k, v, g)?;
            let reference =
                |full: &Tensor| DocShard::split(full, full, full, p, world, rank as usize);
            let error = |mine: &[Tensor; 2], full: &Tensor| -> Result<f64, SelfcheckError> {
                let expected = reference(full)?.q;
                let mut worst = 0.0f64;
                for c in 0..2 {
                    if expected[c].numel() > 0 {
                        let diff = mine[c].f_sub(&expected[c])?.f_abs()?.f_max()?;
                        worst = worst.max(diff.f_double_value(&[])?);
                    }
                }
                Ok(worst)
            };
            report.attention_out = report.attention_out.max(error(&forward[p].out, &out)?);
            report.attention_dq = report.attention_dq.max(error(&grads[p].dq, &dq)?);
            report.attention_dk = report.attention_dk.max(error(&grads[p].dk, &dk)?);
            report.attention_dv = report.attention_dv.max(error(&grads[p].dv, &dv)?);
            report.documents += 1;
        }
        report.cases += 1;
    }
    group.barrier()?;
    Ok(report)
}
