//! The `TrainingJob` resource (`weft.dev/v1alpha1`, short name `tj`).
//!
//! An ML engineer writes the spec; the operator owns the status. Invariants that
//! can be checked on one object are enforced by the API server itself, through the
//! OpenAPI bounds and CEL rules generated from the attributes below, so a bad
//! object is refused at `kubectl apply` with a message that names the field.
//!
//! Every section but `workers` has defaults, so the smallest job is an image
//! and a worker range. What a running job cannot change is enforced the same
//! way (CEL transition rules): the model and data never; the image, the
//! resources, the command, arguments and environment only while suspended.
//!
//! The status is written by the operator and, for progress, by the job's own
//! workers: every time in it is held to the RFC 3339 form every reader of it
//! can parse (see [`crd`]), and its counters to what they can hold, so a
//! worker cannot write a value that no reader of the job can read.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{EnvVar, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a training job.
// Each printcolumn(...) repeats `type_ = ...`; clippy reads those as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    namespaced,
    shortname = "tj",
    category = "weft",
    status = "TrainingJobStatus",
    doc = "An elastic long-context training job run by weft",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.workersReadySummary",
        description = "ready/desired workers"
    ),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.meshEpoch"),
    printcolumn(name = "Step", type_ = "integer", json_path = ".status.step"),
    printcolumn(
        name = "Tokens/s",
        type_ = "number",
        json_path = ".status.tokensPerSecond"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[kube(validation = Rule::new("oldSelf.hasValue() || self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").optional_old_self(true).message("metadata.name must be lower-case letters, digits and '-', starting with a letter and ending with a letter or digit (it names the job's Service)"))]
#[kube(validation = Rule::new("(oldSelf.hasValue() && oldSelf.value().spec.workers.max == self.spec.workers.max) || size(self.metadata.name) + size(string(self.spec.workers.max - 1)) <= 55").optional_old_self(true).message("metadata.name is too long for workers.max: each worker is named <name>-worker-<index>, a host name of at most 63 characters, so the name may have at most 55 characters less the digits of workers.max - 1"))]
#[x_kube(validation = Rule::new("self.model == oldSelf.model").message("spec.model cannot change once the job exists: its checkpoints hold this model"))]
#[x_kube(validation = Rule::new("self.data == oldSelf.data").message("spec.data cannot change once the job exists: the order of samples depends on it"))]
#[x_kube(validation = Rule::new("oldSelf.suspend || (self.image == oldSelf.image && self.resources == oldSelf.resources)").message("spec.image and spec.resources can change only while the job is suspended"))]
#[x_kube(validation = Rule::new("oldSelf.suspend || ((has(self.command) ? self.command : []) == (has(oldSelf.command) ? oldSelf.command : []) && (has(self.args) ? self.args : []) == (has(oldSelf.args) ? oldSelf.args : []) && (has(self.env) ? self.env : []) == (has(oldSelf.env) ? oldSelf.env : []))").message("spec.command, spec.args and spec.env can change only while the job is suspended: every worker of a mesh runs with the same ones"))]
#[x_kube(validation = Rule::new("oldSelf.suspend || (has(self.volumes) ? self.volumes : []) == (has(oldSelf.volumes) ? oldSelf.volumes : [])").message("spec.volumes can change only while the job is suspended: every worker of a mesh mounts the same ones"))]
#[x_kube(validation = Rule::new("!has(self.model.output) || (has(self.checkpoint.claimName) && self.model.output.startsWith(self.checkpoint.path + '/')) || (has(self.volumes) && self.volumes.exists(v, !(has(v.readOnly) && v.readOnly) && self.model.output.startsWith(v.mountPath + '/')))").message("model.output must be inside a volume every worker mounts and may write: under a volumes[].mountPath that is not readOnly, or under checkpoint.path with a checkpoint.claimName (the pod that runs rank 0 writes it)"))]
#[x_kube(validation = Rule::new("!has(self.volumes) || self.volumes.all(v, v.mountPath != self.checkpoint.path && v.mountPath != '/etc/weft/mesh')").message("volumes: a mountPath must not be checkpoint.path (the checkpoint volume is mounted there) nor /etc/weft/mesh (the mesh)"))]
#[x_kube(validation = Rule::new("!has(self.parallelism.cpDegree) || self.parallelism.cpDegree <= self.workers.min * (self.resources.gpus > 0 ? self.resources.gpus : 1)").message("parallelism.cpDegree must not be greater than the ranks of workers.min workers (workers.min × resources.gpus; one rank a worker on CPU): the job may shrink to workers.min, and every ring of Static context parallelism has cpDegree ranks"))]
#[x_kube(validation = Rule::new("!has(self.parallelism.streamBpChunkTokens) || self.parallelism.streamBpChunkTokens <= self.data.maxSequenceLength").message("parallelism.streamBpChunkTokens must not be greater than data.maxSequenceLength (a chunk is part of one sequence)"))]
pub struct TrainingJobSpec {
    /// Container image of the weft trainer.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub command: Option<Vec<String>>,
    /// Overrides the image's arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub args: Option<Vec<String>>,
    /// Extra environment variables of every worker. Names starting with
    /// `WEFT_` are weft's own and are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = Rule::new("self.all(e, !e.name.startsWith('WEFT_'))").message("env: names starting with WEFT_ are set by weft itself"))]
    pub env: Vec<EnvVar>,
    /// PersistentVolumeClaims mounted into every worker: where the model
    /// checkpoint, the data and the trained model live.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self.all(v, self.exists_one(w, w.mountPath == v.mountPath))").message("volumes: two volumes are mounted at the same mountPath"))]
    pub volumes: Vec<VolumeMountSpec>,
    /// How many workers (one pod each) the job may run with.
    pub workers: WorkerRange,
    /// What each worker asks for.
    #[serde(default)]
    pub resources: WorkerResources,
    /// The model to train.
    #[serde(default)]
    pub model: ModelSpec,
    /// The training data.
    #[serde(default)]
    pub data: DataSpec,
    /// How sequences are spread over the GPUs.
    #[serde(default)]
    pub parallelism: ParallelismSpec,
    /// Where and how often training state is saved.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    /// How the job reacts to lost and added capacity.
    #[serde(default)]
    pub elasticity: ElasticitySpec,
    /// Where the workers may run.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    /// A suspended job runs no workers; setting it back to false resumes from the
    /// last checkpoint. (The semantics Kueue expects of `suspend`.)
    #[serde(default)]
    pub suspend: bool,
}

impl TrainingJobSpec {
    /// A spec with every section at its default.
    pub fn new(image: impl Into<String>, min_workers: i32, max_workers: i32) -> Self {
        TrainingJobSpec {
            image: image.into(),
            command: None,
            args: None,
            env: Vec::new(),
            volumes: Vec::new(),
            workers: WorkerRange {
                min: min_workers,
                max: max_workers,
            },
            resources: WorkerResources::default(),
            model: ModelSpec::default(),
            data: DataSpec::default(),
            parallelism: ParallelismSpec::default(),
            checkpoint: CheckpointSpec::default(),
            elasticity: ElasticitySpec::default(),
            scheduling: SchedulingSpec::default(),
            suspend: false,
        }
    }

    /// `workers.min` and `workers.max`, as counts (the schema keeps both
    /// at least 1; a negative value stored before it reads as 0).
    pub fn workers_asked(&self) -> (u32, u32) {
        let count = |n: i32| u32::try_from(n).unwrap_or(0);
        (count(self.workers.min), count(self.workers.max))
    }

    /// `resources.gpus`: each worker's GPUs (0: a CPU worker of one rank).
    pub fn gpus_per_worker(&self) -> u32 {
        u32::try_from(self.resources.gpus).unwrap_or(0)
    }

    /// `elasticity.rescaleCooldownSeconds`.
    pub fn rescale_cooldown(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            u64::try_from(self.elasticity.rescale_cooldown_seconds).unwrap_or(0),
        )
    }

    /// `elasticity.stallTimeoutSeconds`, when set (the schema keeps it at
    /// least 10 s; a value stored before reads as at least 1 s).
    pub fn stall_timeout_s(&self) -> Option<i64> {
        self.elasticity
            .stall_timeout_seconds
            .map(|s| i64::from(s.max(1)))
    }

    /// `elasticity.unschedulableTimeoutSeconds`, at least 1 s.
    pub fn unschedulable_timeout_s(&self) -> i64 {
        i64::from(self.elasticity.unschedulable_timeout_seconds.max(1))
    }

    /// The fewest workers the job runs with: `workers.min`, or more where
    /// `parallelism.cpDegree` needs more ranks than that many workers have
    /// (admission refuses such a spec; one stored before that rule waits
    /// for enough workers rather than start a mesh its rings cannot span).
    pub fn least_workers(&self) -> u32 {
        let min = self.workers_asked().0;
        let ranks_per_worker = self.gpus_per_worker().max(1);
        let for_degree = self
            .parallelism
            .cp_degree
            .map_or(0, |d| (d.max(0) as u32).div_ceil(ranks_per_worker));
        min.max(for_degree)
    }

    /// Why no mesh of this spec can run until it is changed, where the
    /// schema's rules could not say (a spec stored before them): it needs
    /// more workers than `workers.max`.
    pub fn gang_problem(&self) -> Option<String> {
        let (min, max) = self.workers_asked();
        let least = self.least_workers();
        if least <= max {
            return None;
        }
        Some(match self.parallelism.cp_degree.filter(|_| least > min) {
            Some(degree) => {
                let workers = match self.resources.gpus {
                    gpus if gpus > 0 => format!("{least} workers of {gpus} GPUs"),
                    _ => format!("{least} CPU workers (one rank each)"),
                };
                format!(
                    "parallelism.cpDegree {degree} needs {workers}, more than workers.max ({max})"
                )
            }
            None => format!("workers.min ({min}) is greater than workers.max ({max})"),
        })
    }
}

/// A PersistentVolumeClaim mounted into every worker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMountSpec {
    /// The claim, in the job's namespace (ReadOnlyMany or ReadWriteMany when
    /// workers share nodes' storage).
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// Where it is mounted in every worker.
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && (self == '/' || !self.endsWith('/'))").message("volumes[].mountPath must be an absolute path, without a trailing '/'"))]
    #[x_kube(validation = Rule::new("self != '/' && !['/dev', '/proc', '/sys', '/etc/weft'].exists(p, self == p || self.startsWith(p + '/'))").message("volumes[].mountPath must not be /, nor under /dev, /proc, /sys or /etc/weft (the worker's system and weft's own mounts)"))]
    pub mount_path: String,
    /// Mounted read-only (a model or data nobody should change).
    #[serde(default)]
    pub read_only: bool,
}

/// Bounds on the size of the worker gang.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.min <= self.max").message("workers.min must not be greater than workers.max"))]
pub struct WorkerRange {
    /// The job starts only once this many workers can all be placed, and waits
    /// whenever fewer are healthy.
    #[schemars(range(min = 1, max = 65536))]
    pub min: i32,
    /// The job grows up to this many workers when capacity allows.
    #[schemars(range(min = 1, max = 65536))]
    pub max: i32,
}

/// Resources of one worker pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerResources {
    /// GPUs (`nvidia.com/gpu`) per worker; 0 runs on CPU.
    #[schemars(range(min = 0, max = 64))]
    #[serde(default = "default_gpus")]
    pub gpus: i32,
    /// CPU request per worker, as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("resources.cpu must be a positive Kubernetes quantity, such as 8 or 500m"))]
    pub cpu: Option<String>,
    /// Memory request per worker, as a Kubernetes quantity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message("resources.memory must be a positive Kubernetes quantity, such as 64Gi"))]
    pub memory: Option<String>,
}

fn default_gpus() -> i32 {
    8
}

impl Default for WorkerResources {
    fn default() -> Self {
        WorkerResources {
            gpus: default_gpus(),
            cpu: None,
            memory: None,
        }
    }
}

/// Model presets the trainer and planner both know (sizes in
/// `weft_planner::model::ModelSpec::preset`, with their sources).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModelPreset {
    /// Two layers, hidden 64: trains on a CPU in seconds.
    #[default]
    #[serde(rename = "tiny")]
    Tiny,
    #[serde(rename = "llama-7b")]
    Llama7b,
    #[serde(rename = "llama-13b")]
    Llama13b,
    #[serde(rename = "llama-70b")]
    Llama70b,
}

impl ModelPreset {
    /// The preset's name, as the planner and trainer spell it.
    pub fn name(self) -> &'static str {
        match self {
            ModelPreset::Tiny => "tiny",
            ModelPreset::Llama7b => "llama-7b",
            ModelPreset::Llama13b => "llama-13b",
            ModelPreset::Llama70b => "llama-70b",
        }
    }
}

/// The model: a named preset, every dimension given explicitly, or a
/// Hugging Face checkpoint to start from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.checkpoint) ? !(has(self.preset) || has(self.layers) || has(self.hidden) || has(self.heads) || has(self.kvHeads) || has(self.ffn) || has(self.vocab)) : has(self.preset) ? !(has(self.layers) || has(self.hidden) || has(self.heads) || has(self.kvHeads) || has(self.ffn) || has(self.vocab)) : (has(self.layers) && has(self.hidden) && has(self.heads) && has(self.kvHeads) && has(self.ffn) && has(self.vocab))").message("model: give one of a preset, all of layers, hidden, heads, kvHeads, ffn and vocab, or a checkpoint (whose config.json gives the shapes)"))]
#[x_kube(validation = Rule::new("!has(self.rope) || has(self.checkpoint)").message("model.rope changes the rotary settings of a checkpoint: it needs model.checkpoint"))]
#[x_kube(validation = Rule::new("!has(self.output) || has(self.checkpoint)").message("model.output writes the trained model as a Hugging Face model: it needs model.checkpoint"))]
#[x_kube(validation = Rule::new("!has(self.heads) || !has(self.kvHeads) || self.heads % self.kvHeads == 0").message("model.heads must be a multiple of model.kvHeads (grouped-query attention)"))]
#[x_kube(validation = Rule::new("!has(self.hidden) || !has(self.heads) || (self.hidden % self.heads == 0 && (self.hidden / self.heads) % 2 == 0)").message("model.hidden must be model.heads times an even head dimension (RoPE rotates pairs)"))]
pub struct ModelSpec {
    /// A named model: `tiny`, `llama-7b`, `llama-13b` or `llama-70b`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<ModelPreset>,
    /// Decoder layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub layers: Option<i32>,
    /// Hidden size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 65536))]
    pub hidden: Option<i32>,
    /// Attention (query) heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub heads: Option<i32>,
    /// Key/value heads (grouped-query attention); equal to `heads` for plain
    /// multi-head attention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub kv_heads: Option<i32>,
    /// SwiGLU intermediate size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub ffn: Option<i32>,
    /// Vocabulary size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 4194304))]
    pub vocab: Option<i32>,
    /// A Hugging Face model directory inside the workers (on one of
    /// `volumes`, for instance): `config.json`, safetensors weights (one
    /// file or shards with their index) and `tokenizer.json` of a
    /// `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
    /// Training starts from its weights; its config gives the shapes, and
    /// its tokenizer reads the documents unless `data.tokenizer` names
    /// another. Checked by the workers before they train: what they refuse
    /// fails the job, named in its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("model.checkpoint must be an absolute path inside the workers"))]
    pub checkpoint: Option<String>,
    /// New rotary settings for the checkpoint, as context extension sets
    /// them (a larger `theta`, or `yarn` with a factor); the checkpoint's
    /// own when absent. The saved model's `config.json` carries them, with
    /// `max_position_embeddings` raised to `data.maxSequenceLength`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope: Option<RopeSpec>,
    /// A directory the trained model is written into after the last step,
    /// as a Hugging Face model (safetensors shards, `config.json`, the
    /// tokenizer's files) that `transformers` loads unchanged. It must not
    /// exist yet; name a path on a volume every worker mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("model.output must be an absolute path inside the workers"))]
    pub output: Option<String>,
}

/// Kinds of rotary position embedding (as `transformers` names them).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RopeType {
    /// Plain rotary embedding at `theta`.
    #[default]
    #[serde(rename = "default")]
    Default,
    /// Positions divided by `factor` (position interpolation).
    #[serde(rename = "linear")]
    Linear,
    /// Dynamic NTK scaling: a sequence longer than the checkpoint's
    /// `max_position_embeddings` rotates with a base grown with its length.
    #[serde(rename = "dynamic")]
    Dynamic,
    /// Llama 3.1's frequency-dependent scaling.
    #[serde(rename = "llama3")]
    Llama3,
    /// YaRN (Peng et al., 2023).
    #[serde(rename = "yarn")]
    Yarn,
}

impl RopeType {
    pub fn name(self) -> &'static str {
        match self {
            RopeType::Default => "default",
            RopeType::Linear => "linear",
            RopeType::Dynamic => "dynamic",
            RopeType::Llama3 => "llama3",
            RopeType::Yarn => "yarn",
        }
    }
}

/// Rotary settings, in the terms of `config.json`'s `rope_parameters`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'default' ? !has(self.factor) : has(self.factor)").message("model.rope.factor is required with the linear, dynamic, llama3 and yarn types, and only with them"))]
#[x_kube(validation = Rule::new("self.type == 'llama3' || !(has(self.lowFreqFactor) || has(self.highFreqFactor))").message("model.rope.lowFreqFactor and highFreqFactor belong to the llama3 type"))]
#[x_kube(validation = Rule::new("self.type == 'yarn' || !(has(self.betaFast) || has(self.betaSlow) || has(self.mscale) || has(self.mscaleAllDim) || has(self.attentionFactor) || has(self.truncate))").message("model.rope.betaFast, betaSlow, mscale, mscaleAllDim, attentionFactor and truncate belong to the yarn type"))]
#[x_kube(validation = Rule::new("!(self.type == 'default' || self.type == 'linear' || self.type == 'dynamic') || !has(self.originalMaxPositionEmbeddings)").message("model.rope.originalMaxPositionEmbeddings belongs to the llama3 and yarn types"))]
#[x_kube(validation = Rule::new("self.type != 'llama3' || (has(self.lowFreqFactor) && has(self.highFreqFactor) && self.highFreqFactor > self.lowFreqFactor)").message("model.rope of type llama3 needs lowFreqFactor and a greater highFreqFactor"))]
#[x_kube(validation = Rule::new("has(self.mscale) == has(self.mscaleAllDim) && !(has(self.mscale) && has(self.attentionFactor))").message("model.rope.mscale and mscaleAllDim set the attention factor together (give both or neither), and not beside attentionFactor"))]
pub struct RopeSpec {
    /// `default`, `linear`, `dynamic`, `llama3` or `yarn`.
    #[serde(rename = "type", default)]
    pub rope_type: RopeType,
    /// The base of the rotary frequencies (`rope_theta`); the checkpoint's
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0))]
    pub theta: Option<f64>,
    /// How many times longer the context becomes (`factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 65536.0))]
    pub factor: Option<f64>,
    /// The context the checkpoint was trained for; its
    /// `max_position_embeddings` when absent (llama3, yarn; dynamic scales
    /// past `max_position_embeddings` itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub original_max_position_embeddings: Option<i64>,
    /// llama3: wavelengths longer than the original context over this are scaled fully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.lowFreqFactor must be greater than 0"))]
    pub low_freq_factor: Option<f64>,
    /// llama3: wavelengths shorter than the original context over this are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.highFreqFactor must be greater than 0"))]
    pub high_freq_factor: Option<f64>,
    /// yarn: rotations above which a dimension is kept (`beta_fast`, 32 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.betaFast must be greater than 0"))]
    pub beta_fast: Option<f64>,
    /// yarn: rotations below which a dimension is interpolated (`beta_slow`, 1 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.betaSlow must be greater than 0"))]
    pub beta_slow: Option<f64>,
    /// yarn: `mscale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.mscale must be greater than 0"))]
    pub mscale: Option<f64>,
    /// yarn: `mscale_all_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.mscaleAllDim must be greater than 0"))]
    pub mscale_all_dim: Option<f64>,
    /// yarn: the attention scale (`attention_factor`); from the factor when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self > 0.0").message("model.rope.attentionFactor must be greater than 0"))]
    pub attention_factor: Option<f64>,
    /// yarn: whether the correction range is rounded to whole dimensions
    /// (`truncate`, true by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

impl RopeSpec {
    /// These settings as `config.json`'s `rope_parameters` spells them.
    pub fn rope_parameters(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut out = serde_json::Map::new();
        out.insert("rope_type".into(), self.rope_type.name().into());
        let numbers = [
            ("rope_theta", self.theta),
            ("factor", self.factor),
            (
                "original_max_position_embeddings",
                self.original_max_position_embeddings.map(|n| n as f64),
            ),
            ("low_freq_factor", self.low_freq_factor),
            ("high_freq_factor", self.high_freq_factor),
            ("beta_fast", self.beta_fast),
            ("beta_slow", self.beta_slow),
            ("mscale", self.mscale),
            ("mscale_all_dim", self.mscale_all_dim),
            ("attention_factor", self.attention_factor),
        ];
        for (key, value) in numbers {
            if let Some(value) = value {
                let value = if key == "original_max_position_embeddings" {
                    serde_json::Value::from(value as i64)
                } else {
                    serde_json::Value::from(value)
                };
                out.insert(key.into(), value);
            }
        }
        if let Some(truncate) = self.truncate {
            out.insert("truncate".into(), truncate.into());
        }
        out
    }
}

impl Default for ModelSpec {
    fn default() -> Self {
        ModelSpec {
            preset: Some(ModelPreset::Tiny),
            layers: None,
            hidden: None,
            heads: None,
            kv_heads: None,
            ffn: None,
            vocab: None,
            checkpoint: None,
            rope: None,
            output: None,
        }
    }
}

/// The training data.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.source != 'builtin:python-reference' || ((!has(self.format) || self.format == 'Auto') && (!has(self.textField) || self.textField == 'text'))").message("data.format and data.textField read a data.source directory: the built-in corpus is read as it is built in"))]
#[x_kube(validation = Rule::new("!has(self.format) || self.format != 'Text' || !has(self.textField) || self.textField == 'text'").message("data.textField names the field of JSON lines and the column of Parquet rows: data.format Text reads whole files"))]
#[x_kube(validation = Rule::new("self.tokensPerStep >= self.maxSequenceLength").message("data.tokensPerStep must be at least data.maxSequenceLength (a step holds at least one whole sequence)"))]
#[x_kube(validation = Rule::new("self.order != 'Decomposed' || self.maxSequenceLength in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216]").message("data.order Decomposed needs data.maxSequenceLength to be a power of two (the longest bucket)"))]
#[x_kube(validation = Rule::new("self.order != 'Decomposed' || (self.minBucketLength in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216] && self.minBucketLength <= self.maxSequenceLength)").message("data.minBucketLength must be a power of two no larger than data.maxSequenceLength"))]
pub struct DataSpec {
    /// A directory of text or JSONL files inside the worker (an absolute
    /// path, typically on a volume), or `builtin:python-reference` for the
    /// corpus that ships in the trainer image.
    #[serde(default = "default_data_source")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/') || self == 'builtin:python-reference'").message("data.source must be an absolute path inside the worker or builtin:python-reference"))]
    pub source: String,
    /// Documents longer than this are cut; shorter ones are kept whole.
    #[serde(default = "default_max_sequence_length")]
    #[schemars(range(min = 1, max = 16777216))]
    pub max_sequence_length: i64,
    /// Tokens in one global training step, over all workers.
    #[serde(default = "default_tokens_per_step")]
    #[schemars(range(min = 1, max = 1099511627776_i64))]
    pub tokens_per_step: i64,
    /// How the global batches are drawn from the documents.
    #[serde(default)]
    pub order: DataOrder,
    /// `Decomposed`: the shortest bucket, in tokens (a power of two); the
    /// longest is `maxSequenceLength`.
    #[serde(default = "default_min_bucket_length")]
    #[schemars(range(min = 1, max = 16777216))]
    pub min_bucket_length: i64,
    /// `Decomposed`: steps of one curriculum cycle, from the shortest bucket
    /// to the longest.
    #[serde(default = "default_curriculum_steps")]
    #[schemars(range(min = 1, max = 1000000))]
    pub curriculum_steps: i64,
    /// Which files of `source` are read, and how.
    #[serde(default, skip_serializing_if = "is_default")]
    pub format: DataFormat,
    /// The field of each JSON line, and the column of each Parquet row,
    /// that holds its document.
    #[serde(
        default = "default_text_field",
        skip_serializing_if = "is_default_text_field"
    )]
    #[schemars(length(min = 1, max = 256))]
    pub text_field: String,
    /// The documents' tokenizer, inside the workers: a `tokenizer.json`, or
    /// a directory holding one (documents are closed by the
    /// end-of-sequence token its `config.json` or `tokenizer_config.json`
    /// names). Default: the `model.checkpoint`'s own, else weft's byte
    /// tokenizer. The sequence lengths the planner sees are its token
    /// counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("data.tokenizer must be an absolute path inside the workers"))]
    pub tokenizer: Option<String>,
}

/// Which files of a data source are read, and how (the trainer's
/// `--data-format`, by [`DataFormat::name`]).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DataFormat {
    /// Each file by its extension: `.txt` and `.md` a document each,
    /// `.jsonl` a document per line, `.parquet` a document per row; other
    /// files are not read.
    #[default]
    Auto,
    /// Only `.txt` and `.md` files, a document each.
    Text,
    /// Only `.jsonl` files, a document per non-empty line (its `textField`).
    #[cfg_attr(feature = "clap", value(name = "jsonl"))]
    JsonLines,
    /// Only `.parquet` files, a document per row (its `textField` column, a string).
    Parquet,
}

impl DataFormat {
    /// The trainer's name of the format (`--data-format`).
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Text => "text",
            DataFormat::JsonLines => "jsonl",
            DataFormat::Parquet => "parquet",
        }
    }
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// The field of a JSON line or Parquet row that holds its document, unless
/// the job names another.
pub const DEFAULT_TEXT_FIELD: &str = "text";

fn default_text_field() -> String {
    DEFAULT_TEXT_FIELD.to_string()
}

fn is_default_text_field(field: &String) -> bool {
    field == DEFAULT_TEXT_FIELD
}

/// How the global batches are drawn. Either way the order depends on the
/// seed and the corpus only, never on the number of workers (the trainer's
/// `--data-order`, in lower case).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum DataOrder {
    /// Whole documents (cut at `maxSequenceLength`) in a seeded order, as
    /// many as fit a step.
    #[default]
    Documents,
    /// Dataset Decomposition (Pouransari et al., NeurIPS'24): every document
    /// cut into power-of-two chunks from `minBucketLength` to
    /// `maxSequenceLength` (both powers of two), each step all from one
    /// bucket, buckets visited short to long in cycles of `curriculumSteps`.
    Decomposed,
}

fn default_min_bucket_length() -> i64 {
    256
}

fn default_curriculum_steps() -> i64 {
    64
}

fn default_data_source() -> String {
    "builtin:python-reference".to_string()
}

fn default_max_sequence_length() -> i64 {
    32768
}

fn default_tokens_per_step() -> i64 {
    1 << 20
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            source: default_data_source(),
            max_sequence_length: default_max_sequence_length(),
            tokens_per_step: default_tokens_per_step(),
            order: DataOrder::default(),
            min_bucket_length: default_min_bucket_length(),
            curriculum_steps: default_curriculum_steps(),
            format: DataFormat::default(),
            text_field: default_text_field(),
            tokenizer: None,
        }
    }
}

/// How context parallelism is chosen.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ContextParallelism {
    /// Every step, each sequence gets the context-parallel degree that fits
    /// it best (weft's planner).
    #[default]
    Adaptive,
    /// One fixed degree for every sequence (the Megatron-LM way); needs
    /// `cpDegree`.
    Static,
}

/// How sequences are spread over the GPUs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.contextParallelism == 'Static' ? has(self.cpDegree) : !has(self.cpDegree)").message("parallelism.cpDegree is required with contextParallelism Static, and only then"))]
#[x_kube(validation = Rule::new("!has(self.cpDegree) || !has(self.maxCpDegree) || self.cpDegree <= self.maxCpDegree").message("parallelism.cpDegree must not be greater than parallelism.maxCpDegree"))]
pub struct ParallelismSpec {
    #[serde(default)]
    pub context_parallelism: ContextParallelism,
    /// The fixed degree of `Static` context parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub cp_degree: Option<i32>,
    /// The largest context-parallel group a sequence may get; unbounded when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_cp_degree: Option<i32>,
    /// Split a sequence inside a node before going across nodes, and run a
    /// ring that spans nodes hierarchically (round each node over NVLink
    /// first, then one hop between nodes per round on every GPU's NIC).
    #[serde(default = "yes")]
    pub hierarchical: bool,
    /// Spread inter-node transfers over every NIC by GPU affinity.
    #[serde(default = "yes")]
    pub nic_aware_routing: bool,
    /// StreamBP: backpropagate along the sequence in chunks of at least this
    /// many tokens (less activation memory, one more forward; each streamed
    /// rank takes this times the largest power of two that costs it no more
    /// memory, as fewer chunks are faster), on the rings the
    /// planner chooses: with the weft strategy, those where it is faster
    /// than the wider ring plain backprop needs, or where only StreamBP
    /// fits (each step plan records which); the other strategies stream
    /// every ring. Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16777216))]
    pub stream_bp_chunk_tokens: Option<i64>,
}

fn yes() -> bool {
    true
}

impl Default for ParallelismSpec {
    fn default() -> Self {
        ParallelismSpec {
            context_parallelism: ContextParallelism::Adaptive,
            cp_degree: None,
            max_cp_degree: None,
            hierarchical: true,
            nic_aware_routing: true,
            stream_bp_chunk_tokens: None,
        }
    }
}

/// Where and how often training state is saved.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Directory of checkpoints inside every worker.
    #[serde(default = "default_checkpoint_path")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("checkpoint.path must be an absolute path"))]
    pub path: String,
    /// A PersistentVolumeClaim (ReadWriteMany) mounted at `path` in every
    /// worker, so checkpoints outlive any pod. Without one, `path` is an
    /// emptyDir of each pod: rank 0's pod holds the checkpoints and sends
    /// the one it resumes from to the other ranks; when rank 0's pod is
    /// lost, or a new mesh puts rank 0 in another pod, the job starts again
    /// from step 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// Steps between checkpoints.
    #[serde(default = "default_checkpoint_interval")]
    #[schemars(range(min = 1, max = 100000000))]
    pub interval_steps: i32,
    /// How many complete checkpoints are kept.
    #[serde(default = "default_checkpoint_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,
}

fn default_checkpoint_path() -> String {
    "/var/lib/weft/checkpoints".to_string()
}

fn default_checkpoint_interval() -> i32 {
    500
}

fn default_checkpoint_keep() -> i32 {
    3
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        CheckpointSpec {
            path: default_checkpoint_path(),
            claim_name: None,
            interval_steps: default_checkpoint_interval(),
            keep: default_checkpoint_keep(),
        }
    }
}

/// How the job reacts to lost and added capacity.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ElasticitySpec {
    /// Worker failures (a pod that fails, not a node that is lost) the job
    /// survives over its whole life; one more fails the job. The count is
    /// kept in the status and never resets.
    #[serde(default = "default_restart_limit")]
    #[schemars(range(min = 0, max = 10000))]
    pub restart_limit: i32,
    /// After a membership change, the job waits this long before it grows
    /// into new capacity (shrinking on a loss never waits).
    #[serde(default = "default_rescale_cooldown")]
    #[schemars(range(min = 0, max = 86400))]
    pub rescale_cooldown_seconds: i32,
    /// A worker the scheduler cannot place on its node for this long (the
    /// node lacks memory or CPU the mesh cannot see, a taint, ...) gives the
    /// node up: the job avoids it for `AVOID_NODE_SECONDS` (5 minutes) and
    /// places the worker elsewhere, or shrinks, instead of waiting for ever.
    #[serde(default = "default_unschedulable_timeout")]
    #[schemars(range(min = 1, max = 86400))]
    pub unschedulable_timeout_seconds: i32,
    /// A running job (all its workers run) whose workers report no training
    /// step for this long (since the last step, the last membership change,
    /// the start or the workers all being ready, whichever is latest; step
    /// times are by the workers' clocks) gets the `Stalled` condition, until
    /// a step is reported. Unset: no `Stalled` condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 604800))]
    pub stall_timeout_seconds: Option<i32>,
}

fn default_unschedulable_timeout() -> i32 {
    60
}

/// The exit code of a worker that refuses the job's settings (sysexits'
/// `EX_CONFIG`): a model directory it cannot read, rotary settings it cannot
/// compute, data it cannot parse. The operator fails the job at once with the
/// worker's message, which names the field, instead of restarting it.
pub const SETTINGS_REFUSED_EXIT: i32 = 78;

/// How long a job avoids a node where one of its workers could not be scheduled.
pub const AVOID_NODE_SECONDS: i64 = 300;

/// The largest mesh epoch: an integer every JSON reader holds exactly, far
/// beyond any real job's count of membership changes.
pub const MAX_MESH_EPOCH: i64 = (1 << 53) - 1;

fn default_restart_limit() -> i32 {
    5
}

fn default_rescale_cooldown() -> i32 {
    60
}

impl Default for ElasticitySpec {
    fn default() -> Self {
        ElasticitySpec {
            restart_limit: default_restart_limit(),
            rescale_cooldown_seconds: default_rescale_cooldown(),
            unschedulable_timeout_seconds: default_unschedulable_timeout(),
            stall_timeout_seconds: None,
        }
    }
}

/// Where the workers may run.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// The scheduler that binds the worker pods (e.g. a gang scheduler);
    /// the cluster's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,
    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// Only nodes with all these labels are used.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(length(max = 64))]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the worker pods (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// The node label that names a rack: workers are packed into as few
    /// distinct values of it as possible, and ring neighbours share one.
    #[serde(default = "default_topology_key")]
    #[schemars(length(min = 1, max = 317))]
    pub topology_key: String,
}

fn default_topology_key() -> String {
    crate::topology::LABEL_RACK.to_string()
}

impl Default for SchedulingSpec {
    fn default() -> Self {
        SchedulingSpec {
            scheduler_name: None,
            priority_class_name: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            topology_key: default_topology_key(),
        }
    }
}

/// Where a job is in its life.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// Accepted, waiting for enough capacity to start `workers.min` workers.
    #[default]
    Pending,
    /// Workers are placed and rendezvousing.
    Starting,
    /// Training.
    Running,
    /// Membership changed; workers are moving to a new mesh epoch.
    Rescaling,
    /// `spec.suspend` is true; no workers run.
    Suspended,
    /// Finished; GPUs released.
    Succeeded,
    /// Gave up; `conditions` says why.
    Failed,
}

/// Observed state of a training job, written by the operator and, for
/// progress (`step`, `tokensPerSecond`, `lastStepTime`, `stepSeconds`,
/// `epochFirstStep`, `lastCheckpoint`), by the job's workers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Standard conditions, with reasons and messages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// Workers the current mesh wants.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub workers_desired: i32,
    /// Workers running and ready.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub workers_ready: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready_summary: Option<String>,
    /// Bumped at every membership change (never past [`MAX_MESH_EPOCH`]).
    #[serde(default)]
    #[schemars(range(min = 0, max = MAX_MESH_EPOCH))]
    pub mesh_epoch: i64,
    /// Last training step reported by the workers.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub step: i64,
    /// Training throughput reported by the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// When the workers last reported a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step_time: Option<Time>,
    /// Seconds a step took, on average since the report before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub step_seconds: Option<f64>,
    /// The first step the workers trained in their current mesh epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_first_step: Option<EpochFirstStep>,
    /// When the job's first training step was reported (by the operator,
    /// from the workers' reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_step_time: Option<Time>,
    /// Seconds from `startTime` to the first training step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub time_to_first_step_seconds: Option<i64>,
    /// The last membership change (or resume) the workers have trained
    /// past: seconds from the operator publishing its mesh epoch, and from
    /// the fault that caused it, to the epoch's first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery: Option<Recovery>,
    /// Useful training time over wall time, as of the last reported step:
    /// the steps kept (`step`, which goes back to the checkpoint a restart
    /// resumes from) times `stepSeconds`, over the time from `startTime` to
    /// `lastStepTime` (suspended time included), at most 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub goodput: Option<f64>,
    /// The last complete checkpoint the workers reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointRecord>,
    /// Worker failures counted against `elasticity.restartLimit`, over the
    /// job's whole life (never reset).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub restarts: i32,
    /// The most recent worker failures, newest last (at most 16).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent_failures: Vec<WorkerFailure>,
    /// When the job's first workers were created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// When the mesh epoch last changed; growth waits for
    /// `elasticity.rescaleCooldownSeconds` after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rescale_time: Option<Time>,
    /// When the fault behind the last membership change began, as the
    /// cluster recorded it: the earliest of a departed worker's node turning
    /// NotReady, its container's failure, and its pod's deletion. Absent when
    /// no fault caused the change (growth, a resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fault_time: Option<Time>,
    /// Nodes the job avoids for now: one of its workers could not be
    /// scheduled there (see `elasticity.unschedulableTimeoutSeconds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoided_nodes: Vec<AvoidedNode>,
}

/// A node a job avoids, and why.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AvoidedNode {
    pub node: String,
    /// What the scheduler said about the worker it could not place there.
    pub reason: String,
    /// Since when; the node is tried again `AVOID_NODE_SECONDS` later.
    pub since: Time,
}

/// The first training step of a mesh epoch, as its workers report it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EpochFirstStep {
    #[schemars(range(min = 0, max = MAX_MESH_EPOCH))]
    pub mesh_epoch: i64,
    /// Its step number: 1 for the job's first, more for a run that resumed.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub step: i64,
    pub time: Time,
}

/// How long a membership change kept the job from training.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Recovery {
    /// The mesh epoch the change published.
    #[schemars(range(min = 0, max = MAX_MESH_EPOCH))]
    pub mesh_epoch: i64,
    /// From its publication to its first training step.
    #[schemars(range(min = 0))]
    pub seconds: i64,
    /// From the fault that caused the change (`lastFaultTime`: a node
    /// NotReady, a worker failed or deleted) to the first training step of
    /// the new epoch: the time the job lost to it. Absent when no fault
    /// caused the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub from_fault_seconds: Option<i64>,
}

/// A complete checkpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointRecord {
    #[schemars(range(min = 0))]
    pub step: i64,
    pub path: String,
    pub time: Time,
}

/// One counted worker failure.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkerFailure {
    /// The worker pod.
    pub worker: String,
    /// The pod's UID: a failure is counted once per pod.
    pub uid: String,
    /// Why it failed (container reason and exit code, or the pod's reason).
    pub reason: String,
    pub time: Time,
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn crd_names_and_columns() {
        let crd = TrainingJob::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("trainingjobs.weft.dev"));
        assert_eq!(crd.spec.names.short_names, Some(vec!["tj".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Ready", "Epoch", "Step", "Tokens/s", "Age"]
        );
    }

    #[test]
    fn schema_carries_the_cel_rules() {
        let json = serde_json::to_string(&TrainingJob::crd()).unwrap();
        assert!(json.contains("self.min <= self.max"));
        assert!(json.contains("workers.min must not be greater than workers.max"));
    }

    #[test]
    fn spec_defaults_fill_in() {
        let spec: TrainingJobSpec =
            serde_json::from_str(r#"{"image":"weft:dev","workers":{"min":1,"max":2}}"#).unwrap();
        assert_eq!(spec.resources.gpus, 8);
        assert!(!spec.suspend);
        assert_eq!(spec, TrainingJobSpec::new("weft:dev", 1, 2));
        assert_eq!(spec.model.preset, Some(ModelPreset::Tiny));
        assert_eq!(spec.elasticity.restart_limit, 5);
        assert_eq!(spec.scheduling.topology_key, crate::topology::LABEL_RACK);
    }

    #[test]
    fn schema_carries_defaults_for_the_api_server_to_apply() {
        let crd = serde_json::to_value(TrainingJob::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let data = &spec["properties"]["data"]["properties"];
        assert_eq!(data["maxSequenceLength"]["default"], 32768);
        assert_eq!(
            spec["properties"]["elasticity"]["properties"]["rescaleCooldownSeconds"]["default"],
            60
        );
    }

    #[test]
    fn schema_carries_the_immutability_rules() {
        let json = serde_json::to_string(&TrainingJob::crd()).unwrap();
        for rule in [
            "self.model == oldSelf.model",
            "self.data == oldSelf.data",
            "oldSelf.suspend || (self.image == oldSelf.image",
            "self.heads % self.kvHeads == 0",
        ] {
            assert!(json.contains(rule), "missing rule {rule}");
        }
    }

    #[test]
    fn counts_are_read_as_counts_whatever_was_stored() {
        let mut spec = TrainingJobSpec::new("weft:dev", 2, 6);
        spec.resources.gpus = 8;
        spec.elasticity.rescale_cooldown_seconds = 90;
        spec.elasticity.unschedulable_timeout_seconds = 120;
        assert_eq!(spec.workers_asked(), (2, 6));
        assert_eq!(spec.gpus_per_worker(), 8);
        assert_eq!(spec.rescale_cooldown(), std::time::Duration::from_secs(90));
        assert_eq!(spec.unschedulable_timeout_s(), 120);
        // Values the schema refuses, stored before it did: none below 0,
        // and a timeout of at least a second.
        spec.workers = WorkerRange { min: -1, max: -3 };
        spec.resources.gpus = -8;
        spec.elasticity.rescale_cooldown_seconds = -5;
        spec.elasticity.unschedulable_timeout_seconds = 0;
        assert_eq!(spec.workers_asked(), (0, 0));
        assert_eq!(spec.gpus_per_worker(), 0);
        assert_eq!(spec.rescale_cooldown(), std::time::Duration::ZERO);
        assert_eq!(spec.unschedulable_timeout_s(), 1);
    }

    #[test]
    fn the_least_workers_give_a_static_ring_its_ranks() {
        let mut spec = TrainingJobSpec::new("weft:dev", 1, 8);
        assert_eq!(spec.least_workers(), 1);
        // 8 GPUs a worker: a ring of 16 needs two workers, one of 8 needs one.
        spec.parallelism.cp_degree = Some(16);
        assert_eq!(spec.least_workers(), 2);
        spec.parallelism.cp_degree = Some(8);
        assert_eq!(spec.least_workers(), 1);
        // A CPU worker is one rank.
        spec.resources.gpus = 0;
        spec.parallelism.cp_degree = Some(3);
        assert_eq!(spec.least_workers(), 3);
        // workers.min above what the degree needs stays the least.
        spec.workers.min = 5;
        assert_eq!(spec.least_workers(), 5);
        assert_eq!(spec.gang_problem(), None);
        // A degree no mesh up to workers.max can hold.
        spec.parallelism.cp_degree = Some(12);
        assert_eq!(
            spec.gang_problem().as_deref(),
            Some(
                "parallelism.cpDegree 12 needs 12 CPU workers (one rank each), more than workers.max (8)"
            )
        );
        spec.parallelism.cp_degree = None;
        spec.workers.min = 9;
        assert_eq!(
            spec.gang_problem().as_deref(),
            Some("workers.min (9) is greater than workers.max (8)")
        );
        let json = serde_json::to_string(&TrainingJob::crd()).unwrap();
        assert!(json.contains("self.parallelism.cpDegree <= self.workers.min * "));
    }

    #[test]
    fn model_presets_round_trip_by_name() {
        for preset in [
            ModelPreset::Tiny,
            ModelPreset::Llama7b,
            ModelPreset::Llama13b,
            ModelPreset::Llama70b,
        ] {
            let json = serde_json::to_string(&preset).unwrap();
            assert_eq!(json, format!("\"{}\"", preset.name()));
        }
    }
}
