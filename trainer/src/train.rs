//! The training loop one worker runs: the same on a laptop (`weft-trainer
//! local`) and in a pod.
//!
//! Each step every rank draws the same global batch (the sample order depends
//! on the seed only), plans it with the planner, identically and without
//! talking, runs its part of the plan ([`crate::step`]), all-reduces the
//! gradients, and applies the same AdamW update. Rank 0 reports each step and
//! writes checkpoints: model, optimizer state, and the data cursor, which is
//! independent of the world size, so a job resumed on a different number of
//! ranks continues with exactly the next batch.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tch::Tensor;
use tch::nn::VarStore;
use weft_planner::cost::{CostCoefficients, CostModel};
use weft_planner::model::ModelSpec;
use weft_planner::plan::StepPlan;
use weft_planner::profile::Profile;
use weft_planner::{PlanContext, PlanLimits, PlanningError, Strategy};

use crate::checkpoint::{CheckpointError, CheckpointLock, SaveRequest};
pub use crate::checkpoint::{CheckpointState, DataIdentity, checkpoint_path};
use crate::comm::{CommError, ProcessGroup, Store};
use crate::data::{Batch, Corpus, DataError, Tokenizer};
use crate::decompose::{DataAhead, DataOrder, DecompositionCursor, Drawn, SamplerSettings};
use crate::device::{Collectives, ComputeDevice, DeviceError, open_group};
use crate::model::{Architecture, Llama, ModelError, Precision};
use crate::optim::{AdamW, AdamWConfig, OptimError};
use crate::step::{
    Backprop, StepError, all_reduce_gradients, forward_backward, named_parameters, zero_gradients,
};
use crate::steptrace::{Phase, StepSpans};

/// Why training stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    HfModel(#[from] crate::hf::HfError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Optim(#[from] OptimError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("planning step {step}: {reason}")]
    Plan { step: u64, reason: String },
    #[error(
        "step {step}: rank(s) {differing:?} planned a different step than rank {rank} (plan digests differ); the planner must be deterministic"
    )]
    PlanDiverged {
        step: u64,
        rank: u32,
        differing: Vec<u32>,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "step {step}: the loss is {loss} (not finite); stopping rather than training on garbage"
    )]
    Diverged { step: u64, loss: f64 },
    #[error("rank {rank} stops at step {step}, as it was told to (fault injection)")]
    Injected { rank: u32, step: u64 },
    #[error("mesh {path}: {reason}")]
    Mesh { path: PathBuf, reason: String },
    #[error(
        "rank {rank}: rank 0 could not write what it was saving (a checkpoint or the trained model); its own error says why"
    )]
    PeerSaveFailed { rank: u32 },
    #[error("rank {rank} ran out of memory in {at} ({detail}): {change}")]
    OutOfMemory {
        rank: u32,
        /// `step N` or `document N`.
        at: String,
        /// libtorch's first line.
        detail: String,
        /// What to change, as the run takes it.
        change: &'static str,
    },
}

/// What a training step that runs out of memory should change.
const TRAINING_OUT_OF_MEMORY: &str = "give each rank fewer tokens (--rank-tokens; a long sequence then takes a wider ring, up to --max-cp-degree, the job's parallelism.maxCpDegree, or --cp-degree with --strategy static), or stream the backward (--stream-bp-chunk TOKENS, the job's parallelism.streamBpChunkTokens)";

/// What an evaluation that runs out of memory should change.
const EVALUATION_OUT_OF_MEMORY: &str = "give each rank fewer tokens (--rank-tokens), run more --ranks, or cut documents shorter (--max-seq-len)";

/// Whether libtorch's error `text` is one of its failed allocations: the
/// GPU's (its allocator's, CUDA's, cuBLAS's) or the host allocator's.
pub(crate) fn is_out_of_memory(text: &str) -> bool {
    [
        "CUDA out of memory",
        "CUDA error: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "DefaultCPUAllocator: can't allocate memory",
    ]
    .iter()
    .any(|phrase| text.contains(phrase))
}

/// The error of a step on rank `rank` (`at`: `step N` or `document N`):
/// when libtorch ran out of memory in it, what to change (with libtorch's
/// first line), else as it is. A collective's error stays one (a lost
/// peer's echo is told apart by it).
fn step_failed(err: StepError, rank: u32, at: String, change: &'static str) -> TrainError {
    if matches!(err, StepError::Comm(_)) {
        return err.into();
    }
    let text = err.to_string();
    if !is_out_of_memory(&text) {
        return err.into();
    }
    let detail = text.lines().next().unwrap_or_default().trim();
    let detail: String = detail.chars().take(300).collect();
    TrainError::OutOfMemory {
        rank,
        at,
        detail,
        change,
    }
}

impl TrainError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            TrainError::Data(e) => e.category(),
            TrainError::HfModel(e) => e.category(),
            TrainError::Comm(e) => e.category(),
            TrainError::Step(e) => e.category(),
            TrainError::Model(e) => e.category(),
            TrainError::Optim(e) => e.category(),
            TrainError::Device(e) => e.category(),
            TrainError::Torch(_) => "torch",
            TrainError::Plan { .. } => "planning",
            TrainError::PlanDiverged { .. } => "plan_diverged",
            // The echo of rank 0's failure, as a failed collective is of a
            // lost peer's: the launcher looks past it to rank 0's own.
            TrainError::PeerSaveFailed { .. } => "collective",
            TrainError::Checkpoint(e) => e.category(),
            TrainError::Diverged { .. } => "diverged",
            TrainError::Mesh { .. } => "mesh",
            TrainError::Injected { .. } => "injected_fault",
            TrainError::OutOfMemory { .. } => "out_of_memory",
        }
    }
}

/// Everything a training run needs besides its place in the world.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub data: PathBuf,
    pub model: ModelSpec,
    /// What the model sets beyond its shapes (rotary embedding, norms,
    /// biases, tied embeddings): weft's own, or a Hugging Face model's.
    pub architecture: Architecture,
    /// A Hugging Face model directory whose weights the run starts from
    /// (unless it resumes from a checkpoint), with its config as the run
    /// uses it (`--rope` may change it); None: weft's own model, drawn from
    /// the seed.
    pub hf_model: Option<(PathBuf, crate::hf::HfConfig)>,
    /// The documents' tokenizer: the byte tokenizer, or a model's
    /// `tokenizer.json` with the end-of-sequence token closing every
    /// document (read once, when the run is set up).
    pub tokenizer: Tokenizer,
    /// Rank 0 writes the trained model here, as a Hugging Face model
    /// directory, after the last step (with `hf_model`).
    pub save: Option<PathBuf>,
    /// Evaluate instead of training: every document of the corpus in order,
    /// one at a time (cut at `max_seq_len`), through the distributed
    /// forward; rank 0 prints each one's loss ([`EVAL_PREFIX`]).
    pub eval: bool,
    /// The field of each JSONL line, and the column of each Parquet row,
    /// that holds its document.
    pub text_field: String,
    /// Which files of the corpus are read, and how.
    pub data_format: crate::data::DataFormat,
    /// Steps to run in all (a resumed run continues up to this step).
    pub steps: u64,
    pub seed: u64,
    pub tokens_per_step: usize,
    pub max_seq_len: usize,
    /// Whole documents, or Dataset Decomposition's buckets with a curriculum.
    pub data_order: DataOrder,
    pub strategy: Strategy,
    /// Run the rings the plan makes hierarchical as such (the job's
    /// `parallelism.hierarchical`); false runs every ring flat.
    pub hierarchical_rings: bool,
    /// Most tokens one rank may hold: the budget the planner plans for. Long
    /// sequences are split over several ranks (context parallelism) to keep it.
    pub rank_tokens: Option<u64>,
    pub optimizer: AdamWConfig,
    /// fp32, or bf16 products and activations over fp32 weights.
    pub precision: Precision,
    /// The CPU, or a GPU per rank.
    pub device: ComputeDevice,
    /// Gloo (host memory), or NCCL (a GPU per rank).
    pub collectives: Collectives,
    /// Measured speeds to plan with instead of the datasheets'.
    pub profile: Option<Profile>,
    /// The job's limits on its plans (static degree, a cap on every ring,
    /// NIC-aware routing).
    pub limits: PlanLimits,
    /// Plain backprop, or StreamBP with its chunk on every ring or on the
    /// rings the planner chooses (the plans then price StreamBP's memory
    /// and recomputation, and say which rings stream).
    pub backprop: Backprop,
    /// Intra-op threads of libtorch per worker.
    pub threads: i32,
    /// Bound on every collective: a dead peer is an error after this long.
    pub timeout: Duration,
    /// Where checkpoints go: one directory per step (`step-00000123`).
    pub checkpoint_dir: Option<PathBuf>,
    /// Save every this many steps (and after the last step); 0: only at the end.
    pub checkpoint_every: u64,
    /// Complete checkpoints kept (the oldest are deleted); at least 1.
    pub checkpoint_keep: usize,
    /// Resume from the newest intact checkpoint in `checkpoint_dir`, if any.
    pub resume: bool,
    /// Resume even where the seed, corpus or batch settings differ from the
    /// checkpoint's (the data order then changes); refused otherwise.
    pub accept_data_change: bool,
    /// Fault injection for tests: rank `.0` stops with an error at the start
    /// of step `.1` (1-based), as a worker that dies mid-run.
    pub fail_at: Option<(u32, u64)>,
    /// Fault injection for tests: rank `.0` plans step `.1` (1-based)
    /// otherwise than the others, as a planner that is not deterministic
    /// would, so that every rank must stop before the step's collectives.
    pub misplan_at: Option<(u32, u64)>,
    /// In a pod: the mesh file and the epoch this run belongs to. When any
    /// rank sees a newer epoch there, every rank stops after the same step,
    /// with a checkpoint of it, so a change of membership loses no step.
    pub epoch_watch: Option<(PathBuf, u64)>,
    /// In a pod: set when this rank is asked to stop (SIGTERM, from its pod's
    /// worker). Every rank then stops after the same step, with a checkpoint
    /// of it, as for a newer epoch.
    pub stop_asked: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// In a pod: true until this rank begins its first step, and cleared
    /// then (a SIGTERM meanwhile ends the rank at once: it has trained
    /// nothing since the checkpoint it resumes from, and a rendezvous or a
    /// load could outlast the pod's grace period).
    pub starting: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Where this rank's step traces go, when anywhere.
    pub trace: Option<Arc<dyn crate::steptrace::StepSink>>,
    /// Rank 0 draws the plan of every Nth step (`.1`) into the directory
    /// `.0` (`step-00000012.svg`), to set what ran beside what was planned.
    pub plan_svg: Option<(PathBuf, u64)>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// Every step was trained.
    Finished,
    /// A newer mesh epoch was published; the ranks stopped together after
    /// `step`, checkpointed when a checkpoint directory was given.
    NewEpoch { step: u64 },
}

/// What rank 0 reports after each step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StepMetrics {
    /// 1-based step number.
    pub step: u64,
    /// Mean next-token loss of the global batch, before the update.
    pub loss: f64,
    /// Tokens in the global batch.
    pub tokens: u64,
    pub sequences: u64,
    /// Wall time of the step on rank 0: planning, forward, backward, all-reduce, update.
    pub step_time_s: f64,
    pub tokens_per_s: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub world: u32,
    pub strategy: String,
    pub micro_batches: u32,
    /// Largest context-parallel degree in the plan.
    pub max_cp_degree: u32,
    /// Ring groups of the plan run as hierarchical rings (round each node
    /// first, then across nodes).
    #[serde(default)]
    pub hierarchical_rings: u32,
    /// Transfers between nodes the plan spreads over several NICs of their
    /// node (NIC-aware routing; 0 when it is off or nothing crosses nodes).
    #[serde(default)]
    pub spread_routes: u32,
    /// StreamBP's smallest chunk in the step (the plan chooses each streamed
    /// rank's), when any ring of the step backpropagated with StreamBP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_bp_chunk: Option<u64>,
    /// Ring groups of the plan that streamed their backward (StreamBP), of
    /// `rings`.
    #[serde(default)]
    pub streamed_rings: u32,
    /// Ring groups of the plan (every micro-batch's).
    #[serde(default)]
    pub rings: u32,
    /// The plan's predicted max/mean rank time (1 is perfect balance).
    pub balance: f64,
    /// The plan's predicted forward and backward time (the cost model's, at
    /// the profile's speeds when one is given).
    #[serde(default)]
    pub predicted_step_s: f64,
    /// Max/mean over ranks of the tokens each holds for the linear modules.
    pub token_balance: f64,
    /// Slowest rank's seconds of forward and backward (from the first
    /// micro-batch to its last gradient, the all-reduce not included): what
    /// `predicted_step_s` predicts.
    #[serde(default)]
    pub forward_backward_s: f64,
    /// Slowest rank's seconds in ring attention (with its transfers), the
    /// remap's all-to-alls, and the gradient all-reduce.
    pub attention_s: f64,
    pub remap_s: f64,
    pub all_reduce_s: f64,
    /// Seconds the step waited for its plan: plans are made during the step
    /// before, so this is what planning adds to the step (all of it on the
    /// first step).
    pub plan_s: f64,
    /// Seconds the step waited for batches from the data thread, which
    /// draws them (reads and tokenizes their documents) ahead of the steps:
    /// 0 where it keeps up (all of the first batch's drawing on the first
    /// step).
    #[serde(default)]
    pub data_wait_s: f64,
    /// The data thread's speed on this step's batch: its tokens over the
    /// seconds drawing it took, beside `tokens_per_s`, what training
    /// consumes (the thread keeps up while this is the larger).
    #[serde(default)]
    pub data_tokens_per_s: f64,
    /// The step of the checkpoint completed after this step, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<u64>,
}

/// What plans are made with besides the cluster: the model, a rank's token
/// budget, measured speeds, the job's limits, and StreamBP.
#[derive(Clone, Debug)]
pub struct PlanSettings<'a> {
    pub model: &'a ModelSpec,
    /// Most tokens one rank may hold, whatever its memory allows.
    pub rank_tokens: Option<u64>,
    pub profile: Option<&'a Profile>,
    pub limits: PlanLimits,
    /// Plain backprop, StreamBP (the plans then price its memory and its
    /// recomputation), on every ring or where the planner chooses.
    pub backprop: Backprop,
    /// The precision the step keeps its activations in.
    pub precision: Precision,
}

impl<'a> PlanSettings<'a> {
    /// The model's plans with nothing else set.
    pub fn of(model: &'a ModelSpec) -> PlanSettings<'a> {
        PlanSettings {
            model,
            rank_tokens: None,
            profile: None,
            limits: PlanLimits::default(),
            backprop: Backprop::Plain,
            precision: Precision::Bf16,
        }
    }

    /// The planning context on `topology`.
    fn context(&self, topology: weft_planner::topology::Topology) -> PlanContext {
        let mut coefficients = CostCoefficients {
            max_tokens_per_rank: self.rank_tokens,
            precision: self.precision.activations(),
            ..Default::default()
        };
        coefficients.streambp = self.backprop.planned();
        if let Some(chunk) = self.backprop.chunk_tokens() {
            coefficients.streambp_chunk = chunk;
        }
        if let Some(profile) = self.profile {
            profile.calibrate_for(&topology, &mut coefficients);
        }
        PlanContext {
            topology,
            cost: CostModel::new(self.model.clone(), coefficients),
            limits: self.limits.clone(),
        }
    }
}

impl TrainConfig {
    /// Where the files of the run's tokenizer are, to be saved with the
    /// model: beside the `tokenizer.json` it reads (a tokenizer of its own),
    /// else in the model's directory `model_dir`.
    pub fn tokenizer_files<'a>(&'a self, model_dir: &'a Path) -> &'a Path {
        match &self.tokenizer {
            Tokenizer::File { path, .. } => path.parent().unwrap_or(model_dir),
            Tokenizer::Bytes => model_dir,
        }
    }

    /// How this run plans.
    pub fn planning(&self) -> PlanSettings<'_> {
        PlanSettings {
            model: &self.model,
            rank_tokens: self.rank_tokens,
            profile: self.profile.as_ref(),
            limits: self.limits.clone(),
            backprop: self.backprop,
            precision: self.precision,
        }
    }
}

/// The planning context for `world` local ranks: one node of `world` GPUs of
/// the default kind (the planner needs a topology), priced at the speeds of
/// the profile when given (else the datasheets', which only the split of the
/// work follows on CPU).
pub fn local_plan_context(world: u32, planning: &PlanSettings) -> Result<PlanContext, TrainError> {
    let planning_error = |reason: String| TrainError::Plan { step: 0, reason };
    let cluster = weft_planner::cluster::parse_cluster(&format!("1x{world}"))
        .map_err(|e| planning_error(e.to_string()))?;
    let topology = weft_planner::topology::Topology::new(&cluster)
        .map_err(|e| planning_error(e.to_string()))?;
    Ok(planning.context(topology))
}

/// The planning context on the nodes of `mesh`
/// ([`weft_planner::mesh::mesh_cluster`]: their GPU models and NICs).
pub fn mesh_cluster_context(
    mesh: &weft_planner::mesh::MeshPlan,
    planning: &PlanSettings,
) -> Result<PlanContext, TrainError> {
    let cluster = weft_planner::mesh::mesh_cluster(mesh);
    let topology =
        weft_planner::topology::Topology::new(&cluster).map_err(|e| TrainError::Plan {
            step: 0,
            reason: format!("the mesh's nodes: {e}"),
        })?;
    Ok(planning.context(topology))
}

/// The planning context of a pod's rank: the cluster the mesh of `epoch` at
/// `path` describes ([`weft_planner::mesh::mesh_cluster`]: its nodes, GPU
/// models and NICs), so that plans use the real topology (rings across nodes
/// run hierarchically, transfers are routed over the nodes' NICs); every
/// rank of the epoch reads the same mesh and plans alike. `None` when the
/// mesh is already of a newer epoch. A mesh briefly unreadable (Kubernetes
/// swaps the file) is read again for up to 10 s.
fn mesh_plan_context(
    path: &Path,
    epoch: u64,
    world: u32,
    config: &TrainConfig,
) -> Result<Option<PlanContext>, TrainError> {
    let mesh_error = |reason: String| TrainError::Mesh {
        path: path.to_path_buf(),
        reason,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mesh = loop {
        match crate::pod::read_mesh(path) {
            Ok(mesh) => break mesh,
            Err(e) if Instant::now() >= deadline => return Err(mesh_error(e.to_string())),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    if mesh.epoch > epoch {
        return Ok(None);
    }
    if mesh.epoch < epoch || mesh.world_size != world {
        return Err(mesh_error(format!(
            "it is epoch {} of {} ranks; this rank was started for epoch {epoch} of {world}",
            mesh.epoch, mesh.world_size
        )));
    }
    let ctx = mesh_cluster_context(&mesh, &config.planning())?;
    if ctx.topology.world() != world {
        return Err(mesh_error(format!(
            "its nodes hold {} ranks, the epoch {world}",
            ctx.topology.world()
        )));
    }
    Ok(Some(ctx))
}

/// A 64-bit digest (FNV-1a) of a plan's JSON, to check that every rank
/// planned the same step.
fn plan_digest(plan: &StepPlan) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    // Writing JSON into memory fails only for maps with non-string keys,
    // which a plan has none of; such a plan digests as its Debug text.
    let text = serde_json::to_string(plan).unwrap_or_else(|_| format!("{plan:?}"));
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The ranks whose plan digest differs from this rank's, gathered before
/// the step's first collective (ranks that disagree would otherwise wait on
/// each other's rings). The digests are gathered whole
/// ([`ProcessGroup::all_gather_u64`]), so the comparison is exact at any world
/// size. (A sum of digests compared with `world` times one's own, in an f64,
/// lost bits past 53 and failed on most world sizes.)
pub fn ranks_that_planned_otherwise(
    group: &mut ProcessGroup,
    plan: &StepPlan,
    device: tch::Device,
) -> Result<Vec<u32>, CommError> {
    let mine = plan_digest(plan);
    let all = group.all_gather_u64(mine, device)?;
    Ok((0..all.len() as u32)
        .filter(|r| all[*r as usize] != mine)
        .collect())
}

fn checkpoint_error(path: &Path, reason: impl ToString) -> TrainError {
    TrainError::Checkpoint(CheckpointError::Mismatch {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    })
}

/// The first 8 bytes of the SHA-256 of a checkpoint's manifest (which holds
/// every file's digest), as a number ranks can compare; 0 when it has none.
fn manifest_digest(dir: &Path) -> u64 {
    use sha2::Digest;
    std::fs::read(dir.join(crate::checkpoint::MANIFEST_FILE)).map_or(0, |bytes| {
        let digest = sha2::Sha256::digest(&bytes);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_le_bytes(first)
    })
}

/// The file a checkpoint's state is read from, named in errors about it.
const STATE: &str = crate::checkpoint::STATE_FILE;

/// Rank 0's checkpoint state (`state.json`'s content), to every rank: rank 0
/// passes its own, the others receive it.
fn share_checkpoint_state(
    rank: u32,
    group: &mut ProcessGroup,
    device: tch::Device,
    own: Option<&CheckpointState>,
) -> Result<CheckpointState, TrainError> {
    let bytes = match (rank, own) {
        (0, Some(state)) => {
            serde_json::to_vec(state).map_err(|e| checkpoint_error(Path::new(STATE), e))?
        }
        _ => Vec::new(),
    };
    let len = group.all_gather_u64(bytes.len() as u64, device)?[0];
    let mut wire = if rank == 0 {
        let as_i64: Vec<i64> = bytes.iter().map(|b| i64::from(*b)).collect();
        Tensor::from_slice(&as_i64).f_to_device(device)?
    } else {
        Tensor::f_zeros([len as i64], (tch::Kind::Int64, device))?
    };
    group.broadcast(&mut wire, 0)?;
    let received: Vec<u8> = Vec::<i64>::try_from(&wire.f_to_device(tch::Device::Cpu)?)?
        .into_iter()
        .map(|b| b as u8)
        .collect();
    serde_json::from_slice(&received).map_err(|e| {
        checkpoint_error(
            Path::new(STATE),
            format!("rank 0's checkpoint state did not arrive whole: {e}"),
        )
    })
}

/// Each tensor, in place, as rank 0 has it (the same list, in the same
/// order, on every rank).
fn broadcast_from_rank_zero(
    group: &mut ProcessGroup,
    tensors: impl Iterator<Item = Tensor>,
) -> Result<(), TrainError> {
    tch::no_grad(|| -> Result<(), TrainError> {
        for mut tensor in tensors {
            group.broadcast(&mut tensor, 0)?;
        }
        Ok(())
    })
}

/// How long rank 0 waits for the checkpoint directory's lock: longer than a
/// rank of the previous mesh epoch takes to stop (its drain, then a kill).
const LOCK_WAIT: Duration = Duration::from_secs(60);

/// Rank 0 takes the checkpoint directory `root`: its lock, what writers that
/// died left put right, and, to resume, the newest intact checkpoint (newer
/// ones that are refused are named and set aside). A run that does not
/// resume is refused a directory that already holds checkpoints: its own
/// would be mixed with another run's and pruned among them.
fn own_checkpoints(
    root: &Path,
    config: &TrainConfig,
) -> Result<(CheckpointLock, Option<crate::checkpoint::Intact>), TrainError> {
    let lock = CheckpointLock::acquire(root, LOCK_WAIT)?;
    if let Some(reason) = &lock.unsupported {
        notice(
            0,
            &format!(
                "{} cannot be locked ({reason}): nothing stops another run from writing there too",
                root.display()
            ),
        );
    }
    crate::checkpoint::clear_dead_writes(&lock, root)?;
    if !config.resume {
        if let Some((step, dir)) = crate::checkpoint::checkpoints(root)?.pop() {
            return Err(checkpoint_error(
                &dir,
                format!(
                    "{} already holds checkpoints (the newest of step {step}); resume that run, or give this one an empty directory",
                    root.display()
                ),
            ));
        }
        return Ok((lock, None));
    }
    let intact = crate::checkpoint::latest_intact(root)?;
    match &intact {
        None => notice(
            0,
            &format!(
                "no checkpoint in {} yet: starting from step 1",
                root.display()
            ),
        ),
        Some(intact) => {
            for (dir, reason) in &intact.refused {
                notice(
                    0,
                    &format!(
                        "checkpoint {} is refused: {reason}; it is set aside",
                        dir.display()
                    ),
                );
            }
            let refused: Vec<PathBuf> = intact.refused.iter().map(|(d, _)| d.clone()).collect();
            crate::checkpoint::set_aside(&lock, &refused)?;
            let unchecked = if intact.checked {
                ""
            } else {
                " (written before weft kept manifests: its files could not be checked)"
            };
            notice(
                0,
                &format!(
                    "resuming from {} (step {}){unchecked}",
                    intact.dir.display(),
                    intact.state.step
                ),
            );
        }
    }
    Ok((lock, intact))
}

/// Refuses to resume the checkpoint `state` (in `dir`) with `config` where
/// it would not continue the same run: another model, or another data order
/// (seed, corpus, batch settings) unless `config.accept_data_change`, or
/// another kind of data order, which has no cursor to continue from at all.
pub fn check_resumable(
    dir: &Path,
    state: &CheckpointState,
    config: &TrainConfig,
    data: &DataIdentity,
) -> Result<(), TrainError> {
    if state.model != config.model {
        return Err(checkpoint_error(
            dir,
            format!(
                "it holds model {}, this run asks for model {}",
                model_shape(&state.model),
                model_shape(&config.model)
            ),
        ));
    }
    if let Some(architecture) = &state.architecture
        && *architecture != config.architecture
    {
        return Err(checkpoint_error(
            dir,
            format!(
                "it holds a model of architecture {architecture:?}, this run's is {:?} (a Hugging Face --model's config, and --rope); resume with the run's model and settings",
                config.architecture
            ),
        ));
    }
    let changes = state.data_changes(data);
    if !changes.is_empty() && !config.accept_data_change {
        return Err(checkpoint_error(
            dir,
            format!(
                "resuming it would not continue with the next batch of its run: {}; run with the checkpoint's settings, or pass --accept-data-change to resume with a new data order",
                changes.join("; ")
            ),
        ));
    }
    if state.data_order != config.data_order {
        return Err(checkpoint_error(
            dir,
            format!(
                "its batches were drawn in data order {:?}, this run asks for {:?}; resume in the same order",
                state.data_order, config.data_order
            ),
        ));
    }
    Ok(())
}

/// What the data order of a run with `config` over `corpus` depends on.
pub fn data_identity(config: &TrainConfig, corpus: &Corpus, tokenizer: &Tokenizer) -> DataIdentity {
    DataIdentity {
        seed: config.seed,
        // The token counts, and so the batches, follow the tokenizer too.
        corpus_digest: match tokenizer.identity() {
            None => corpus.digest(),
            Some(tokens) => format!("{}+tokenizer:{tokens}", corpus.digest()),
        },
        tokens_per_step: config.tokens_per_step,
        max_seq_len: config.max_seq_len,
        data_order: config.data_order,
    }
}

/// A model's name and dimensions, to tell two models apart that share a name.
fn model_shape(m: &ModelSpec) -> String {
    format!(
        "{:?} ({} layers, hidden {}, {} heads, {} kv heads, ffn {}, vocabulary {})",
        m.name, m.layers, m.hidden, m.heads, m.kv_heads, m.ffn, m.vocab
    )
}

/// Marks the line rank 0 prints for each document it evaluated: a
/// [`DocumentLoss`] as JSON.
pub const EVAL_PREFIX: &str = "weft-eval ";

/// One document's next-token loss, as `eval` reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DocumentLoss {
    /// Where it came from: `path` or `path:line`.
    pub document: String,
    /// Its tokens, as cut at the longest sequence.
    pub tokens: u64,
    /// Summed cross-entropy of its predicted tokens (`tokens − 1`).
    pub loss_sum: f64,
}

/// What [`evaluate`] works with.
struct EvalRun<'a> {
    rank: u32,
    model: &'a Llama,
    params: &'a [(String, Tensor)],
    ctx: &'a PlanContext,
    corpus: &'a Corpus,
    tokenizer: &'a Tokenizer,
}

/// Every document of the corpus in order, one at a time, through the
/// distributed step as training plans and runs it (its gradients are
/// dropped): the summed next-token loss of each, which rank 0 prints.
fn evaluate(
    run: EvalRun,
    group: &mut ProcessGroup,
    config: &TrainConfig,
) -> Result<(), TrainError> {
    let device = run.model.head.ws.device();
    for (index, document) in run.corpus.documents.iter().enumerate() {
        let mut tokens = run.tokenizer.encode(&document.source, &document.text)?;
        tokens.truncate(config.max_seq_len);
        let count = tokens.len() as u64;
        let loss_sum = if count < 2 {
            // Nothing to predict.
            0.0
        } else {
            let batch = Batch {
                samples: vec![crate::data::Sample {
                    index: index as u64,
                    document: index,
                    tokens,
                }],
            };
            let plan = weft_planner::plan_step(
                config.strategy,
                run.ctx,
                &[count],
                Some(config.max_seq_len as u64),
            )
            .map_err(|e| TrainError::Plan {
                step: index as u64 + 1,
                reason: format!("{}: {e}", document.source),
            })?;
            let differing = ranks_that_planned_otherwise(group, &plan, device)?;
            if !differing.is_empty() {
                return Err(TrainError::PlanDiverged {
                    step: index as u64 + 1,
                    rank: run.rank,
                    differing,
                });
            }
            zero_gradients(run.params)?;
            let outcome = forward_backward(run.model, group, &plan, &batch).map_err(|e| {
                let at = format!("document {} ({})", index + 1, document.source);
                step_failed(e, run.rank, at, EVALUATION_OUT_OF_MEMORY)
            })?;
            let mut sum = Tensor::from_slice(&[outcome.loss_sum]).f_to_device(device)?;
            group.all_reduce_sum(&mut sum)?;
            let sum = Vec::<f64>::try_from(&sum)?[0];
            if !sum.is_finite() {
                return Err(TrainError::Diverged {
                    step: index as u64 + 1,
                    loss: sum,
                });
            }
            sum
        };
        if run.rank == 0 {
            let line = DocumentLoss {
                document: document.source.clone(),
                tokens: count,
                loss_sum,
            };
            println!(
                "{EVAL_PREFIX}{}",
                serde_json::to_string(&line).unwrap_or_default()
            );
        }
    }
    zero_gradients(run.params)?;
    Ok(())
}

/// Marks a line rank 0 prints on its standard output for the person running
/// the job (a refused checkpoint, where a run resumes from): `local` shows it
/// on the terminal, a pod in its log.
pub const NOTICE_PREFIX: &str = "weft-notice ";

/// Draws `plan`, the plan step `step` ran, into `dir` (whole or not at
/// all). A picture that cannot be written is said, and training goes on.
fn draw_plan(
    rank: u32,
    dir: &Path,
    step: u64,
    plan: &weft_planner::plan::StepPlan,
    note: Option<&str>,
) {
    let path = dir.join(format!("step-{step:08}.svg"));
    let partial = dir.join(format!(".step-{step:08}.svg.partial"));
    let written = weft_planner::picture::plan_svg_noted(plan, note)
        .map_err(|e| e.to_string())
        .and_then(|svg| std::fs::write(&partial, svg).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::rename(&partial, &path).map_err(|e| e.to_string()));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        notice(
            rank,
            &format!(
                "the plan of step {step} was not drawn into {}: {e}",
                path.display()
            ),
        );
    }
}

fn notice(rank: u32, text: &str) {
    if rank == 0 {
        println!("{NOTICE_PREFIX}{text}");
    }
}

/// Where the ranks of a run meet: the store at `store_host:port` (rank 0
/// serves it), and the address this rank's collectives use (`bind_host`: its
/// pod's IP in a cluster, the loopback address on one machine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendezvous {
    pub store_host: String,
    pub port: u16,
    pub bind_host: String,
    /// This rank's index among the ranks of its machine (or pod): on GPUs,
    /// which of them it computes on.
    pub local_rank: u32,
}

impl Rendezvous {
    /// Rank `rank` of a run whose every rank is on this machine.
    pub fn local(port: u16, rank: u32) -> Rendezvous {
        Rendezvous {
            store_host: "127.0.0.1".to_string(),
            port,
            bind_host: "127.0.0.1".to_string(),
            local_rank: rank,
        }
    }
}

/// A step's batch and its plan, being made on a thread of its own.
struct PlanAhead {
    drawn: Drawn,
    plan: Planning,
}

enum Planning {
    Thread(std::thread::JoinHandle<Result<StepPlan, PlanningError>>),
    /// Planned in place: the thread could not be started.
    Done(Result<StepPlan, PlanningError>),
}

impl PlanAhead {
    fn start(drawn: Drawn, ctx: &Arc<PlanContext>, config: &TrainConfig) -> PlanAhead {
        let batch = &drawn.batch;
        let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
        let (strategy, context) = (config.strategy, Some(config.max_seq_len as u64));
        let shared = Arc::clone(ctx);
        let thread = std::thread::Builder::new()
            .name("weft-planner".to_string())
            .spawn(move || weft_planner::plan_step(strategy, &shared, &lengths, context));
        let plan = match thread {
            Ok(thread) => Planning::Thread(thread),
            Err(_) => {
                let lengths: Vec<u64> = batch.lengths().iter().map(|l| *l as u64).collect();
                Planning::Done(weft_planner::plan_step(strategy, ctx, &lengths, context))
            }
        };
        PlanAhead { drawn, plan }
    }

    /// The batch and its plan, once made.
    fn finish(self) -> (Drawn, Result<StepPlan, String>) {
        let plan = match self.plan {
            Planning::Thread(thread) => match thread.join() {
                Ok(planned) => planned.map_err(|e| e.to_string()),
                Err(_) => Err("the planning thread stopped without a plan".to_string()),
            },
            Planning::Done(planned) => planned.map_err(|e| e.to_string()),
        };
        (self.drawn, plan)
    }
}

/// Runs `save` on rank 0 while every other rank waits for it, however long
/// the write takes (tens of GB onto a network volume can take longer than a
/// collective may wait): a thread of rank 0 and the other ranks meet in a
/// small collective ten times a second until the save is over, so no collective
/// waits past its timeout. Every rank returns once it is over; rank 0 with
/// the save's error, the others with [`TrainError::PeerSaveFailed`] when
/// it failed.
pub fn save_while_peers_wait<E>(
    rank: u32,
    group: &mut ProcessGroup,
    device: tch::Device,
    save: impl FnOnce() -> Result<(), E>,
) -> Result<(), TrainError>
where
    TrainError: From<E>,
{
    if group.world() == 1 {
        return Ok(save()?);
    }
    // What rank 0 tells the others: still saving, saved, or failed.
    const SAVING: u64 = 0;
    const SAVED: u64 = 1;
    const FAILED: u64 = 2;
    if rank != 0 {
        loop {
            match group.all_gather_u64(SAVING, device)?[0] {
                SAVING => {}
                SAVED => return Ok(()),
                _ => return Err(TrainError::PeerSaveFailed { rank }),
            }
        }
    }
    /// Ends the wait when the save returns (saying how it went), or panics.
    struct Over<'a>(&'a std::sync::atomic::AtomicU64, u64);
    impl Drop for Over<'_> {
        fn drop(&mut self) {
            self.0.store(self.1, std::sync::atomic::Ordering::Release);
        }
    }
    let state = std::sync::atomic::AtomicU64::new(SAVING);
    let (saved, waited) = std::thread::scope(|scope| {
        let keepalive = scope.spawn(|| -> Result<(), CommError> {
            loop {
                let now = state.load(std::sync::atomic::Ordering::Acquire);
                group.all_gather_u64(now, device)?;
                if now != SAVING {
                    return Ok(());
                }
                // Well within any collective's timeout (a second at least).
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let saved = {
            // A panic leaves it FAILED.
            let mut over = Over(&state, FAILED);
            let saved = save();
            over.1 = if saved.is_ok() { SAVED } else { FAILED };
            saved
        };
        let waited = keepalive.join().unwrap_or_else(|_| {
            Err(CommError::Operation {
                operation: "all_gather",
                message: "the thread keeping the peers waiting stopped".to_string(),
            })
        });
        (saved, waited)
    });
    saved?;
    waited?;
    Ok(())
}

/// Trains as rank `rank` of `world`, meeting the others at `rendezvous`;
/// calls `report` with each step's metrics on rank 0.
pub fn run_worker(
    rank: u32,
    world: u32,
    rendezvous: &Rendezvous,
    config: &TrainConfig,
    mut report: impl FnMut(&StepMetrics),
) -> Result<RunEnd, TrainError> {
    let began = Instant::now();
    tch::set_num_threads(config.threads.max(1));
    // The planner plans the next step while libtorch runs this one: it gets
    // the rank's share of the cores too, not every core of the machine.
    weft_planner::schedule::set_threads(usize::try_from(config.threads).unwrap_or(1));
    let device = config.device.of_rank(rendezvous.local_rank)?;
    let corpus = Arc::new(Corpus::load_with(
        &config.data,
        config.data_format,
        &config.text_field,
    )?);
    let tokenizer = &config.tokenizer;
    // In a pod, plan on the cluster of this epoch's mesh; a rank that finds
    // the mesh already moved on stops at once, as it would after a step.
    let ctx = match &config.epoch_watch {
        Some((path, epoch)) => match mesh_plan_context(path, *epoch, world, config)? {
            Some(ctx) => ctx,
            None => return Ok(RunEnd::NewEpoch { step: 0 }),
        },
        None => local_plan_context(world, &config.planning())?,
    };
    let store = Store::open(
        &rendezvous.store_host,
        rendezvous.port,
        world,
        rank == 0,
        config.timeout,
    )?;
    let mut group = open_group(
        device,
        config.collectives,
        &store,
        rank,
        world,
        &rendezvous.bind_host,
        config.timeout,
    )?;
    let met = Instant::now();
    if let Some(trace) = &config.trace {
        trace.span(
            "rendezvous",
            began,
            met,
            vec![opentelemetry::KeyValue::new("weft.world", i64::from(world))],
        );
    }

    // The same seed gives the same initial weights on every device: they are
    // drawn on the CPU, then moved; a Hugging Face model's are read.
    tch::manual_seed(config.seed as i64);
    let mut vs = VarStore::new(tch::Device::Cpu);
    let model = match &config.hf_model {
        Some((dir, hf)) => crate::hf::load_into(dir, &vs.root(), tch::Device::Cpu, hf)?,
        None => Llama::with_architecture(&vs.root(), &config.model, &config.architecture)?,
    };
    let model = model.with_precision(config.precision);
    if let Some(skipped) = corpus.skipped_summary() {
        notice(
            rank,
            &format!("the corpus skips what is not a regular file: {skipped}"),
        );
    }
    let data_identity = data_identity(config, &corpus, tokenizer);
    // Rank 0 writes the checkpoints: it owns the directory while it runs,
    // and it alone chooses the checkpoint every rank resumes from.
    let (_lock, chosen) = match &config.checkpoint_dir {
        Some(root) if rank == 0 => {
            let (lock, chosen) = own_checkpoints(root, config)?;
            (Some(lock), chosen)
        }
        _ => (None, None),
    };
    let mut start_step = 0;
    let mut next_sample = 0;
    let mut buckets = DecompositionCursor::default();
    let mut resumed_from: Option<PathBuf> = None;
    // Whether some rank cannot read the checkpoint rank 0 resumes from (a
    // checkpoint directory of rank 0's pod alone): rank 0 then sends what it
    // read, the model and the optimizer's state, to every rank.
    let mut from_rank_zero = false;
    if let (Some(root), true) = (&config.checkpoint_dir, config.resume) {
        // Rank 0's choice, to every rank (0: none).
        let mine = chosen.as_ref().map_or(0, |c| c.state.step + 1);
        let choice = group.all_gather_u64(mine, device)?[0];
        let mut unreadable = false;
        let mut state = match (choice, chosen) {
            (0, _) => None,
            (_, Some(intact)) => Some((intact.dir, intact.state)),
            // The other ranks read the same directory themselves where
            // they can (storage every worker shares).
            (step, None) => {
                let dir = checkpoint_path(root, step - 1);
                match crate::checkpoint::verify(&dir) {
                    Ok(verified) => Some((dir, verified.state)),
                    Err(reason) => {
                        // (Not a notice: those are rank 0's.)
                        eprintln!(
                            "weft-trainer rank {rank}: cannot read {} ({reason}), the checkpoint rank 0 resumes from: rank 0 sends it",
                            dir.display()
                        );
                        unreadable = true;
                        None
                    }
                }
            }
        };
        // A copy of the same name that is not rank 0's (a directory of this
        // pod's own, written when it ran rank 0 earlier) is not read: the
        // manifests (every file's digest) must be rank 0's.
        let digests = group.all_gather_u64(
            state.as_ref().map_or(0, |(dir, _)| manifest_digest(dir)),
            device,
        )?;
        if choice != 0 && digests[rank as usize] != digests[0] && !unreadable {
            eprintln!(
                "weft-trainer rank {rank}: its copy of step {}'s checkpoint is not the one rank 0 resumes from: rank 0 sends it",
                choice - 1
            );
            unreadable = true;
        }
        from_rank_zero = group
            .all_gather_u64(u64::from(unreadable), device)?
            .iter()
            .any(|u| *u != 0);
        // Every rank but 0 then takes rank 0's: none reads its own copy.
        let receives = from_rank_zero && rank != 0;
        if from_rank_zero {
            let received =
                share_checkpoint_state(rank, &mut group, device, state.as_ref().map(|(_, s)| s))?;
            if receives {
                state = Some((checkpoint_path(root, choice - 1), received));
            }
        }
        if let Some((dir, state)) = state {
            check_resumable(&dir, &state, config, &data_identity)?;
            if !receives {
                let hf_dir = dir.join(crate::checkpoint::HF_MODEL_DIR);
                match &config.hf_model {
                    // A Hugging Face run's checkpoint holds the model as that
                    // model's directory: read as the model was, then taken over.
                    Some((_, hf)) if hf_dir.join("config.json").is_file() => {
                        let read = VarStore::new(tch::Device::Cpu);
                        crate::hf::load_into(&hf_dir, &read.root(), tch::Device::Cpu, hf)?;
                        vs.copy(&read).map_err(|e| checkpoint_error(&dir, e))?;
                    }
                    _ => vs
                        .load(dir.join(crate::checkpoint::MODEL_FILE))
                        .map_err(|e| checkpoint_error(&dir, e))?,
                }
                resumed_from = Some(dir);
            }
            start_step = state.step;
            next_sample = state.next_sample;
            buckets = state.buckets.unwrap_or_default();
        }
    }
    vs.set_device(device);
    let params = named_parameters(&vs);
    if from_rank_zero {
        broadcast_from_rank_zero(&mut group, params.iter().map(|(_, p)| p.shallow_clone()))?;
    }
    if config.eval {
        evaluate(
            EvalRun {
                rank,
                model: &model,
                params: &params,
                ctx: &ctx,
                corpus: &corpus,
                tokenizer,
            },
            &mut group,
            config,
        )?;
        group.barrier()?;
        return Ok(RunEnd::Finished);
    }
    let mut optimizer = AdamW::over(
        &params,
        AdamWConfig {
            total_steps: config.steps,
            ..config.optimizer.clone()
        },
    )?;
    if let Some(dir) = &resumed_from {
        optimizer.load(&dir.join(crate::checkpoint::OPTIMIZER_FILE))?;
    }
    if from_rank_zero {
        broadcast_from_rank_zero(&mut group, optimizer.moments().into_iter().map(|(_, m)| m))?;
        let steps = group.all_gather_u64(optimizer.steps() as u64, device)?[0];
        optimizer.set_steps(steps as i64);
    }
    // The batches are drawn (their documents tokenized) on a thread of
    // their own, ahead of the steps; each step's plan on another while the
    // step before it trains (the planner is pure and the data order known
    // ahead): both leave the critical path, but for the first step's.
    let mut data = DataAhead::start(
        Arc::clone(&corpus),
        tokenizer.clone(),
        SamplerSettings {
            order: config.data_order,
            seed: config.seed,
            tokens_per_step: config.tokens_per_step,
            max_seq_len: config.max_seq_len,
            resume_at: (next_sample, buckets),
            batches: config.steps.saturating_sub(start_step),
        },
    )?;
    let ctx = Arc::new(ctx);
    let mut ahead: Option<PlanAhead> = None;
    if let Some(starting) = &config.starting {
        starting.store(false, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some(trace) = &config.trace {
        trace.span(
            "resume",
            met,
            Instant::now(),
            vec![opentelemetry::KeyValue::new(
                "weft.from_step",
                start_step as i64,
            )],
        );
    }
    for step in start_step..config.steps {
        if config.fail_at == Some((rank, step + 1)) {
            return Err(TrainError::Injected {
                rank,
                step: step + 1,
            });
        }
        let started = Instant::now();
        let mut data_wait_s = 0.0;
        let current = match ahead.take() {
            Some(current) => current,
            None => {
                let waiting = Instant::now();
                let drawn = data.next_drawn()?;
                data_wait_s += waiting.elapsed().as_secs_f64();
                PlanAhead::start(drawn, &ctx, config)
            }
        };
        let waiting = Instant::now();
        let (drawn, plan) = current.finish();
        // Where the data order stands after this step's batch, for its checkpoint.
        let (next_sample, bucket_cursor) = (drawn.next_sample, drawn.buckets);
        let (batch, draw_s) = (drawn.batch, drawn.draw_s);
        let mut plan = plan.map_err(|reason| TrainError::Plan {
            step: step + 1,
            reason,
        })?;
        let plan_s = waiting.elapsed().as_secs_f64();
        let mut phases = vec![Phase::new("plan", waiting, Instant::now())];
        if step + 1 < config.steps {
            let waiting = Instant::now();
            let drawn = data.next_drawn()?;
            data_wait_s += waiting.elapsed().as_secs_f64();
            ahead = Some(PlanAhead::start(drawn, &ctx, config));
        }
        if !config.hierarchical_rings {
            plan.micro_batches
                .iter_mut()
                .flat_map(|m| m.groups.iter_mut())
                .for_each(|g| g.inner_ring = 0);
        }

        if config.misplan_at == Some((rank, step + 1)) {
            plan.strategy
                .push_str(" (planned otherwise: fault injection)");
        }
        let differing = ranks_that_planned_otherwise(&mut group, &plan, device)?;
        if !differing.is_empty() {
            return Err(TrainError::PlanDiverged {
                step: step + 1,
                rank,
                differing,
            });
        }

        zero_gradients(&params)?;
        let forward_started = Instant::now();
        let outcome = forward_backward(&model, &mut group, &plan, &batch).map_err(|e| {
            step_failed(
                e,
                rank,
                format!("step {}", step + 1),
                TRAINING_OUT_OF_MEMORY,
            )
        })?;
        let reduce_started = Instant::now();
        phases.push(Phase::new(
            "forward_backward",
            forward_started,
            reduce_started,
        ));
        let all_reduce_s = all_reduce_gradients(&params, &mut group)?;
        phases.push(Phase::new("all_reduce", reduce_started, Instant::now()));

        // One small all-reduce carries the loss, whether a newer epoch was
        // seen or a rank was asked to stop, and every rank's figures (each
        // rank fills its own slots).
        const PER_RANK: usize = 5;
        const SHARED: usize = 2;
        let mut figures = vec![0f64; SHARED + PER_RANK * world as usize];
        figures[0] = outcome.loss_sum;
        let asked_to_stop = config
            .stop_asked
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
        figures[1] = match &config.epoch_watch {
            Some((mesh, epoch)) if crate::pod::mesh_is_newer(mesh, *epoch) => 1.0,
            _ if asked_to_stop => 1.0,
            _ => 0.0,
        };
        let slot = SHARED + PER_RANK * rank as usize;
        figures[slot] = outcome.times.attention_s;
        figures[slot + 1] = outcome.times.remap_s;
        figures[slot + 2] = all_reduce_s;
        figures[slot + 3] = outcome.linear_tokens as f64;
        figures[slot + 4] = outcome.times.total_s;
        let mut shared = Tensor::from_slice(&figures).f_to_device(device)?;
        group.all_reduce_sum(&mut shared)?;
        let shared = Vec::<f64>::try_from(&shared)?;
        let loss = shared[0] / outcome.predicted as f64;
        if !loss.is_finite() {
            return Err(TrainError::Diverged {
                step: step + 1,
                loss,
            });
        }
        let update_started = Instant::now();
        let update = optimizer.step()?;
        phases.push(Phase::new("optimizer", update_started, Instant::now()));
        let step_time_s = started.elapsed().as_secs_f64();

        // Any rank that saw a newer epoch, or was asked to stop, stops every
        // rank after this step.
        let stop_for_epoch = shared[1] > 0.0;
        let ranks = shared[SHARED..].chunks(PER_RANK);
        let max_of = |k: usize| ranks.clone().map(|r| r[k]).fold(0.0, f64::max);
        let linear: Vec<f64> = ranks.clone().map(|r| r[3]).collect();
        let mean_linear = linear.iter().sum::<f64>() / linear.len().max(1) as f64;
        let tokens = batch.tokens() as u64;
        let mut metrics = StepMetrics {
            step: step + 1,
            loss,
            tokens,
            sequences: batch.samples.len() as u64,
            step_time_s,
            tokens_per_s: tokens as f64 / step_time_s.max(1e-9),
            lr: update.lr,
            grad_norm: update.grad_norm,
            world,
            strategy: plan.strategy.clone(),
            micro_batches: plan.micro_batches.len() as u32,
            max_cp_degree: plan.sequences.iter().map(|s| s.degree).max().unwrap_or(1),
            hierarchical_rings: plan
                .micro_batches
                .iter()
                .flat_map(|m| &m.groups)
                .filter(|g| g.inner_ring > 0 && g.ranks.len() > 1)
                .count() as u32,
            spread_routes: plan.routes.iter().filter(|r| r.legs.len() > 1).count() as u32,
            stream_bp_chunk: plan
                .micro_batches
                .iter()
                .flat_map(|m| &m.groups)
                .map(|g| g.stream_bp_chunk)
                .filter(|chunk| *chunk > 0)
                .min(),
            streamed_rings: plan
                .micro_batches
                .iter()
                .flat_map(|m| &m.groups)
                .filter(|g| g.stream_bp_chunk > 0)
                .count() as u32,
            rings: plan
                .micro_batches
                .iter()
                .map(|m| m.groups.len() as u32)
                .sum(),
            balance: plan.predicted.max_over_mean,
            predicted_step_s: plan.predicted.step_time_s,
            token_balance: if mean_linear > 0.0 {
                linear.iter().copied().fold(0.0, f64::max) / mean_linear
            } else {
                1.0
            },
            forward_backward_s: max_of(4),
            attention_s: max_of(0),
            remap_s: max_of(1),
            all_reduce_s: max_of(2),
            plan_s,
            data_wait_s,
            data_tokens_per_s: batch.tokens() as f64 / draw_s.max(1e-9),
            checkpoint: None,
        };
        let done = step + 1;
        if let Some((dir, every)) = &config.plan_svg
            && rank == 0
            && done % every.max(&1) == 0
        {
            let note = (!config.hierarchical_rings).then_some(
                "Rings ran flat (--flat-rings); the times are those planned for the plan's hierarchical rings.",
            );
            draw_plan(rank, dir, done, &plan, note);
        }
        let due = config.checkpoint_every > 0 && done % config.checkpoint_every == 0;
        // Every rank knows a checkpoint is due (the epoch's stop is agreed):
        // rank 0 writes it while the others wait, however long it takes.
        let mut written = false;
        let mut saved = Ok(());
        if let Some(dir) = &config.checkpoint_dir
            && (due || done == config.steps || stop_for_epoch)
        {
            let saving = Instant::now();
            saved =
                save_while_peers_wait(rank, &mut group, device, || -> Result<(), TrainError> {
                    let state = CheckpointState {
                        step: done,
                        next_sample,
                        seed: config.seed,
                        model: config.model.clone(),
                        world,
                        data_order: config.data_order,
                        buckets: bucket_cursor,
                        corpus_digest: Some(data_identity.corpus_digest.clone()),
                        tokens_per_step: Some(config.tokens_per_step),
                        max_seq_len: Some(config.max_seq_len),
                        architecture: Some(config.architecture.clone()),
                    };
                    crate::checkpoint::check_finite(done, &params)?;
                    crate::checkpoint::check_finite(done, &optimizer.moments())?;
                    // Model, and both AdamW moments of the same size.
                    let tensor_bytes: u64 = params
                        .iter()
                        .map(|(_, p)| 3 * p.numel() as u64 * p.kind().elt_size_in_bytes() as u64)
                        .sum();
                    let request = SaveRequest {
                        root: dir,
                        state: &state,
                        keep: config.checkpoint_keep.max(1),
                        tensor_bytes,
                    };
                    crate::checkpoint::save(&request, |staging| {
                        match &config.hf_model {
                            // The model as the Hugging Face model it started from,
                            // which transformers loads from the checkpoint as it is.
                            Some((dir, hf)) => {
                                let out = staging.join(crate::checkpoint::HF_MODEL_DIR);
                                std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
                                crate::hf::write_model(
                                    &model,
                                    hf,
                                    Some(config.tokenizer_files(dir)),
                                    &out,
                                    crate::hf::SHARD_BYTES,
                                )
                                .map_err(|e| e.to_string())?;
                            }
                            None => vs
                                .save(staging.join(crate::checkpoint::MODEL_FILE))
                                .map_err(|e| e.to_string())?,
                        }
                        optimizer
                            .save(&staging.join(crate::checkpoint::OPTIMIZER_FILE))
                            .map_err(|e| e.to_string())
                    })?;
                    written = true;
                    Ok(())
                });
            phases.push(Phase::new("checkpoint", saving, Instant::now()));
        }
        if written {
            metrics.checkpoint = Some(done);
        }
        if let Some(trace) = &config.trace {
            use opentelemetry::KeyValue;
            trace.step(&StepSpans {
                step: done,
                start: started,
                end: Instant::now(),
                attributes: vec![
                    KeyValue::new("weft.loss", metrics.loss),
                    KeyValue::new("weft.tokens", metrics.tokens as i64),
                    KeyValue::new("weft.strategy", metrics.strategy.clone()),
                ],
                phases,
                work: &outcome.intervals,
            });
        }
        // A step whose checkpoint was written is done even when a peer was
        // lost while rank 0 wrote it (the next epoch resumes after it): it
        // is reported before the failure is.
        if let Err(e) = saved {
            if written && rank == 0 {
                report(&metrics);
            }
            return Err(e);
        }
        if rank == 0 {
            report(&metrics);
        }
        if stop_for_epoch && done < config.steps {
            group.barrier()?;
            return Ok(RunEnd::NewEpoch { step: done });
        }
    }
    // The trained model, as the Hugging Face model it started from, with
    // the tokenizer it was trained with.
    if let (Some(out), Some((dir, hf))) = (&config.save, &config.hf_model) {
        save_while_peers_wait(rank, &mut group, device, || {
            let tokenizer = config.tokenizer_files(dir);
            crate::hf::save(&model, hf, Some(tokenizer), out, crate::hf::SHARD_BYTES)
        })?;
        notice(
            rank,
            &format!("saved the trained model into {}", out.display()),
        );
    }
    // Nobody leaves while another rank may still need it (rank 0 serves the store).
    group.barrier()?;
    Ok(RunEnd::Finished)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_planner::plan::Group;

    /// A step that runs out of memory says what to change, on the GPU as
    /// on the host: libtorch's own refusal of an allocation the host cannot
    /// make, and the GPU's message, both become `OutOfMemory`; any other
    /// step error stays as it is.
    #[test]
    fn a_step_out_of_memory_says_what_to_change() {
        let refused = Tensor::f_zeros([1i64 << 50], (tch::Kind::Float, tch::Device::Cpu))
            .expect_err("no host has 4 PiB");
        let training =
            |err: StepError| step_failed(err, 3, "step 7".to_string(), TRAINING_OUT_OF_MEMORY);
        let err = training(StepError::Torch(refused));
        assert_eq!(err.category(), "out_of_memory", "{err}");
        let text = err.to_string();
        for part in [
            "rank 3 ran out of memory in step 7",
            "can't allocate memory",
            "--rank-tokens",
            "parallelism.maxCpDegree",
            "--stream-bp-chunk",
            "parallelism.streamBpChunkTokens",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        assert!(!text.contains('\n'), "one line: {text}");
        let gpu = tch::TchError::Torch(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB\nException raised from malloc"
                .to_string(),
        );
        let err = training(StepError::Torch(gpu));
        assert_eq!(err.category(), "out_of_memory");
        assert!(
            err.to_string()
                .contains("CUDA out of memory. Tried to allocate 2.00 GiB")
        );
        // An evaluation names the document and its own flags.
        let err = step_failed(
            StepError::Torch(tch::TchError::Torch("CUDA error: out of memory".into())),
            0,
            "document 2 (a.jsonl:2)".to_string(),
            EVALUATION_OUT_OF_MEMORY,
        );
        let text = err.to_string();
        assert!(
            text.contains("in document 2 (a.jsonl:2)") && text.contains("--ranks"),
            "{text}"
        );
        assert!(!text.contains("parallelism."), "{text}");
        // Other errors stay as they are: a collective's (even one that
        // mentions memory) and any other step's.
        let collective = training(StepError::Comm(CommError::Operation {
            operation: "all_gather",
            message: "peer said: CUDA out of memory".to_string(),
        }));
        assert_eq!(collective.category(), "collective", "{collective}");
        assert_eq!(
            training(StepError::NothingToPredict).category(),
            "data_config"
        );
        let memory_in_a_path = tch::TchError::Torch("no file /data/out of memory/x".into());
        assert_eq!(
            training(StepError::Torch(memory_in_a_path)).category(),
            "torch"
        );
    }

    /// With StreamBP on, the trainer plans with its memory: the same batch
    /// on the same GPUs gets fewer ranks for its long sequence, with weft
    /// (a batch of many short sequences, so balance asks little of the long
    /// one's ring) and with static.
    #[test]
    fn streambp_plans_fewer_ranks_per_long_sequence() {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let mut lengths = vec![40_000];
        lengths.extend((0..400).map(|i| 2_048 + 512 * (i % 5)));
        let widest = |strategy: Strategy, backprop: Backprop| {
            let planning = PlanSettings {
                backprop,
                ..PlanSettings::of(&model)
            };
            let ctx = local_plan_context(16, &planning).unwrap();
            assert_eq!(ctx.cost.coefficients.streambp, backprop.planned());
            let plan = weft_planner::plan_step(strategy, &ctx, &lengths, Some(40_000)).unwrap();
            plan.sequences.iter().map(|s| s.degree).max().unwrap()
        };
        let always = Backprop::Streamed { chunk_tokens: 4096 };
        for strategy in [Strategy::Weft, Strategy::Static] {
            let (plain, streamed) = (widest(strategy, Backprop::Plain), widest(strategy, always));
            eprintln!("{strategy:?}: max CP degree {plain} plain, {streamed} with StreamBP");
            assert!(
                streamed < plain,
                "{strategy:?}: max CP degree {plain} plain, {streamed} with StreamBP"
            );
        }
    }

    /// With StreamBP per ring, weft streams the ring that needs it and no
    /// other, and the step plan the engine follows says so: a long sequence
    /// that plain backprop's memory cannot hold on the two ranks the job
    /// allows streams, the short ones run plain.
    #[test]
    fn streambp_per_ring_streams_only_the_ring_that_needs_it() {
        let model = ModelSpec::preset("llama-7b").unwrap();
        let mut lengths = vec![40_000];
        lengths.extend((0..400).map(|i| 2_048 + 512 * (i % 5)));
        let planning = |backprop| PlanSettings {
            backprop,
            limits: PlanLimits {
                max_cp_degree: Some(2),
                offload_activations: false,
                ..Default::default()
            },
            ..PlanSettings::of(&model)
        };
        let plain = local_plan_context(16, &planning(Backprop::Plain)).unwrap();
        let refused = weft_planner::plan_step(Strategy::Weft, &plain, &lengths, None);
        assert!(
            refused.is_err(),
            "plain backprop holds 40K tokens on 2 ranks"
        );
        let per_ring = planning(Backprop::PerRing { chunk_tokens: 512 });
        let ctx = local_plan_context(16, &per_ring).unwrap();
        let plan = weft_planner::plan_step(Strategy::Weft, &ctx, &lengths, None).unwrap();
        plan.check().unwrap();
        let (long, short): (Vec<&Group>, Vec<&Group>) = plan
            .micro_batches
            .iter()
            .flat_map(|m| &m.groups)
            .partition(|g| g.sequences.contains(&0));
        assert_eq!(long.len(), 1);
        // The job's chunk times a power of two, as memory allows.
        let chunk = long[0].stream_bp_chunk;
        assert!(
            chunk >= 512 && chunk % 512 == 0 && (chunk / 512).is_power_of_two(),
            "{chunk}"
        );
        let plain_rings = short.iter().filter(|g| g.stream_bp_chunk == 0).count();
        assert!(
            plain_rings * 2 > short.len(),
            "{plain_rings} of {} short rings plain",
            short.len()
        );
        for rank in 0..16 {
            for mb in &plan.micro_batches {
                let chunk = plan.stream_bp_chunk(mb.index, rank);
                let its = mb.groups.iter().find(|g| g.ranks.contains(&rank));
                assert_eq!(chunk, its.map(|g| g.stream_bp_chunk).filter(|c| *c > 0));
            }
        }
    }
}
