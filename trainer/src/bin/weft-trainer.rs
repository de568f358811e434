//! `weft-trainer`: the worker binary.
//!
//! `weft-trainer local --ranks N` trains a small model on N local worker
//! processes of this binary (the code path a pod runs): a progress display
//! on the terminal, one JSON object per step in `--metrics FILE`.
//!
//! `weft-trainer selfcheck --ranks N` starts N local workers of this binary,
//! runs random cases through the distributed attention over the real
//! collectives, compares every rank's part with plain attention computed whole,
//! prints the worst error per component, and exits non-zero past the
//! tolerance or when a worker fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};
use weft_crds::DataFormat;
use weft_planner::Strategy;
use weft_trainer::comm::CommError;
use weft_trainer::decompose::DataOrder;
use weft_trainer::device::{Collectives, CollectivesChoice, ComputeDevice, DeviceChoice};
use weft_trainer::launch::{PEER_LOST_EXIT, run_local};
use weft_trainer::model::Precision;
use weft_trainer::optim::AdamWConfig;
use weft_trainer::selfcheck::{CheckSpec, SelfcheckReport, run_worker};
use weft_trainer::step::{Backprop, StepError};
use weft_trainer::train::{StepMetrics, TrainConfig, TrainError};

#[derive(Parser)]
#[command(name = "weft-trainer", version, about = "weft's trainer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What a training run is asked to do (shared by `local` and its workers).
/// Its defaults are the flags' (clap's) alone: a worker is handed the
/// whole value as JSON, every field written (a missing one is refused, but
/// for the optional ones, which are then unset), and `eval` reads its
/// settings through the flags.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
struct TrainArgs {
    /// Steps to train.
    #[arg(long, default_value_t = 50)]
    steps: u64,
    #[command(flatten)]
    #[serde(flatten)]
    run: RunArgs,
    /// Corpus: a directory of .txt/.md files (a document each) and .jsonl files
    /// (a document per line, its "text" field), or builtin:python-reference.
    /// Default: builtin:python-reference, the corpus of trainer/corpus built
    /// into this binary (so it trains wherever it is copied, images included).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The field of each JSONL line, and the column of each Parquet row,
    /// that holds its document.
    #[arg(long, default_value = weft_trainer::data::DEFAULT_TEXT_FIELD, value_name = "NAME")]
    text_field: String,
    /// Which files of --data are read, and how: auto (each by its
    /// extension: .txt and .md a document each, .jsonl a document per
    /// line, .parquet a document per row), or only the files of one
    /// format: text, jsonl or parquet.
    #[arg(long, value_enum, default_value_t = DataFormat::Auto, hide_possible_values = true)]
    data_format: DataFormat,
    /// The documents' tokenizer: a tokenizer.json, or a directory holding
    /// one (documents are closed by the end-of-sequence token named by its
    /// directory's config.json or tokenizer_config.json). Default: a
    /// Hugging Face --model's own, else weft's byte tokenizer.
    #[arg(long, value_name = "PATH")]
    tokenizer: Option<PathBuf>,
    /// Model: a preset (tiny, llama-7b, llama-13b, llama-70b), a YAML/JSON
    /// file with layers, hidden, heads, kv_heads, ffn, vocab, or a Hugging
    /// Face model directory (config.json, safetensors weights and
    /// tokenizer.json: a Llama, Mistral or Qwen2 model), whose weights the
    /// run starts from and whose tokenizer it reads the documents with.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// With a Hugging Face --model: write the trained model into this new
    /// directory after the last step, as a Hugging Face model (safetensors
    /// shards, config.json and the tokenizer's files).
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// With a Hugging Face --model: replace its rotary settings, as context
    /// extension does. A JSON object in config.json's rope_parameters form,
    /// e.g. '{"rope_type": "yarn", "factor": 4.0}' or '{"rope_theta":
    /// 1000000}' (rope_theta is the model's unless given; llama3's and
    /// yarn's original_max_position_embeddings is the model's
    /// max_position_embeddings). The saved model's config.json carries it,
    /// with max_position_embeddings raised to --max-seq-len (but for
    /// dynamic, which scales past max_position_embeddings as it is).
    #[arg(long, value_name = "JSON")]
    rope: Option<String>,
    /// Evaluate instead of training (set by `eval`).
    #[arg(skip)]
    eval: bool,
    /// A model with every dimension given (from the operator's
    /// training.json); takes the place of `model` when set.
    #[arg(skip)]
    model_spec: Option<weft_planner::model::ModelSpec>,
    /// Tokens of each step's global batch (whole documents).
    #[arg(long, default_value_t = 4096)]
    tokens_per_step: usize,
    /// Longer documents are cut to this many tokens.
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// How batches are drawn: `documents` (whole documents in a seeded order)
    /// or `decomposed` (Dataset Decomposition: every document cut into
    /// power-of-two chunks, each step all from one bucket, buckets visited
    /// short to long; --max-seq-len is the longest bucket and must be a power
    /// of two).
    #[arg(long, value_enum, default_value_t = weft_crds::DataOrder::Documents, hide_possible_values = true)]
    data_order: weft_crds::DataOrder,
    /// Decomposed: the shortest bucket, in tokens (a power of two); shorter
    /// leftovers of a document are not used.
    #[arg(long, default_value_t = 64)]
    bucket_min: usize,
    /// Decomposed: steps of one curriculum cycle (short to long).
    #[arg(long, default_value_t = 16)]
    curriculum_steps: usize,
    /// Planning strategy (hdp-offload plans activation offloading, which
    /// the engine does not do: refused).
    #[arg(long, value_enum, default_value_t = Strategy::Weft)]
    strategy: Strategy,
    /// Static: the one context-parallel degree of every ring (the job's
    /// parallelism.cpDegree); default: static sizes it for --max-seq-len.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    cp_degree: Option<u32>,
    /// The largest ring any sequence may get (weft and static; the job's
    /// parallelism.maxCpDegree).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_cp_degree: Option<u32>,
    /// Each rank's transfers between nodes take its own NIC, not spread over
    /// every NIC of its node (the job's parallelism.nicAwareRouting: false).
    #[arg(long)]
    no_nic_routing: bool,
    /// Run every ring flat, also those the plan makes hierarchical (round
    /// each node first, then across nodes).
    #[arg(long)]
    flat_rings: bool,
    /// Directory of the checkpoints (model, optimizer, data cursor), one
    /// directory per step.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every K steps (and after the last); 0: only after the last.
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Complete checkpoints kept (one directory per step); the oldest go.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_keep: u64,
    /// Continue from the newest intact checkpoint in --checkpoint-dir, on any
    /// number of ranks, with exactly the next batch.
    #[arg(long)]
    resume: bool,

    /// Fault injection: RANK:STEP makes that rank fail at the start of that step.
    #[arg(long, hide = true)]
    fail_at: Option<String>,
    /// Fault injection: RANK:STEP makes that rank plan that step otherwise
    /// than the others.
    #[arg(long, hide = true)]
    misplan_at: Option<String>,
}

/// `--format` of a command's report: a table for people, or JSON.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Report {
    Table,
    Json,
}

/// `--stream-bp`: which rings stream their backward.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum StreamBpWhere {
    PerRing,
    Always,
}

impl RunArgs {
    /// How the run backpropagates.
    fn backprop(&self) -> anyhow::Result<Backprop> {
        Ok(match (self.stream_bp_chunk, self.stream_bp) {
            (None, Some(StreamBpWhere::Always)) => {
                bail!("--stream-bp always needs --stream-bp-chunk TOKENS")
            }
            (None, Some(StreamBpWhere::PerRing)) => {
                bail!("--stream-bp per-ring needs --stream-bp-chunk TOKENS")
            }
            (None, None) => Backprop::Plain,
            (Some(chunk_tokens), None | Some(StreamBpWhere::PerRing)) => {
                Backprop::PerRing { chunk_tokens }
            }
            (Some(chunk_tokens), Some(StreamBpWhere::Always)) => {
                Backprop::Streamed { chunk_tokens }
            }
        })
    }
}

/// The settings of a run that `local` and a pod's `worker` both take.
#[derive(Args, Serialize, Deserialize, Clone, Debug)]
struct RunArgs {
    /// Seed of the model's initialisation and of the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rate (linear warm-up, then cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 5)]
    warmup_steps: u64,
    /// Largest global gradient norm.
    #[arg(long, default_value_t = 1.0)]
    clip_norm: f64,
    /// Most tokens one rank holds in plain backprop (a streamed rank holds
    /// as many as fit the memory these take); longer sequences are split
    /// over several ranks (context parallelism). Default: what the memory
    /// model allows.
    #[arg(long)]
    rank_tokens: Option<u64>,
    /// Seconds a collective may wait for a peer before failing.
    #[arg(long, default_value_t = 120)]
    collective_timeout_s: u64,
    /// Where each rank computes: cpu (collectives over Gloo), cuda (one GPU
    /// per rank, collectives over NCCL; needs the full CUDA libtorch), or
    /// auto: cuda where it can run, else cpu.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto, hide_possible_values = true)]
    device: DeviceChoice,
    /// Library of the collectives: gloo (host memory; GPU tensors are staged
    /// through it, so ranks may share GPUs), nccl (a GPU per rank), or auto:
    /// nccl on cuda when every rank of a machine has a GPU of its own, else
    /// gloo.
    #[arg(long, value_enum, default_value_t = CollectivesChoice::Auto, hide_possible_values = true)]
    collectives: CollectivesChoice,
    /// Number format: fp32, or bf16 (mixed precision: bf16 products and
    /// activations, fp32 weights, gradients and optimizer state). Default:
    /// fp32 on cpu, bf16 on cuda.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Plan at the speeds this profile measured (`weft-trainer profile`'s
    /// JSON) instead of the datasheets'.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// StreamBP: backpropagate each layer in chunks of at least this many
    /// tokens along the sequence, keeping only the layers' inputs from the
    /// forward (exact; less activation memory, one more forward of
    /// compute). Each streamed rank takes this times the largest power of
    /// two that costs it no more memory (fewer chunks are faster), as the
    /// step plan records. In a pod, the job's parallelism.streamBpChunkTokens.
    #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
    stream_bp_chunk: Option<u64>,
    /// With --stream-bp-chunk, which rings stream: per-ring (weft streams
    /// the rings where that is faster than the wider ring plain backprop
    /// needs, or where only StreamBP fits, and the step plan records it; the
    /// other strategies stream every ring; the default) or always (every
    /// ring).
    #[arg(long, value_enum, value_name = "WHERE")]
    stream_bp: Option<StreamBpWhere>,
    /// When resuming: accept a seed, corpus, tokens per step or longest
    /// sequence other than the checkpoint's (the batches then change);
    /// without it such a resume is refused.
    #[arg(long)]
    accept_data_change: bool,
    /// Draw the plan each step ran as a picture (SVG, as `weft plan --svg`
    /// draws it) into this directory: `step-00000012.svg`. In a pod, the
    /// first worker (it runs rank 0) draws, into its own file system: name
    /// a mounted volume, the checkpoint volume for instance.
    #[arg(long, value_name = "DIR")]
    plan_svg: Option<PathBuf>,
    /// With --plan-svg: draw every Nth step only.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), requires = "plan_svg")]
    plan_svg_every: u64,
}

impl TrainArgs {
    /// These settings with the device and collectives chosen for
    /// `local_ranks` ranks on each machine, as every rank must then use them.
    fn settled(&self, local_ranks: u32) -> anyhow::Result<TrainArgs> {
        let device = ComputeDevice::choose(self.run.device);
        let collectives = Collectives::choose(self.run.collectives, device, local_ranks)?;
        let mut settled = self.clone();
        settled.run.device = device.into();
        settled.run.collectives = collectives.into();
        Ok(settled)
    }

    fn config(&self, threads: i32) -> anyhow::Result<TrainConfig> {
        let hf_dir = Path::new(&self.model);
        let mut hf = (self.model_spec.is_none() && hf_dir.join("config.json").is_file())
            .then(|| weft_trainer::hf::read_config(hf_dir))
            .transpose()?;
        if let Some(text) = &self.rope {
            let Some(model) = &hf else {
                bail!(
                    "--rope changes a Hugging Face model's rotary settings: it needs --model to name a Hugging Face model directory"
                );
            };
            let rope: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                .map_err(|e| anyhow::anyhow!("--rope: not a JSON object ({e}): {text}"))?;
            hf = Some(weft_trainer::hf::with_rope(
                model,
                &rope,
                self.max_seq_len as u64,
            )?);
        }
        let model = match (&self.model_spec, &hf) {
            (Some(spec), _) => spec.clone(),
            (None, Some(hf)) => hf.spec.clone(),
            (None, None) => weft_planner::input::load_model(&self.model)?,
        };
        let tokenizer = match (&self.tokenizer, &hf) {
            (Some(path), _) => weft_trainer::hf::tokenizer_at(path)
                .with_context(|| format!("--tokenizer {}", path.display()))?,
            (None, Some(hf)) => weft_trainer::hf::tokenizer(hf_dir, hf)?,
            (None, None) => weft_trainer::data::Tokenizer::Bytes,
        };
        let needed = tokenizer.vocab_size();
        if model.vocab < needed {
            let which = match &self.tokenizer {
                Some(path) => format!("the tokenizer {}", path.display()),
                None => "the byte tokenizer".to_string(),
            };
            bail!(
                "model {} has a vocabulary of {}, but {which} makes tokens up to {}",
                model.name,
                model.vocab,
                needed - 1
            );
        }
        let builtin = self
            .data
            .as_deref()
            .is_none_or(|d| d.to_str() == Some(weft_trainer::data::BUILTIN_CORPUS));
        if builtin && self.text_field != weft_trainer::data::DEFAULT_TEXT_FIELD {
            bail!(
                "--text-field {}: the built-in corpus keeps its documents in \"text\"; name a --data directory whose JSONL lines or Parquet rows hold {0:?}",
                self.text_field
            );
        }
        let data_format = self.data_format;
        if data_format == DataFormat::Text
            && self.text_field != weft_trainer::data::DEFAULT_TEXT_FIELD
        {
            bail!(
                "--text-field {}: it names the field of JSON lines and the column of Parquet rows, and --data-format text reads whole files",
                self.text_field
            );
        }
        if builtin && data_format != DataFormat::Auto {
            bail!(
                "--data-format {}: the built-in corpus is read as it is built in; name a --data directory",
                data_format.name()
            );
        }
        if let Some(out) = &self.save {
            if hf.is_none() {
                bail!(
                    "--save writes a Hugging Face model: it needs --model to name a Hugging Face model directory"
                );
            }
            weft_trainer::hf::probe_save(out).with_context(|| "--save".to_string())?;
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        // A sample of one token predicts nothing.
        if self.max_seq_len < 2 {
            bail!(
                "--max-seq-len must be at least 2 (a sequence predicts each token from the ones before it), got {}",
                self.max_seq_len
            );
        }
        if self.tokens_per_step < self.max_seq_len {
            bail!(
                "--tokens-per-step ({}) must hold at least one sequence of --max-seq-len ({})",
                self.tokens_per_step,
                self.max_seq_len
            );
        }
        if let Some(tokens) = self.run.rank_tokens
            && tokens < 2
        {
            bail!(
                "--rank-tokens must be at least 2 (a rank's share of a ring is two chunks), got {tokens}"
            );
        }
        if let Some(dir) = &self.run.plan_svg {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("--plan-svg: cannot create the directory {}", dir.display())
            })?;
            let probe = dir.join(format!(".weft-probe-{}", std::process::id()));
            std::fs::write(&probe, b"")
                .with_context(|| format!("--plan-svg: cannot write into {}", dir.display()))?;
            let _ = std::fs::remove_file(&probe);
        }
        if self.run.collective_timeout_s == 0 {
            bail!("--collective-timeout-s must be at least 1");
        }
        // A fault injection's RANK:STEP.
        let rank_and_step = |flag: &str, text: &Option<String>| -> anyhow::Result<_> {
            let Some(text) = text else { return Ok(None) };
            let parsed = text
                .split_once(':')
                .and_then(|(r, s)| Some((r.parse().ok()?, s.parse().ok()?)));
            Ok(Some(parsed.with_context(|| {
                format!("--{flag} {text:?} is not RANK:STEP")
            })?))
        };
        let fail_at = rank_and_step("fail-at", &self.fail_at)?;
        let misplan_at = rank_and_step("misplan-at", &self.misplan_at)?;
        let data_order = match self.data_order {
            weft_crds::DataOrder::Documents => DataOrder::Documents,
            weft_crds::DataOrder::Decomposed => {
                if !self.bucket_min.is_power_of_two() || self.bucket_min > self.max_seq_len {
                    bail!(
                        "--bucket-min {} must be a power of two no larger than --max-seq-len {}",
                        self.bucket_min,
                        self.max_seq_len
                    );
                }
                if !self.max_seq_len.is_power_of_two() {
                    bail!(
                        "--data-order decomposed needs --max-seq-len to be a power of two (the longest bucket), got {}",
                        self.max_seq_len
                    );
                }
                if self.curriculum_steps == 0 {
                    bail!("--curriculum-steps must be at least 1");
                }
                DataOrder::Decomposed {
                    min_length: self.bucket_min,
                    cycle_steps: self.curriculum_steps,
                }
            }
        };
        if let Some(chunk) = self.run.stream_bp_chunk
            && chunk > self.max_seq_len as u64
        {
            bail!(
                "--stream-bp-chunk {chunk} is longer than the longest sequence allowed (--max-seq-len {})",
                self.max_seq_len
            );
        }
        let strategy = self.strategy;
        if strategy == Strategy::HdpOffload {
            bail!(
                "--strategy hdp-offload plans offloading activations to host memory, which the engine does not do; --strategy hdp plans the same without it"
            );
        }
        if self.cp_degree.is_some() && strategy != Strategy::Static {
            bail!(
                "--cp-degree is the degree of static context parallelism: it needs --strategy static (weft chooses each sequence's degree; cap it with --max-cp-degree)"
            );
        }
        if let (Some(degree), Some(most)) = (self.cp_degree, self.max_cp_degree)
            && degree > most
        {
            bail!("--cp-degree {degree} must not be greater than --max-cp-degree {most}");
        }
        let device = ComputeDevice::choose(self.run.device);
        // Refused here, before any worker starts, where it cannot run.
        device.check()?;
        // `auto` is settled by the launcher, which knows how many ranks share
        // the machine ([`TrainArgs::settled`]); a rank alone here has a GPU.
        let collectives = Collectives::choose(self.run.collectives, device, 1)?;
        Ok(TrainConfig {
            architecture: hf
                .as_ref()
                .map(|hf| hf.architecture.clone())
                .unwrap_or_default(),
            hf_model: hf.clone().map(|hf| (hf_dir.to_path_buf(), hf)),
            tokenizer,
            save: self.save.clone(),
            eval: self.eval,
            text_field: self.text_field.clone(),
            data_format,
            data: self.data.clone().unwrap_or_else(default_corpus),
            data_order,
            model,
            steps: self.steps,
            seed: self.run.seed,
            tokens_per_step: self.tokens_per_step,
            max_seq_len: self.max_seq_len,
            strategy,
            hierarchical_rings: !self.flat_rings,
            limits: weft_planner::PlanLimits {
                cp_degree: self.cp_degree,
                max_cp_degree: self.max_cp_degree,
                nic_aware_routing: !self.no_nic_routing,
                // The engine keeps activations on its device.
                offload_activations: false,
            },
            backprop: self.run.backprop()?,
            rank_tokens: self.run.rank_tokens,
            optimizer: self.run.optimizer()?,
            precision: self
                .run
                .precision
                .unwrap_or_else(|| device.default_precision()),
            device,
            collectives,
            profile: match &self.run.profile {
                Some(path) => Some(weft_planner::input::load_profile(&path.to_string_lossy())?),
                None => None,
            },
            threads,
            timeout: Duration::from_secs(self.run.collective_timeout_s),
            checkpoint_dir: self.checkpoint_dir.clone(),
            checkpoint_every: self.checkpoint_every,
            checkpoint_keep: self.checkpoint_keep.max(1) as usize,
            resume: self.resume,
            accept_data_change: self.run.accept_data_change,
            fail_at,
            misplan_at,
            epoch_watch: None,
            stop_asked: None,
            starting: None,
            trace: None,
            plan_svg: self
                .run
                .plan_svg
                .clone()
                .map(|dir| (dir, self.run.plan_svg_every.max(1))),
        })
    }
}

impl RunArgs {
    /// The optimizer's settings, refused by flag name when they cannot
    /// train (NaN and infinities included: they do not survive the JSON a
    /// worker is started with).
    fn optimizer(&self) -> anyhow::Result<AdamWConfig> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
            bail!(
                "--clip-norm must be a positive number, got {}",
                self.clip_norm
            );
        }
        let config = AdamWConfig {
            lr: self.lr,
            warmup_steps: self.warmup_steps,
            clip_norm: self.clip_norm,
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }
}

/// The corpus that ships with weft, built into the binary.
fn default_corpus() -> PathBuf {
    PathBuf::from(weft_trainer::data::BUILTIN_CORPUS)
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Plain backprop, per-layer gradient checkpointing and StreamBP on one
    /// rank: each one's measured peak memory at --seq-len, the longest
    /// sequence whose step stays within --budget-gib (found by measuring),
    /// and seconds per token; beside them, the planner's predicted memory.
    Memory {
        /// Model: a preset or a YAML/JSON file; default a 0.2B-parameter
        /// Llama shape (12 layers of 1024, GQA 16/4, SwiGLU 2816, vocabulary 32000).
        #[arg(long)]
        model: Option<String>,
        /// Length of the sequence each method's peak and speed are measured at.
        #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(2..))]
        seq_len: u64,
        /// Memory a step may use beyond the model's states, GiB.
        #[arg(long, default_value_t = 2.0)]
        budget_gib: f64,
        /// StreamBP's chunk, tokens.
        #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
        stream_bp_chunk: u64,
        #[arg(long, value_enum, default_value_t = Precision::Fp32)]
        precision: Precision,
        /// libtorch threads (default: every core).
        #[arg(long)]
        threads: Option<i32>,
        /// Longest length tried in the search.
        #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(2..))]
        max_len: u64,
        /// The search stops within this share of the longest length.
        #[arg(long, default_value_t = 0.05)]
        resolution: f64,
        /// Methods to run, comma-separated (no spaces).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "plain,checkpointing,streambp"
        )]
        methods: Vec<weft_trainer::membench::Method>,
        #[arg(long, value_enum, default_value_t = Report::Table)]
        format: Report,
    },
    /// One measured step in a process of its own (started by `bench memory`).
    #[command(hide = true)]
    MemoryProbe {
        /// The step (JSON).
        #[arg(long)]
        config: String,
    },
    /// Reading a Hugging Face model and its tokenizer: seconds and the peak
    /// memory of loading the weights (fp32 on the CPU), and tokens per
    /// second of the model's tokenizer and of the byte tokenizer over a
    /// corpus on one thread. JSON on standard output.
    HfLoad(ModelAndCorpus),
    /// Tokens per second per device and model FLOPs utilisation at given
    /// tokens per device (one document of that length on each device every
    /// step), for weft's engine (`local`: planned rings, StreamBP, the
    /// all-reduce) and for the plain path beside it (one process, the
    /// model's own forward and backward with libtorch's attention); with
    /// the engine's, the planner's predicted forward and backward against
    /// the measured. Every run in a process of its own; one that runs out
    /// of memory is reported as such.
    Throughput(ThroughputArgs),
    /// One run of the plain path (started by `bench throughput`).
    #[command(hide = true)]
    ThroughputPlain {
        /// The run (JSON).
        #[arg(long)]
        config: String,
    },
}

/// The settings of `bench throughput`.
#[derive(Args, Debug)]
struct ThroughputArgs {
    /// Model: a preset or a YAML/JSON file.
    #[arg(long, default_value = "tiny")]
    model: String,
    /// Tokens each device trains on per step, comma-separated (no spaces):
    /// one document of that length per device.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8192,32768,131072",
        value_parser = clap::value_parser!(u64).range(2..)
    )]
    tokens_per_device: Vec<u64>,
    /// Which paths run, comma-separated (no spaces).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "engine,plain"
    )]
    paths: Vec<weft_trainer::throughput::RunPath>,
    /// The engine's ranks (local worker processes). With more ranks than
    /// devices (more than one on the CPU) they share them, and each holds
    /// its share of a device's document (a ring over the ranks).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    ranks: u32,
    /// Most tokens one of the engine's ranks may hold (default: a device's
    /// document split over the ranks that share the device, or the
    /// planner's memory model where each rank has its own).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    rank_tokens: Option<u64>,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Number format (default: the device's, bf16 on GPUs, fp32 on the CPU).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Steps timed, after the warm-up.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    steps: u64,
    /// Steps run first and not timed.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    warmup: u64,
    /// The engine streams its backward (StreamBP) in chunks of this many
    /// tokens on the rings its planner chooses (`local --stream-bp-chunk`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    stream_bp_chunk: Option<u64>,
    /// The engine plans with this device profile (`weft-trainer profile`):
    /// its predicted step is then at the measured speeds.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// MFU against this GPU preset's datasheet peak (dense bf16: h100,
    /// a100-80g, h200).
    #[arg(long, conflicts_with = "peak_tflops")]
    gpu: Option<String>,
    /// MFU against this peak, TFLOP/s per device.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Seconds before one run is stopped.
    #[arg(long, default_value_t = 1800)]
    timeout_s: u64,
    #[arg(long, value_enum, default_value_t = Report::Table)]
    format: Report,
    /// Also write the report as JSON into this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// The next-token loss of a Hugging Face model on every document of a
    /// corpus, on the distributed engine over N local worker processes: each
    /// document alone from position 0, read with the model's tokenizer and
    /// cut at --max-seq-len (a document longer than a rank holds is split
    /// over ranks as training splits it).
    Eval(EvalArgs),
    /// Train on N local worker processes (the embedded default job).
    Local {
        /// Local worker processes.
        #[arg(long, default_value_t = 2)]
        ranks: u32,
        /// Write one JSON object per step to this file.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Seconds before the workers are stopped.
        #[arg(long, default_value_t = 3600)]
        timeout_s: u64,
        #[command(flatten)]
        train: Box<TrainArgs>,
    },
    /// The worker of a TrainingJob's pod (its image's command): finds itself
    /// in the mesh the operator publishes, runs one rank per GPU, and follows
    /// the mesh from epoch to epoch, resuming from the last checkpoint.
    Worker {
        /// Steps to train in all; the pod succeeds after the last.
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        #[command(flatten)]
        run: RunArgs,
        /// Seconds a failed rank waits for a new mesh epoch before the pod fails.
        #[arg(long, default_value_t = 120)]
        epoch_wait_s: u64,
        /// Write the trained model into this new directory after the last
        /// step, as a Hugging Face model (the job's model.output, which
        /// this may repeat but not contradict; the job must start from a
        /// model.checkpoint). The pod that runs rank 0 writes it: name a
        /// volume every worker mounts.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
        /// The Hugging Face model directory the job starts from: the job's
        /// model.checkpoint, which this may repeat but not contradict (a
        /// pod trains its job's model).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
    },
    /// One training worker (started by `local` and `worker`).
    #[command(hide = true)]
    TrainWorker {
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        world: u32,
        #[arg(long)]
        port: u16,
        /// Host of the rendezvous store (rank 0 serves it).
        #[arg(long, default_value = "127.0.0.1")]
        store_host: String,
        /// Address this rank's collectives bind to.
        #[arg(long, default_value = "127.0.0.1")]
        bind_host: String,
        /// In a pod: the mesh file to watch, and the epoch this run belongs to.
        #[arg(long, requires = "epoch")]
        watch_mesh: Option<PathBuf>,
        #[arg(long)]
        epoch: Option<u64>,
        #[arg(long)]
        threads: i32,
        /// This rank's index among the ranks of its machine or pod (which
        /// GPU it uses); default: its rank, as on one machine.
        #[arg(long)]
        local_rank: Option<u32>,
        /// The run's settings, as JSON.
        #[arg(long)]
        config: String,
    },
    /// Measure this device's compute and link speeds, as the planner's cost
    /// model counts them, and write them as a profile (JSON) for `weft plan
    /// --profile` and `--profile` here.
    Profile {
        /// Model whose training step is timed.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Number format.
        #[arg(long, value_enum, default_value_t = Precision::Fp32)]
        precision: Precision,
        /// Tokens of the timed batch.
        #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(2..))]
        tokens: u64,
        /// Tokens of each of its documents.
        #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..))]
        document_length: u64,
        /// Timed steps (after one untimed).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        steps: u32,
        /// libtorch threads (default: every core).
        #[arg(long)]
        threads: Option<i32>,
        /// Where the steps run: cpu, cuda (GPU 0; the link is then measured
        /// between GPUs 0 and 1 over NCCL when there are two), or auto.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto, hide_possible_values = true)]
        device: DeviceChoice,
        /// Write the profile here (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Time steps with StreamBP in chunks of this many tokens (at most
        /// --document-length).
        #[arg(long, value_name = "TOKENS", value_parser = clap::value_parser!(u64).range(1..))]
        stream_bp_chunk: Option<u64>,
    },
    /// Benchmarks that measure the engine on this machine and print figures.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
    /// Check distributed attention, the remap and a training step on N local ranks against a single-process reference.
    Selfcheck {
        /// Local worker processes (at least 2).
        #[arg(long)]
        ranks: u32,
        /// Random cases per run.
        #[arg(long, default_value_t = 8)]
        cases: u32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number format checked: fp32, or bf16 as mixed-precision runs use it.
        #[arg(long, value_enum, default_value_t = Precision::Fp32)]
        precision: Precision,
        /// Where the ranks compute: cpu (Gloo), cuda (a GPU each, NCCL), or
        /// auto: cuda where it can run, else cpu.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto, hide_possible_values = true)]
        device: DeviceChoice,
        /// Library of the collectives: gloo, nccl (a GPU per rank), or auto:
        /// nccl on cuda when there are GPUs enough for every rank.
        #[arg(long, value_enum, default_value_t = CollectivesChoice::Auto, hide_possible_values = true)]
        collectives: CollectivesChoice,
        /// Largest error accepted. Default: 1e-4 in fp32; 5e-2 in bf16 (8
        /// bits of mantissa: the error of one rounding of a value near 1 is
        /// up to 4e-3, and attention sums many).
        #[arg(long)]
        tolerance: Option<f64>,
        /// Seconds before the workers are stopped.
        #[arg(long, default_value_t = 300)]
        timeout_s: u64,
        /// Make this rank exit at once (to see that a lost peer is reported, not waited for).
        #[arg(long, hide = true)]
        kill_rank: Option<u32>,
    },
    /// One selfcheck worker (started by `selfcheck`).
    #[command(hide = true)]
    SelfcheckWorker {
        #[arg(long)]
        rank: u32,
        #[arg(long)]
        world: u32,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        cases: u32,
        #[arg(long, value_enum)]
        precision: Precision,
        #[arg(long, value_enum)]
        device: ComputeDevice,
        #[arg(long, value_enum)]
        collectives: Collectives,
        #[arg(long)]
        die: bool,
    },
}

/// What `selfcheck` is asked to check.
struct SelfcheckArgs {
    ranks: u32,
    cases: u32,
    seed: u64,
    precision: Precision,
    device: ComputeDevice,
    collectives: Collectives,
    tolerance: f64,
    timeout: Duration,
    kill: Option<u32>,
}

fn selfcheck(args: SelfcheckArgs) -> anyhow::Result<bool> {
    let SelfcheckArgs {
        ranks,
        cases,
        seed,
        precision,
        device,
        collectives,
        tolerance,
        timeout,
        kill,
    } = args;
    if ranks < 2 {
        bail!(
            "--ranks must be at least 2: distributed attention needs a ring of two or more ranks"
        );
    }
    if cases == 0 {
        bail!("--cases must be at least 1: with none, nothing would be checked");
    }
    if !(tolerance.is_finite() && tolerance > 0.0) {
        bail!("--tolerance must be a positive number, got {tolerance}");
    }
    if kill.is_some_and(|k| k >= ranks) {
        bail!("--kill-rank must be below --ranks");
    }
    let outputs = run_local(
        ranks,
        timeout,
        |rank, port| {
            let mut args = vec![
                "selfcheck-worker".to_string(),
                format!("--rank={rank}"),
                format!("--world={ranks}"),
                format!("--port={port}"),
                format!("--seed={seed}"),
                format!("--cases={cases}"),
                format!("--precision={}", precision.name()),
                format!("--device={}", device.name()),
                format!("--collectives={}", collectives.name()),
            ];
            if kill == Some(rank) {
                args.push("--die".to_string());
            }
            args
        },
        |_, _| {},
    )?;
    let mut worst = SelfcheckReport::default();
    for (rank, lines) in outputs.iter().enumerate() {
        let line = lines
            .last()
            .with_context(|| format!("worker {rank} printed no report"))?;
        let report: SelfcheckReport = serde_json::from_str(line)
            .with_context(|| format!("worker {rank} printed {line:?}"))?;
        worst = worst.worst(&report);
    }
    let backend = match collectives {
        Collectives::Gloo => "Gloo",
        Collectives::Nccl => "NCCL",
    };
    let on = match device {
        ComputeDevice::Cpu => "CPU",
        ComputeDevice::Cuda => "CUDA",
    };
    let kernel = weft_trainer::kernel::Kernel::of(
        match device {
            ComputeDevice::Cpu => tch::Device::Cpu,
            ComputeDevice::Cuda => tch::Device::Cuda(0),
        },
        precision.compute_kind(),
        weft_trainer::selfcheck::HEAD_DIM,
    );
    println!(
        "selfcheck on {ranks} ranks ({backend} on {on}, {}, {kernel:?} attention kernel): {} cases, {} document checks",
        worst.precision.name(),
        worst.cases,
        worst.documents
    );
    println!(
        "{:<16} {:>12} {:>12}  result",
        "component", "max error", "tolerance"
    );
    for (name, error) in [
        ("attention out", worst.attention_out),
        ("attention dQ", worst.attention_dq),
        ("attention dK", worst.attention_dk),
        ("attention dV", worst.attention_dv),
        ("remap", worst.remap),
        ("step loss", worst.step_loss),
        ("step gradients", worst.step_gradients),
        ("StreamBP loss", worst.streambp_loss),
        ("StreamBP grads", worst.streambp_gradients),
    ] {
        let verdict = if error <= tolerance { "ok" } else { "FAIL" };
        println!("{name:<16} {error:>12.2e} {tolerance:>12.1e}  {verdict}");
    }
    let plans_agree = worst.plans_differing == 0 && worst.plans == cases;
    println!(
        "{:<16} {:>12} {:>12}  {}",
        "plans agree",
        format!("{}/{}", worst.plans - worst.plans_differing, worst.plans),
        "all",
        if plans_agree { "ok" } else { "FAIL" }
    );
    Ok(worst.max_error() <= tolerance && plans_agree)
}

/// Marks a worker's metrics line on its standard output.
const METRICS_PREFIX: &str = "weft-metrics ";

/// Shows training progress: one line updated in place on a terminal, a line
/// every tenth of the run otherwise.
struct Progress {
    steps: u64,
    terminal: bool,
    shown: bool,
}

impl Progress {
    fn show(&mut self, m: &StepMetrics) {
        use std::io::Write;
        let busy = m.step_time_s.max(1e-9);
        let line = format!(
            "step {:>4}/{}  loss {:.4}  {:>8.0} tokens/s  {:.2} s/step  balance {:.2}  cp≤{}  attention {:.0}%  remap {:.0}%  all-reduce {:.0}%",
            m.step,
            self.steps,
            m.loss,
            m.tokens_per_s,
            m.step_time_s,
            m.balance,
            m.max_cp_degree,
            100.0 * m.attention_s / busy,
            100.0 * m.remap_s / busy,
            100.0 * m.all_reduce_s / busy,
        );
        let mut err = std::io::stderr();
        if self.terminal {
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
            self.shown = true;
        } else if m.step == 1
            || m.step == self.steps
            || m.step.is_multiple_of((self.steps / 10).max(1))
        {
            let _ = writeln!(err, "{line}");
        }
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
    }
}

/// What `local` and `eval` check once, before any rank starts, rather than
/// every rank as it gets there: a Hugging Face model's weights against its
/// config (from the files' headers), and the longest sequence against the
/// ranks, as the planner will plan it (refused naming the flags).
fn check_before_ranks(config: &TrainConfig, ranks: u32) -> anyhow::Result<()> {
    if let Some((dir, model)) = &config.hf_model {
        weft_trainer::hf::check_weights(dir, model)?;
    }
    let ctx = weft_trainer::train::local_plan_context(ranks, &config.planning())?;
    let longest = config.max_seq_len as u64;
    if let Err(e) = weft_planner::plan_step(config.strategy, &ctx, &[longest], Some(longest)) {
        if e.category() == "limits" {
            bail!("{e}");
        }
        let budget = match config.rank_tokens {
            Some(tokens) => format!(" of --rank-tokens {tokens}"),
            None => String::new(),
        };
        bail!(
            "{ranks} rank(s){budget} cannot hold one sequence of --max-seq-len {longest} (the planner: {e}); raise --rank-tokens or --ranks, or lower --max-seq-len"
        );
    }
    Ok(())
}

/// The flags of `train-worker` for rank `rank` of `ranks` (the run's
/// settings as JSON), as `local` and `eval` start it.
fn train_worker_args(rank: u32, port: u16, ranks: u32, threads: i32, json: &str) -> Vec<String> {
    vec![
        "train-worker".to_string(),
        format!("--rank={rank}"),
        format!("--world={ranks}"),
        format!("--port={port}"),
        format!("--threads={threads}"),
        format!("--config={json}"),
    ]
}

/// A Hugging Face model and a corpus to read with its tokenizer (`eval`,
/// `bench hf-load`).
#[derive(Args, Debug)]
struct ModelAndCorpus {
    /// A Hugging Face model directory (as `local --model`).
    #[arg(long)]
    model: PathBuf,
    /// The corpus (as `local --data`).
    #[arg(long)]
    data: PathBuf,
    /// The field of each JSONL line, and the column of each Parquet row,
    /// that holds its document.
    #[arg(long, default_value = weft_trainer::data::DEFAULT_TEXT_FIELD, value_name = "NAME")]
    text_field: String,
    /// Which files of --data are read (as `local --data-format`).
    #[arg(long, value_enum, default_value_t = DataFormat::Auto)]
    data_format: DataFormat,
}

/// What `eval` evaluates, and where.
#[derive(Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    input: ModelAndCorpus,
    /// Local worker processes.
    #[arg(long, default_value_t = 1)]
    ranks: u32,
    /// Longer documents are cut to this many tokens; default: the
    /// model's max_position_embeddings (times the factor of dynamic rope
    /// scaling, made to run past them).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    max_seq_len: Option<u64>,
    /// Most tokens one rank holds (as `local --rank-tokens`).
    #[arg(long)]
    rank_tokens: Option<u64>,
    /// Where each rank computes (as `local --device`).
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// fp32 or bf16 (as `local --precision`; default fp32 on cpu, bf16
    /// on cuda: pass fp32 there to compare with an fp32 reference).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// table, or json: {"loss", "tokens", "documents": [{"document",
    /// "loss", "tokens"}]} (a document's loss is null when it has fewer
    /// than two tokens).
    #[arg(long, value_enum, default_value_t = Report::Table)]
    format: Report,
    /// Seconds before the workers are stopped.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
}

/// `eval`: the workers of a training run, in its evaluation mode.
fn eval(args: EvalArgs) -> anyhow::Result<bool> {
    if args.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if !args.input.model.join("config.json").is_file() {
        bail!(
            "--model {}: not a Hugging Face model directory (it has no config.json); eval evaluates a trained model",
            args.input.model.display()
        );
    }
    // The longest sequence: the flag, else the positions the model was
    // trained for.
    let max_seq_len = match args.max_seq_len {
        Some(n) => n as usize,
        None => {
            let config = weft_trainer::hf::read_config(&args.input.model)?;
            let positions = config
                .raw
                .get("max_position_embeddings")
                .and_then(serde_json::Value::as_u64)
                .map_or(4096, |n| n as usize);
            // Dynamic scaling is made to run past the positions: by its factor.
            match config.architecture.rope.scaling {
                weft_trainer::model::RopeScaling::Dynamic { factor, .. } => {
                    (positions as f64 * factor).round() as usize
                }
                _ => positions,
            }
        }
    };
    // The run's settings as `local` would take them, with the same
    // defaults and checks: one document at a time. Each as `--flag=value`,
    // so a value that starts with a dash stays a value.
    let mut flags: Vec<std::ffi::OsString> = vec!["weft-trainer".into(), "local".into()];
    let mut flag = |name: &str, value: &std::ffi::OsStr| {
        let mut both = std::ffi::OsString::from(format!("--{name}="));
        both.push(value);
        flags.push(both);
    };
    flag("model", args.input.model.as_os_str());
    flag("data", args.input.data.as_os_str());
    flag("text-field", args.input.text_field.as_ref());
    flag("data-format", args.input.data_format.name().as_ref());
    flag("steps", "1".as_ref());
    flag("max-seq-len", max_seq_len.to_string().as_ref());
    flag("tokens-per-step", max_seq_len.to_string().as_ref());
    flag("device", weft_trainer::flag_name(&args.device).as_ref());
    if let Some(precision) = args.precision {
        flag("precision", precision.name().as_ref());
    }
    if let Some(tokens) = args.rank_tokens {
        flag("rank-tokens", tokens.to_string().as_ref());
    }
    let Command::Local { train, .. } = Cli::try_parse_from(&flags)
        .context("eval's settings")?
        .command
    else {
        bail!("the evaluation's settings did not read as a run's");
    };
    let mut train = train.settled(args.ranks)?;
    train.eval = true;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let threads = (cores / args.ranks).max(1) as i32;
    let config = train.config(threads)?;
    let corpus = weft_trainer::data::Corpus::load_with(
        &config.data,
        config.data_format,
        &config.text_field,
    )?;
    weft_trainer::memory::check_run(
        &config.model,
        args.ranks,
        config
            .rank_tokens
            .unwrap_or((max_seq_len as u64).div_ceil(u64::from(args.ranks))),
        config.device,
        config.precision,
    )?;
    check_before_ranks(&config, args.ranks)?;
    eprintln!(
        "weft-trainer eval: {} ranks on {} ({}, {}), model {}, {} documents cut at {max_seq_len} tokens, corpus {}",
        args.ranks,
        config.device.name(),
        config.collectives.name(),
        config.precision.name(),
        config.model.name,
        corpus.documents.len(),
        config.data.display()
    );
    let json = serde_json::to_string(&train)?;
    let ranks = args.ranks;
    let mut documents: Vec<weft_trainer::train::DocumentLoss> = Vec::new();
    run_local(
        ranks,
        Duration::from_secs(args.timeout_s),
        |rank, port| train_worker_args(rank, port, ranks, threads, &json),
        |rank, line| {
            if rank != 0 {
                return;
            }
            if let Some(text) = line.strip_prefix(weft_trainer::train::NOTICE_PREFIX) {
                eprintln!("weft-trainer eval: {text}");
            } else if let Some(body) = line.strip_prefix(weft_trainer::train::EVAL_PREFIX)
                && let Ok(document) = serde_json::from_str(body)
            {
                documents.push(document);
            }
        },
    )?;
    if documents.len() != corpus.documents.len() {
        bail!(
            "the workers reported {} of the corpus's {} documents",
            documents.len(),
            corpus.documents.len()
        );
    }
    let predicted = |d: &weft_trainer::train::DocumentLoss| d.tokens.saturating_sub(1);
    let total: u64 = documents.iter().map(predicted).sum();
    let sum: f64 = documents.iter().map(|d| d.loss_sum).sum();
    let mean = |sum: f64, count: u64| (count > 0).then(|| sum / count as f64);
    if args.format == Report::Json {
        let report = serde_json::json!({
            "loss": mean(sum, total),
            "tokens": documents.iter().map(|d| d.tokens).sum::<u64>(),
            "documents": documents.iter().map(|d| serde_json::json!({
                "document": d.document,
                "loss": mean(d.loss_sum, predicted(d)),
                "tokens": d.tokens,
            })).collect::<Vec<_>>(),
        });
        println!("{report}");
    } else {
        println!("{:>10} {:>8}  document", "loss", "tokens");
        for d in &documents {
            let loss =
                mean(d.loss_sum, predicted(d)).map_or("-".to_string(), |l| format!("{l:.4}"));
            println!("{loss:>10} {:>8}  {}", d.tokens, d.document);
        }
        let loss = mean(sum, total).map_or("-".to_string(), |l| format!("{l:.4}"));
        println!(
            "{loss:>10} {:>8}  all {} documents",
            documents.iter().map(|d| d.tokens).sum::<u64>(),
            documents.len()
        );
    }
    Ok(true)
}

fn local(
    ranks: u32,
    metrics: Option<PathBuf>,
    timeout: Duration,
    train: TrainArgs,
) -> anyhow::Result<bool> {
    use std::io::{IsTerminal, Write};
    if ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let threads = (cores / ranks).max(1) as i32;
    // Check everything here first, so a bad flag is one clear error, not N.
    let train = train.settled(ranks)?;
    let config = train.config(threads)?;
    let corpus = weft_trainer::data::Corpus::load_with(
        &config.data,
        config.data_format,
        &config.text_field,
    )?;
    // The memory the ranks need at least, against what this machine has.
    let tokens = config
        .rank_tokens
        .unwrap_or((config.tokens_per_step as u64).div_ceil(u64::from(ranks)))
        .min(config.tokens_per_step as u64);
    weft_trainer::memory::check_run(
        &config.model,
        ranks,
        tokens,
        config.device,
        config.precision,
    )?;
    check_before_ranks(&config, ranks)?;
    if config.accept_data_change && !config.resume {
        bail!("--accept-data-change only means something with --resume");
    }
    if let Some(root) = &config.checkpoint_dir {
        let newest = weft_trainer::checkpoint::checkpoints(root)?.pop();
        match (&newest, config.resume) {
            // Refused here, once, as rank 0 would.
            (Some((step, _)), false) => bail!(
                "{} already holds checkpoints (the newest of step {step}); pass --resume to continue that run, or give this one an empty --checkpoint-dir",
                root.display()
            ),
            // Checked here, once, as the ranks would: a run that is already
            // complete has nothing to do.
            (Some(_), true) => {
                if let Some(intact) = weft_trainer::checkpoint::latest_intact(root)? {
                    let data =
                        weft_trainer::train::data_identity(&config, &corpus, &config.tokenizer);
                    weft_trainer::train::check_resumable(
                        &intact.dir,
                        &intact.state,
                        &config,
                        &data,
                    )?;
                    if intact.state.step >= config.steps && config.save.is_some() {
                        bail!(
                            "the run is already complete ({} is of step {}, and --steps is {}): --save writes a model after training, and there is nothing to train (raise --steps)",
                            intact.dir.display(),
                            intact.state.step,
                            config.steps
                        );
                    }
                    if intact.state.step >= config.steps {
                        println!(
                            "the run is already complete: {} is of step {}, and --steps is {}; nothing to train (raise --steps to train further)",
                            intact.dir.display(),
                            intact.state.step,
                            config.steps
                        );
                        return Ok(true);
                    }
                }
            }
            (None, _) => {}
        }
        // Found now, not after the whole run has trained.
        weft_trainer::checkpoint::probe_writable(root)?;
        weft_trainer::checkpoint::CheckpointLock::check_free(root)?;
    }
    let mut file = match &metrics {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot write the metrics file {}", path.display()))?,
        )),
        None => None,
    };
    eprintln!(
        "weft-trainer local: {ranks} ranks on {} ({}, {}), model {}, {} steps of {} tokens, corpus {}",
        config.device.name(),
        config.collectives.name(),
        config.precision.name(),
        config.model.name,
        config.steps,
        config.tokens_per_step,
        config.data.display()
    );
    let json = serde_json::to_string(&train)?;
    let mut progress = Progress {
        steps: config.steps,
        terminal: std::io::stderr().is_terminal(),
        shown: false,
    };
    let mut last: Option<StepMetrics> = None;
    let mut sum_tokens = 0u64;
    let mut sum_time = 0.0f64;
    let mut write_error: Option<std::io::Error> = None;
    let result = run_local(
        ranks,
        timeout,
        |rank, port| train_worker_args(rank, port, ranks, threads, &json),
        |rank, line| {
            if rank != 0 {
                return;
            }
            if let Some(text) = line.strip_prefix(weft_trainer::train::NOTICE_PREFIX) {
                progress.finish();
                eprintln!("weft-trainer local: {text}");
                return;
            }
            let Some(body) = line.strip_prefix(METRICS_PREFIX) else {
                return;
            };
            if let Ok(m) = serde_json::from_str::<StepMetrics>(body) {
                progress.show(&m);
                if let Some(f) = file.as_mut()
                    && let Err(e) = writeln!(f, "{body}").and_then(|_| f.flush())
                {
                    write_error.get_or_insert(e);
                }
                sum_tokens += m.tokens;
                sum_time += m.step_time_s;
                last = Some(m);
            }
        },
    );
    progress.finish();
    result?;
    if let Some(e) = write_error {
        bail!("writing the metrics file failed: {e}");
    }
    let last = last.context("the workers reported no step")?;
    println!(
        "trained {} steps on {ranks} ranks: final loss {:.4}, {:.0} tokens/s on average",
        last.step,
        last.loss,
        sum_tokens as f64 / sum_time.max(1e-9)
    );
    if let Some(path) = metrics {
        println!("metrics: {}", path.display());
    }
    Ok(true)
}

/// What a pod's worker runs: the job's `training.json` (as the operator
/// publishes it) with the worker's own flags. Every field of the job that
/// reaches the worker changes these (see the test below).
fn job_args(
    training: &weft_crds::worker::TrainingParameters,
    steps: u64,
    mut run: RunArgs,
    (save, model): (Option<PathBuf>, Option<PathBuf>),
) -> anyhow::Result<TrainArgs> {
    let pretrained = training.pretrained.as_ref();
    match (model, pretrained) {
        (Some(flag), Some(job)) if flag != Path::new(&job.checkpoint) => bail!(
            "--model {} differs from the job's model.checkpoint {}; set one of them",
            flag.display(),
            job.checkpoint
        ),
        (Some(flag), None) => bail!(
            "--model {}: a pod trains its job's model; name the directory as the job's spec.model.checkpoint",
            flag.display()
        ),
        _ => {}
    }
    let output = pretrained
        .and_then(|p| p.output.as_ref())
        .map(PathBuf::from);
    let save = match (save, output) {
        (Some(flag), Some(job)) if flag != job => bail!(
            "--save {} differs from the job's model.output {}; set one of them",
            flag.display(),
            job.display()
        ),
        (Some(_), None) if pretrained.is_none() => bail!(
            "--save writes a Hugging Face model: the job must start from one (spec.model.checkpoint)"
        ),
        (flag, job) => job.or(flag),
    };
    let (model, model_spec) = match (pretrained, &training.model) {
        (Some(p), _) => (p.checkpoint.clone(), None),
        (None, Some(spec)) => (spec.name.clone(), Some(spec.clone())),
        (None, None) => bail!("the job's training.json names no model"),
    };
    let rope = pretrained
        .and_then(|p| p.rope.as_ref())
        .map(serde_json::to_string)
        .transpose()?;
    // The spec's counts, which its schema holds to their ranges, as the
    // trainer counts (refused by name where a file was written otherwise).
    fn count<T: TryFrom<i64>>(field: &str, value: impl Into<i64>) -> anyhow::Result<T> {
        let value = value.into();
        T::try_from(value).map_err(|_| anyhow::anyhow!("the job's {field} {value} is out of range"))
    }
    let (data, parallelism, checkpoint) =
        (&training.data, &training.parallelism, &training.checkpoint);
    let stream_bp_chunk_tokens = parallelism
        .stream_bp_chunk_tokens
        .map(|n| count::<u64>("parallelism.streamBpChunkTokens", n))
        .transpose()?;
    match (run.stream_bp_chunk, stream_bp_chunk_tokens) {
        (Some(flag), Some(job)) if flag != job => bail!(
            "--stream-bp-chunk {flag} differs from the job's parallelism.streamBpChunkTokens {job}; set one of them"
        ),
        (_, Some(job)) => run.stream_bp_chunk = Some(job),
        _ => {}
    }
    Ok(TrainArgs {
        steps,
        run,
        data: Some(PathBuf::from(&data.source)),
        model,
        model_spec,
        tokens_per_step: count("data.tokensPerStep", data.tokens_per_step)?,
        max_seq_len: count("data.maxSequenceLength", data.max_sequence_length)?,
        data_order: data.order,
        bucket_min: count("data.minBucketLength", data.min_bucket_length)?,
        curriculum_steps: count("data.curriculumSteps", data.curriculum_steps)?,
        strategy: match parallelism.context_parallelism {
            weft_crds::ContextParallelism::Adaptive => Strategy::Weft,
            weft_crds::ContextParallelism::Static => Strategy::Static,
        },
        flat_rings: !parallelism.hierarchical,
        cp_degree: parallelism
            .cp_degree
            .map(|n| count("parallelism.cpDegree", n))
            .transpose()?,
        max_cp_degree: parallelism
            .max_cp_degree
            .map(|n| count("parallelism.maxCpDegree", n))
            .transpose()?,
        no_nic_routing: !parallelism.nic_aware_routing,
        checkpoint_dir: Some(PathBuf::from(&checkpoint.path)),
        checkpoint_every: count("checkpoint.intervalSteps", checkpoint.interval_steps)?,
        checkpoint_keep: count::<u64>("checkpoint.keep", checkpoint.keep)?.max(1),
        resume: true,
        fail_at: None,
        misplan_at: None,
        save,
        rope,
        eval: false,
        text_field: data.text_field.clone(),
        data_format: data.format,
        tokenizer: data.tokenizer.as_ref().map(PathBuf::from),
    })
}

/// The job's settings a pod's worker checks before it starts a rank, each
/// refused by the name of the job's field: the checkpoint's config and
/// weights (read from their headers), the rotary settings, the output, the
/// tokenizer, and the data as the job reads it (its files and their first
/// lines or schemas: the ranks read the rest).
fn check_job_fields(training: &weft_crds::worker::TrainingParameters) -> anyhow::Result<()> {
    if let Some(pretrained) = &training.pretrained {
        let dir = Path::new(&pretrained.checkpoint);
        let field = || format!("spec.model.checkpoint {}", dir.display());
        let config = weft_trainer::hf::read_config(dir).with_context(field)?;
        weft_trainer::hf::check_weights(dir, &config).with_context(field)?;
        if let Some(rope) = &pretrained.rope {
            weft_trainer::hf::with_rope(
                &config,
                rope,
                u64::try_from(training.data.max_sequence_length).unwrap_or(0),
            )
            .context("spec.model.rope")?;
        }
        if let Some(out) = &pretrained.output {
            weft_trainer::hf::probe_save(Path::new(out))
                .with_context(|| format!("spec.model.output {out}"))?;
        }
    }
    if let Some(path) = &training.data.tokenizer {
        weft_trainer::hf::tokenizer_at(Path::new(path))
            .with_context(|| format!("spec.data.tokenizer {path}"))?;
    }
    let format = training.data.format;
    weft_trainer::data::Corpus::check(
        Path::new(&training.data.source),
        format,
        &training.data.text_field,
    )
    .with_context(|| {
        format!(
            "spec.data (source {}, format {}, textField {:?})",
            training.data.source,
            training.data.format.name(),
            training.data.text_field
        )
    })?;
    Ok(())
}

/// The default model of `bench memory`: a 0.2B-parameter Llama shape.
fn bench_model() -> weft_planner::model::ModelSpec {
    weft_planner::model::ModelSpec {
        name: "llama-0.2b".to_string(),
        layers: 12,
        hidden: 1024,
        heads: 16,
        kv_heads: 4,
        ffn: 2816,
        vocab: 32000,
        tied_embeddings: false,
    }
}

/// This program as a child running the hidden `bench SUBCOMMAND --config
/// JSON`: one measurement in a process of its own, its figures as JSON on
/// standard output.
fn child_with_config(
    subcommand: &str,
    config: &impl Serialize,
) -> anyhow::Result<std::process::Command> {
    let exe = std::env::current_exe().context("finding this program to start a measurement")?;
    let mut command = std::process::Command::new(exe);
    command
        .args(["bench", subcommand, "--config"])
        .arg(serde_json::to_string(config)?);
    Ok(command)
}

/// Runs one probe in a child process of this binary.
fn run_probe(
    config: &weft_trainer::membench::ProbeConfig,
) -> anyhow::Result<weft_trainer::membench::Probe> {
    let out = child_with_config("memory-probe", config)?
        // glibc maps allocations of 64 KiB and more on their own and gives
        // freed memory back at once, so the resident set follows what is
        // alive (else freed memory kept for reuse blurs the peak).
        .env("MALLOC_MMAP_THRESHOLD_", "65536")
        .env("MALLOC_TRIM_THRESHOLD_", "0")
        .output()
        .context("starting a probe")?;
    if !out.status.success() {
        bail!(
            "the {} step of {} tokens failed ({}): {}",
            config.method.name(),
            config.seq_len,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading a probe's figures")
}

/// `bench throughput`: see [`BenchCommand::Throughput`].
fn bench_throughput(args: ThroughputArgs) -> anyhow::Result<()> {
    use weft_trainer::launch::output_within;
    use weft_trainer::throughput::{
        Failed, Measured, Outcome, Peak, PlainConfig, Row, RunPath, engine_figures, failure,
        measure, table, write_documents,
    };
    let model = weft_planner::input::load_model(&args.model)?;
    let device = ComputeDevice::choose(args.device);
    device.check()?;
    let precision = args.precision.unwrap_or_else(|| device.default_precision());
    let peak = match (&args.gpu, args.peak_tflops) {
        (Some(_), _) if precision != Precision::Bf16 => bail!(
            "--gpu measures MFU against the GPU's dense bf16 peak, and the runs are in {}: give the peak of that format with --peak-tflops",
            precision.name()
        ),
        (Some(name), _) => {
            let gpu = weft_planner::cluster::GpuModel::preset(name)
                .with_context(|| format!("--gpu {name}"))?;
            Some(Peak {
                tflops: gpu.peak_bf16_tflops,
                source: format!("{} datasheet, dense bf16", gpu.product_label),
            })
        }
        (None, Some(tflops)) if !(tflops.is_finite() && tflops > 0.0) => {
            bail!("--peak-tflops must be a positive number, got {tflops}")
        }
        (None, Some(tflops)) => Some(Peak {
            tflops,
            source: "--peak-tflops".to_string(),
        }),
        (None, None) => None,
    };
    let shortest = args.tokens_per_device.iter().copied().min().unwrap_or(2);
    if let Some(chunk) = args.stream_bp_chunk
        && chunk > shortest
    {
        bail!(
            "--stream-bp-chunk {chunk} is longer than the shortest --tokens-per-device ({shortest})"
        );
    }
    if let Some(path) = &args.profile {
        weft_planner::input::load_profile(&path.to_string_lossy())
            .with_context(|| format!("--profile {}", path.display()))?;
    }
    if args.timeout_s == 0 {
        bail!("--timeout-s must be at least 1");
    }
    // Found unwritable now, not after the runs (and nothing in it lost).
    if let Some(path) = &args.json {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    if !args.paths.contains(&RunPath::Engine) {
        let engine_only = [
            ("--ranks", args.ranks != 1),
            ("--rank-tokens", args.rank_tokens.is_some()),
            ("--stream-bp-chunk", args.stream_bp_chunk.is_some()),
            ("--profile", args.profile.is_some()),
        ];
        if let Some((flag, _)) = engine_only.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} sets the engine's runs, and --paths runs the plain path alone (one process, plain backprop)"
            );
        }
    }
    let devices = match device {
        ComputeDevice::Cpu => 1,
        ComputeDevice::Cuda => args.ranks.min(tch::Cuda::device_count().max(1) as u32),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let exe = std::env::current_exe().context("finding this program to start the runs")?;
    let work = tempfile::Builder::new()
        .prefix("weft-throughput-")
        .tempdir()
        .context("a directory for the benchmark's documents")?;
    let work = work.path();
    eprintln!(
        "bench throughput: {} ({:.2}B parameters, {}) on {}, engine on {} rank(s) over {devices} device(s); {} timed steps after {} of warm-up, every run in a process of its own",
        model.name,
        model.params() / 1e9,
        precision.name(),
        device.name(),
        args.ranks,
        args.steps,
        args.warmup
    );
    let mut rows = Vec::new();
    for &length in &args.tokens_per_device {
        let documents = work.join(format!("documents-{length}"));
        write_documents(&documents, devices, length)?;
        for &path in &args.paths {
            let (ranks, row_devices) = match path {
                RunPath::Engine => (args.ranks, devices),
                RunPath::Plain => (1, 1),
            };
            let steps = args.warmup + args.steps;
            let metrics = work.join(format!("engine-{length}.jsonl"));
            let command = match path {
                RunPath::Engine => {
                    let mut command = std::process::Command::new(&exe);
                    command
                        .arg("local")
                        .args(["--ranks", &ranks.to_string()])
                        .args(["--steps", &steps.to_string()])
                        .args(["--model", &args.model])
                        .arg("--data")
                        .arg(&documents)
                        .args([
                            "--tokens-per-step",
                            &(length * u64::from(devices)).to_string(),
                        ])
                        .args(["--max-seq-len", &length.to_string()])
                        .args(["--device", device.name()])
                        .args(["--precision", precision.name()])
                        .args(["--timeout-s", &args.timeout_s.to_string()])
                        .arg("--metrics")
                        .arg(&metrics);
                    // Ranks sharing a device hold its document's share each
                    // (the local topology is one node of `ranks` GPUs).
                    let shared = (ranks > devices).then(|| {
                        (length * u64::from(devices)).div_ceil(u64::from(ranks))
                            + weft_planner::schedule::zigzag_margin(ranks)
                    });
                    if let Some(tokens) = args.rank_tokens.or(shared) {
                        command.args(["--rank-tokens", &tokens.to_string()]);
                    }
                    if let Some(chunk) = args.stream_bp_chunk {
                        command.args(["--stream-bp-chunk", &chunk.to_string()]);
                    }
                    if let Some(profile) = &args.profile {
                        command.arg("--profile").arg(profile);
                    }
                    command
                }
                RunPath::Plain => child_with_config(
                    "throughput-plain",
                    &PlainConfig {
                        model: model.clone(),
                        precision,
                        device,
                        documents: documents.clone(),
                        length,
                        steps,
                        seed: 0,
                        threads: cores,
                    },
                )?,
            };
            let run = output_within(command, Duration::from_secs(args.timeout_s))
                .with_context(|| format!("starting the {} run", path.name()))?;
            let outcome = if run.timed_out {
                Outcome::Failed(Failed {
                    category: "timeout".to_string(),
                    message: format!("stopped after {} s (--timeout-s)", args.timeout_s),
                })
            } else if !run.output.status.success() {
                Outcome::Failed(failure(&String::from_utf8_lossy(&run.output.stderr)))
            } else {
                Outcome::Measured(match path {
                    RunPath::Engine => {
                        let text = std::fs::read_to_string(&metrics)
                            .with_context(|| format!("reading {}", metrics.display()))?;
                        let lines: Vec<StepMetrics> = text
                            .lines()
                            .map(serde_json::from_str)
                            .collect::<Result<_, _>>()
                            .context("reading the engine's metrics")?;
                        engine_figures(&model, &lines, args.warmup, length, devices, peak.as_ref())?
                    }
                    RunPath::Plain => {
                        let seconds: Vec<f64> = serde_json::from_slice(&run.output.stdout)
                            .context("reading the plain run's figures")?;
                        let timed = seconds.get(args.warmup as usize..).unwrap_or_default();
                        measure(&model, &[length], timed, 1, peak.as_ref())?
                    }
                })
            };
            match &outcome {
                Outcome::Measured(Measured {
                    tokens_per_s_per_device,
                    tflops_per_device,
                    mfu,
                    ..
                }) => eprintln!(
                    "  {:<6} {length:>8} tokens/device: {tokens_per_s_per_device:>10.0} tokens/s/device, {tflops_per_device:.3} TFLOP/s/device{}",
                    path.name(),
                    mfu.map_or(String::new(), |m| format!(", MFU {:.1}%", 100.0 * m))
                ),
                Outcome::Failed(Failed { category, message }) => eprintln!(
                    "  {:<6} {length:>8} tokens/device: {category}: {message}",
                    path.name()
                ),
            }
            rows.push(Row {
                model: model.name.clone(),
                path,
                tokens_per_device: length,
                ranks,
                devices: row_devices,
                precision,
                outcome,
            });
        }
    }
    let json = serde_json::to_string_pretty(&serde_json::json!({ "peak": peak, "rows": rows }))?;
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("--json {}", path.display()))?;
    }
    match args.format {
        Report::Json => println!("{json}"),
        Report::Table => print!("{}", table(&rows, peak.as_ref())),
    }
    Ok(())
}

/// `bench hf-load`: see [`BenchCommand::HfLoad`].
fn bench_hf_load(input: &ModelAndCorpus) -> anyhow::Result<()> {
    let (model, data, text_field) = (&input.model, &input.data, &input.text_field);
    let format = input.data_format;
    use weft_trainer::membench::{reset_peak, status_bytes};
    const GIB: f64 = (1u64 << 30) as f64;
    // The peak from here on: what loading adds.
    reset_peak();
    let before = status_bytes("VmRSS")?;
    let started = std::time::Instant::now();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let (_model, config) = weft_trainer::hf::load(model, &vs.root(), tch::Device::Cpu)?;
    let load_s = started.elapsed().as_secs_f64();
    let peak = status_bytes("VmHWM")?;
    let params: i64 = vs
        .trainable_variables()
        .iter()
        .map(|t| t.numel() as i64)
        .sum();
    let tokenizers = [
        ("model", weft_trainer::hf::tokenizer(model, &config)?),
        ("bytes", weft_trainer::data::Tokenizer::Bytes),
    ];
    let corpus = weft_trainer::data::Corpus::load_with(data, format, text_field)?;
    let bytes: usize = corpus.documents.iter().map(|d| d.text.len()).sum();
    let mut speeds = serde_json::Map::new();
    for (name, tokenizer) in &tokenizers {
        let started = std::time::Instant::now();
        let mut tokens = 0usize;
        for document in &corpus.documents {
            tokens += tokenizer.encode(&document.source, &document.text)?.len();
        }
        let seconds = started.elapsed().as_secs_f64().max(1e-9);
        speeds.insert(
            name.to_string(),
            serde_json::json!({"tokens": tokens, "tokens_per_s": tokens as f64 / seconds}),
        );
    }
    let report = serde_json::json!({
        "model": model.display().to_string(),
        "params": params,
        "weights_gib": params as f64 * 4.0 / GIB,
        "load_s": load_s,
        "load_peak_gib": peak.saturating_sub(before) as f64 / GIB,
        "corpus_documents": corpus.documents.len(),
        "corpus_bytes": bytes,
        "tokenizers": speeds,
    });
    println!("{report}");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_memory(
    model: Option<String>,
    seq_len: u64,
    budget_gib: f64,
    chunk: u64,
    precision: Precision,
    threads: Option<i32>,
    max_len: u64,
    resolution: f64,
    methods: Vec<weft_trainer::membench::Method>,
    format: Report,
) -> anyhow::Result<()> {
    use weft_trainer::membench::{
        GIB, MemoryReport, MethodReport, ProbeConfig, longest_within, predicted_bytes,
        predicted_longest,
    };
    if !(budget_gib.is_finite() && budget_gib > 0.0) {
        bail!("--budget-gib must be a positive number, got {budget_gib}");
    }
    if !(resolution.is_finite() && resolution > 0.0 && resolution < 1.0) {
        bail!("--resolution must be between 0 and 1, got {resolution}");
    }
    if chunk > seq_len {
        bail!("--stream-bp-chunk {chunk} is longer than --seq-len {seq_len}");
    }
    let model = match model {
        Some(name) => weft_planner::input::load_model(&name)?,
        None => bench_model(),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    let threads = threads.unwrap_or(cores).max(1);
    let budget = (budget_gib * GIB) as u64;
    eprintln!(
        "bench memory: {} ({:.2}B parameters, {}), one rank, {threads} threads; peaks at {seq_len} tokens, longest within {budget_gib} GiB; every step in a process of its own",
        model.name,
        model.params() / 1e9,
        precision.name()
    );
    let mut reports = Vec::new();
    for method in methods {
        let config = |len: u64| ProbeConfig {
            model: model.clone(),
            precision,
            method,
            chunk: chunk.min(len),
            seq_len: len,
            threads,
        };
        let mut measured = std::collections::BTreeMap::new();
        let mut measure = |len: u64| -> anyhow::Result<weft_trainer::membench::Probe> {
            if let Some(probe) = measured.get(&len) {
                return Ok(*probe);
            }
            let probe = run_probe(&config(len))?;
            eprintln!(
                "  {:<13} {:>8} tokens: peak {:>7.3} GiB, {:>8.2} s{}",
                method.name(),
                len,
                probe.peak_bytes as f64 / GIB,
                probe.seconds,
                if probe.exact_peak {
                    ""
                } else {
                    " (peak since start: this kernel cannot reset it)"
                }
            );
            measured.insert(len, probe);
            Ok(probe)
        };
        let at = measure(seq_len)?;
        let (longest, probes) = longest_within(budget, seq_len, max_len, resolution, measure)?;
        let at_longest = probes.iter().find(|p| p.seq_len == longest).copied();
        reports.push(MethodReport {
            name: method.name().to_string(),
            peak_gib: at.peak_bytes as f64 / GIB,
            max_len: longest,
            s_per_token: at.seconds / seq_len as f64,
            predicted_gib: predicted_bytes(&model, precision, method, chunk, seq_len)
                .map(|b| b / GIB),
            max_len_peak_gib: at_longest.map_or(0.0, |p| p.peak_bytes as f64 / GIB),
            max_len_predicted_gib: at_longest.and_then(|p| {
                predicted_bytes(&model, precision, method, chunk.min(p.seq_len), p.seq_len)
                    .map(|b| b / GIB)
            }),
            predicted_max_len: predicted_longest(&model, precision, method, chunk, budget),
            probes,
        });
    }
    let report = MemoryReport {
        budget_gib,
        seq_len,
        model: model.name.clone(),
        params: model.params(),
        precision,
        stream_bp_chunk: chunk,
        methods: reports,
    };
    if format == Report::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>10} {:>12} {:>12} {:>14} {:>14} {:>14}",
        "method", "peak GiB", "predicted", "max len", "predicted len", "s/token", "vs checkpoint"
    );
    let checkpointing = report.methods.iter().find(|m| m.name == "checkpointing");
    for m in &report.methods {
        let versus = checkpointing
            .filter(|c| c.max_len > 0)
            .map_or("-".to_string(), |c| {
                format!(
                    "{:.2}x len, {:.2}x time",
                    m.max_len as f64 / c.max_len as f64,
                    m.s_per_token / c.s_per_token
                )
            });
        println!(
            "{:<14} {:>10.3} {:>12} {:>12} {:>14} {:>14.3e} {:>14}",
            m.name,
            m.peak_gib,
            m.predicted_gib
                .map_or("-".to_string(), |p| format!("{p:.3}")),
            m.max_len,
            m.predicted_max_len
                .map_or("-".to_string(), |n| n.to_string()),
            m.s_per_token,
            versus
        );
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    weft_trainer::kernel::check_attention_setting().map_err(anyhow::Error::msg)?;
    match cli.command {
        Command::Bench { bench } => match bench {
            BenchCommand::Memory {
                model,
                seq_len,
                budget_gib,
                stream_bp_chunk,
                precision,
                threads,
                max_len,
                resolution,
                methods,
                format,
            } => {
                bench_memory(
                    model,
                    seq_len,
                    budget_gib,
                    stream_bp_chunk,
                    precision,
                    threads,
                    max_len,
                    resolution,
                    methods,
                    format,
                )?;
                Ok(true)
            }
            BenchCommand::HfLoad(input) => {
                bench_hf_load(&input)?;
                Ok(true)
            }
            BenchCommand::Throughput(args) => {
                bench_throughput(args)?;
                Ok(true)
            }
            BenchCommand::ThroughputPlain { config } => {
                let config: weft_trainer::throughput::PlainConfig =
                    serde_json::from_str(&config)
                        .context("the plain run's --config is not valid")?;
                let seconds = weft_trainer::throughput::run_plain(&config)?;
                println!("{}", serde_json::to_string(&seconds)?);
                Ok(true)
            }
            BenchCommand::MemoryProbe { config } => {
                let config: weft_trainer::membench::ProbeConfig =
                    serde_json::from_str(&config).context("the probe's --config is not valid")?;
                let probe = weft_trainer::membench::probe(&config)?;
                println!("{}", serde_json::to_string(&probe)?);
                Ok(true)
            }
        },
        Command::Eval(args) => eval(args),
        Command::Local {
            ranks,
            metrics,
            timeout_s,
            train,
        } => local(ranks, metrics, Duration::from_secs(timeout_s), *train),
        Command::Worker {
            steps,
            run,
            epoch_wait_s,
            save,
            model,
        } => {
            // SIGTERM (the pod is being deleted) is watched for first: as a
            // container's first process, a signal with no handler is lost.
            let stop_asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop_asked.clone())
                .context("watching for SIGTERM")?;
            // What is refused before any rank starts is the job's settings
            // (or the pod's), which no restart changes: the pod says so by
            // its exit code and termination message, and the job fails.
            match worker_preflight(steps, run, (save, model))? {
                Preflight::Run(run) => {
                    let (env, args) = *run;
                    pod_worker(&env, &args, Duration::from_secs(epoch_wait_s), &stop_asked)?
                }
                Preflight::Finished(out) => eprintln!(
                    "weft-trainer worker: the job has trained its last step and written {}; nothing left to do",
                    out.display()
                ),
            }
            Ok(true)
        }
        Command::TrainWorker {
            rank,
            world,
            port,
            store_host,
            bind_host,
            watch_mesh,
            epoch,
            threads,
            local_rank,
            config,
        } => {
            let args: TrainArgs =
                serde_json::from_str(&config).context("the worker's --config is not valid")?;
            let mut config = args.config(threads)?;
            config.epoch_watch = watch_mesh.zip(epoch);
            // The pod's worker passes its SIGTERM on: stop with a checkpoint.
            let stop_asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop_asked.clone())
                .context("watching for SIGTERM")?;
            config.stop_asked = Some(stop_asked);
            // Before its first step, SIGTERM ends the rank at once.
            let starting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            signal_hook::flag::register_conditional_shutdown(
                signal_hook::consts::SIGTERM,
                weft_trainer::pod::TERMINATED_EXIT,
                starting.clone(),
            )
            .context("watching for SIGTERM")?;
            config.starting = Some(starting);
            let rendezvous = weft_trainer::train::Rendezvous {
                store_host,
                port,
                bind_host,
                local_rank: local_rank.unwrap_or(rank),
            };
            config.trace = rank_trace(rank, epoch)?.map(|trace| {
                std::sync::Arc::new(trace) as std::sync::Arc<dyn weft_trainer::steptrace::StepSink>
            });
            let trace = config.trace.clone();
            let ended = weft_trainer::train::run_worker(rank, world, &rendezvous, &config, |m| {
                if let Ok(json) = serde_json::to_string(m) {
                    println!("{METRICS_PREFIX}{json}");
                }
            });
            // What the rank traced leaves before it does, however it ends.
            if let Some(trace) = &trace {
                trace.flush();
            }
            if let weft_trainer::train::RunEnd::NewEpoch { .. } = ended? {
                // The pod's worker starts this rank again in the new mesh.
                std::process::exit(weft_trainer::pod::NEW_EPOCH_EXIT);
            }
            Ok(true)
        }
        Command::Profile {
            model,
            precision,
            tokens,
            document_length,
            steps,
            threads,
            device,
            out,
            stream_bp_chunk,
        } => {
            if let Some(chunk) = stream_bp_chunk
                && chunk > document_length
            {
                bail!(
                    "--stream-bp-chunk {chunk} is longer than the longest sequence profiled (--document-length {document_length})"
                );
            }
            let device = ComputeDevice::choose(device).of_rank(0)?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
            let config = weft_trainer::profile::ProfileConfig {
                model: weft_planner::input::load_model(&model)?,
                precision,
                tokens: tokens as usize,
                document_length: document_length as usize,
                steps,
                threads: threads.unwrap_or(cores).max(1),
                device,
                // The profile streams every document it times.
                backprop: stream_bp_chunk.map_or(Backprop::Plain, |chunk_tokens| {
                    Backprop::Streamed { chunk_tokens }
                }),
            };
            let profile = weft_trainer::profile::measure(&config)?;
            eprintln!(
                "{}: linear modules {:.4} TFLOP/s, attention {:.4} TFLOP/s, link {:.3} GB/s, latency {:.1} µs{}",
                profile.device,
                profile.linear_tflops,
                profile.attention_tflops,
                profile.link_gbytes_per_s,
                profile.p2p_latency_s * 1e6,
                profile
                    .stream_bp_chunk_overhead_s
                    .map_or(String::new(), |s| format!(
                        ", StreamBP {:.3} ms a chunk a layer",
                        s * 1e3
                    ))
            );
            let text = serde_json::to_string_pretty(&profile)? + "\n";
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(true)
        }
        Command::Selfcheck {
            ranks,
            cases,
            seed,
            precision,
            device,
            collectives,
            tolerance,
            timeout_s,
            kill_rank,
        } => {
            let device = ComputeDevice::choose(device);
            device.check()?;
            let collectives = Collectives::choose(collectives, device, ranks)?;
            let tolerance = tolerance.unwrap_or(match precision {
                Precision::Fp32 => 1e-4,
                Precision::Bf16 => 5e-2,
            });
            selfcheck(SelfcheckArgs {
                ranks,
                cases,
                seed,
                precision,
                device,
                collectives,
                tolerance,
                timeout: Duration::from_secs(timeout_s),
                kill: kill_rank,
            })
        }
        Command::SelfcheckWorker {
            rank,
            world,
            port,
            seed,
            cases,
            precision,
            device,
            collectives,
            die,
        } => {
            if die {
                bail!("rank {rank} was told to exit (--kill-rank)");
            }
            let collectives = Collectives::choose(collectives.into(), device, 1)?;
            let device = device.of_rank(rank)?;
            let spec = CheckSpec {
                seed,
                cases,
                precision,
                device,
                collectives,
            };
            let report = run_worker(rank, world, port, &spec)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    // A panic is a failure like an error: its message is the last word.
    let report_panic = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report_panic(info);
        last_words(&info.to_string());
    }));
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!(
                "weft-trainer: selfcheck: an error is above the tolerance, or the ranks planned differently"
            );
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("weft-trainer: error: {err:#}");
            last_words(&format!("{err:#}"));
            if err.downcast_ref::<SettingsRefused>().is_some() {
                return ExitCode::from(weft_crds::SETTINGS_REFUSED_EXIT as u8);
            }
            if collective_failed(&err) {
                ExitCode::from(PEER_LOST_EXIT as u8)
            } else {
                ExitCode::from(2)
            }
        }
    }
}

/// Why this process stops, where it is read: a pod's rank tells its worker,
/// whose own error then carries it; in a container, why the worker stopped
/// is its termination message (Kubernetes keeps 4 KiB; the job's status
/// shows it). In one line: the job's status shows a failure in one.
fn last_words(message: &str) {
    let message = message.replace('\n', " / ");
    let message = weft_trainer::prefix_within(&message, 4000);
    if let Some(file) = std::env::var_os(weft_trainer::pod::RANK_ERROR_FILE) {
        let _ = std::fs::write(file, message);
    } else {
        let termination_log = std::env::var_os(TERMINATION_LOG_ENV)
            .map_or_else(|| PathBuf::from(TERMINATION_LOG), PathBuf::from);
        if termination_log.exists() {
            let _ = std::fs::write(termination_log, message);
        }
    }
}

/// A pod's worker's checks before it starts a rank: its environment, the
/// job's settings (each refused by the job's field where it is one), and
/// that one rank fits the pod's memory and the checkpoints can be written,
/// once here rather than in every rank, before the first step rather than
/// after it.
fn worker_preflight(
    steps: u64,
    run: RunArgs,
    save_and_model: (Option<PathBuf>, Option<PathBuf>),
) -> anyhow::Result<Preflight> {
    // The pod's environment and the job's settings: what no restart
    // changes (a transient read error aside) is a refusal.
    let settings = || -> anyhow::Result<_> {
        let env = weft_trainer::pod::PodEnv::read(|name| std::env::var(name).ok())?;
        let training = weft_trainer::pod::read_training(&env.training)?;
        let args = job_args(&training, steps, run, save_and_model)?;
        if let Some(out) = finished_already(&args) {
            return Ok(Err(out));
        }
        check_job_fields(&training)?;
        // A collector named in the job's env that no rank could send to.
        if let Some(endpoint) = weft_telemetry::traces_endpoint(|name| std::env::var(name).ok()) {
            weft_telemetry::check_endpoint(&endpoint).context(
                "the job's env (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT) names the step traces' collector",
            )?;
        }
        let config = args.config(1)?;
        Ok(Ok((env, args, config)))
    };
    let (env, args, config) = match settings().map_err(refusal_unless_transient)? {
        Ok(settings) => settings,
        Err(out) => return Ok(Preflight::Finished(out)),
    };
    // What depends on the moment (the mesh, the node's free memory, the
    // checkpoint volume) fails the pod as any failure does: it is restarted.

    // The pod runs a rank per GPU of its worker, as the mesh says
    // (one when the mesh is not there yet or does not name it).
    let mesh = weft_trainer::pod::read_mesh(&env.mesh).ok();
    let ranks = mesh
        .as_ref()
        .and_then(|mesh| {
            mesh.workers
                .iter()
                .find(|w| w.name == env.worker)
                .map(|w| w.gpus.max(1))
        })
        .unwrap_or(1);
    // The job's limits against the longest sequence on the mesh's
    // nodes: refused here, by the field's name, not at the first step.
    if let Some(mesh) = &mesh {
        let ctx = weft_trainer::train::mesh_cluster_context(mesh, &config.planning())?;
        let longest = config.max_seq_len as u64;
        if let Err(e) = weft_planner::plan_step(config.strategy, &ctx, &[longest], Some(longest))
            && e.category() == "limits"
        {
            bail!("{e}");
        }
    }
    let tokens = config
        .rank_tokens
        .unwrap_or(config.max_seq_len as u64)
        .min(config.tokens_per_step as u64);
    weft_trainer::memory::check_run(
        &config.model,
        ranks,
        tokens,
        config.device,
        config.precision,
    )?;
    if let Some(root) = &config.checkpoint_dir {
        weft_trainer::checkpoint::probe_writable(root)?;
    }
    Ok(Preflight::Run(Box::new((env, args))))
}

/// What a pod's worker found before starting its ranks.
enum Preflight {
    /// Train, in this pod's environment, with these settings.
    Run(Box<(weft_trainer::pod::PodEnv, TrainArgs)>),
    /// The job already trained its last step and wrote its output (here):
    /// a pod restarted after that has nothing left to do.
    Finished(PathBuf),
}

/// The output of a job whose last step is checkpointed and whose trained
/// model is written, if this one's are.
fn finished_already(args: &TrainArgs) -> Option<PathBuf> {
    let out = args.save.as_ref()?;
    // Only a job that wrote its output is looked at further, and then its
    // newest checkpoint's state alone (not every file's sum, tens of GB).
    if !out.join("config.json").is_file() {
        return None;
    }
    let root = args.checkpoint_dir.as_ref()?;
    let (step, dir) = weft_trainer::checkpoint::checkpoints(root).ok()?.pop()?;
    let state = weft_trainer::checkpoint::read_state(&dir).ok()?;
    (step >= args.steps && state.step >= args.steps).then(|| out.clone())
}

/// `err` as a refusal of the job's settings ([`SettingsRefused`]), unless
/// an I/O error of the kind a retry may not meet again caused it (a volume
/// that timed out, a stale network handle): a pod that fails on such an
/// error is restarted, not the job failed.
fn refusal_unless_transient(err: anyhow::Error) -> anyhow::Error {
    use std::io::ErrorKind;
    let transient = err
        .chain()
        .filter_map(|cause| cause.downcast_ref::<std::io::Error>())
        .any(|io| {
            !matches!(
                io.kind(),
                ErrorKind::NotFound
                    | ErrorKind::PermissionDenied
                    | ErrorKind::AlreadyExists
                    | ErrorKind::InvalidInput
                    | ErrorKind::InvalidData
                    | ErrorKind::NotADirectory
                    | ErrorKind::IsADirectory
                    | ErrorKind::ReadOnlyFilesystem
            )
        });
    if transient {
        err
    } else {
        SettingsRefused(err).into()
    }
}

/// The job's settings refused by a pod's worker before it started a rank.
#[derive(Debug)]
struct SettingsRefused(anyhow::Error);

impl std::fmt::Display for SettingsRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for SettingsRefused {}

/// A pod rank's step traces, when the job names a collector (the standard
/// OTLP variables in its `env`): children of the reconcile that published
/// its mesh epoch (`TRACEPARENT`, from its worker).
fn rank_trace(
    rank: u32,
    epoch: Option<u64>,
) -> anyhow::Result<Option<weft_trainer::steptrace::StepTrace>> {
    use opentelemetry::KeyValue;
    let var = |name: &str| std::env::var(name).ok();
    let mut resource = vec![KeyValue::new("weft.rank", i64::from(rank))];
    if let Some(epoch) = epoch {
        resource.push(KeyValue::new("weft.mesh_epoch", epoch as i64));
    }
    for (variable, key) in [
        (weft_crds::worker::env::JOB, "weft.job"),
        (weft_crds::worker::env::NAMESPACE, "weft.namespace"),
        (weft_crds::worker::env::WORKER, "weft.worker"),
    ] {
        if let Some(value) = var(variable) {
            resource.push(KeyValue::new(key, value));
        }
    }
    let parent = var(weft_trainer::steptrace::TRACE_PARENT_ENV);
    Ok(weft_trainer::steptrace::StepTrace::from_env(
        var,
        parent.as_deref(),
        resource,
    )?)
}

/// Where Kubernetes reads a container's termination message (the default
/// `terminationMessagePath`).
const TERMINATION_LOG: &str = "/dev/termination-log";

/// Another file for the termination message (a container whose
/// `terminationMessagePath` is not the default); written only if it exists.
const TERMINATION_LOG_ENV: &str = "WEFT_TERMINATION_LOG";

/// Runs the pod's worker: one rank process of this binary per GPU of the
/// worker, for each epoch of the mesh (see `weft_trainer::pod`).
fn pod_worker(
    env: &weft_trainer::pod::PodEnv,
    args: &TrainArgs,
    wait_for_epoch: Duration,
    stop_asked: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    let exe =
        std::env::current_exe().context("could not locate this program to start its ranks")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let worker = env.worker.clone();
    // Follow the mesh through the API server as well as the volume, which
    // Kubernetes refreshes only a minute or more after a new epoch: the
    // supervisor and the ranks read a local copy of the newest.
    // One link to the API server (one async runtime, one client) for both
    // the mesh and the progress; none outside a cluster.
    let link = if env.namespace.is_some() {
        weft_agent::ApiLink::connect()
            .inspect_err(|why| {
                eprintln!(
                    "weft-trainer worker {worker}: the mesh is followed through its volume only, and progress is not reported to the job's status ({why})"
                )
            })
            .ok()
    } else {
        None
    };
    let mirror = {
        let copy = std::env::temp_dir()
            .join(format!("weft-mesh-{}-{}", env.worker, std::process::id()))
            .join("mesh.json");
        let api = link
            .as_ref()
            .zip(env.namespace.clone())
            .zip(env.mesh_config_map.clone())
            .map(|((link, namespace), name)| (link, namespace, name));
        let worker = worker.clone();
        weft_agent::mirror::MeshMirror::start(env.mesh.clone(), copy.clone(), api, move |line| {
            eprintln!("weft-trainer worker {worker}: {line}")
        })
        .with_context(|| format!("keeping a copy of the mesh at {}", copy.display()))?
    };
    let env = &weft_trainer::pod::PodEnv {
        mesh: mirror.path().to_path_buf(),
        ..env.clone()
    };
    // The pod of rank 0 writes the job's progress into its status; which pod
    // that is can change with the epoch, so the reporter starts the first
    // time this pod runs rank 0.
    let reporter: std::cell::OnceCell<Option<weft_agent::report::StatusReporter>> =
        std::cell::OnceCell::new();
    let start_reporter = || match (&link, &env.namespace, &env.job) {
        (Some(link), Some(namespace), Some(job)) => {
            let worker = worker.clone();
            Some(weft_agent::report::StatusReporter::start(
                link,
                namespace.clone(),
                job.clone(),
                move |line| eprintln!("weft-trainer worker {worker}: {line}"),
            ))
        }
        _ => None,
    };
    let checkpoints = args.checkpoint_dir.clone().unwrap_or_default();
    // The threads relaying rank 0's output, one per epoch it ran here.
    let mut relays: Vec<std::thread::JoinHandle<()>> = Vec::new();
    // SIGTERM (the pod is being deleted): the ranks stop after a checkpoint
    // instead of being killed at the end of the grace period.
    // The ranks' last words, for this worker's life.
    let errors = std::env::temp_dir().join(format!(
        "weft-rank-errors-{}-{}",
        env.worker,
        std::process::id()
    ));
    std::fs::create_dir_all(&errors)
        .with_context(|| format!("creating {} for the ranks' errors", errors.display()))?;
    let result = weft_trainer::pod::supervise(
        env,
        &errors,
        wait_for_epoch,
        stop_asked,
        |rank, place| {
            let threads = (cores / place.ranks.len().max(1)).max(1);
            // The pod's GPUs are its ranks' in order.
            let local_rank = place.ranks.iter().position(|r| *r == rank).unwrap_or(0);
            let config = args
                .settled(place.ranks.len() as u32)
                .and_then(|a| Ok(serde_json::to_string(&a)?))
                .map_err(|e| weft_trainer::pod::PodError::Spawn {
                    rank,
                    reason: e.to_string(),
                })?;
            let mut command = std::process::Command::new(&exe);
            let progress = if rank == 0 {
                reporter
                    .get_or_init(start_reporter)
                    .as_ref()
                    .and_then(|r| r.sender())
            } else {
                None
            };
            if progress.is_some() {
                command.stdout(std::process::Stdio::piped());
            }
            // The reconcile that published the epoch is its ranks' spans'
            // parent (none inherited from anywhere else).
            match &place.trace_parent {
                Some(parent) => command.env(weft_trainer::steptrace::TRACE_PARENT_ENV, parent),
                None => command.env_remove(weft_trainer::steptrace::TRACE_PARENT_ENV),
            };
            let mut child = command
                .arg("train-worker")
                .arg(format!("--rank={rank}"))
                .arg(format!("--world={}", place.world))
                .arg(format!("--port={}", place.port))
                .arg(format!("--store-host={}", place.store_host))
                .arg(format!("--bind-host={}", env.bind_host))
                .arg(format!("--watch-mesh={}", env.mesh.display()))
                .arg(format!("--epoch={}", place.epoch))
                .arg(format!("--threads={threads}"))
                .arg(format!("--local-rank={local_rank}"))
                .arg(format!("--config={config}"))
                .env(
                    weft_trainer::pod::RANK_ERROR_FILE,
                    weft_trainer::pod::rank_error_file(&errors, place.epoch, rank),
                )
                .spawn()
                .map_err(|e| weft_trainer::pod::PodError::Spawn {
                    rank,
                    reason: e.to_string(),
                })?;
            // Rank 0's lines still go to the pod's log; its metrics also go
            // to the job's status.
            if let (Some(out), Some(tx)) = (child.stdout.take(), progress) {
                let checkpoints = checkpoints.clone();
                let epoch = place.epoch;
                relays.push(std::thread::spawn(move || {
                    use std::io::BufRead;
                    for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                        println!("{line}");
                        if let Some(m) = line
                            .strip_prefix(METRICS_PREFIX)
                            .and_then(|body| serde_json::from_str::<StepMetrics>(body).ok())
                        {
                            let _ = tx.send(weft_agent::report::Progress {
                                step: m.step,
                                tokens_per_s: m.tokens_per_s,
                                step_seconds: m.step_time_s,
                                epoch,
                                checkpoint: m.checkpoint.map(|step| {
                                    let dir = weft_trainer::checkpoint::checkpoint_path(
                                        &checkpoints,
                                        step,
                                    );
                                    (step, dir.display().to_string())
                                }),
                            });
                        }
                    }
                }));
            }
            Ok(child)
        },
        |line| eprintln!("weft-trainer worker {worker}: {line}"),
    );
    // Rank 0's last lines (its last step, the checkpoint it stopped with)
    // reach the log and the job's status before the worker ends: its ranks
    // have ended, so each relay ends with their output (bounded all the
    // same: a relay that does not end is not waited for).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for relay in relays {
        while !relay.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if relay.is_finished() {
            let _ = relay.join();
        }
    }
    if let (Some(reporter), Some(link)) = (reporter.into_inner().flatten(), &link) {
        reporter.finish(link);
    }
    let _ = std::fs::remove_dir_all(&errors);
    if result? == weft_trainer::pod::Ended::Stopped {
        eprintln!("weft-trainer worker {worker}: stopped, as asked (SIGTERM)");
        std::process::exit(weft_trainer::pod::TERMINATED_EXIT);
    }
    Ok(())
}

/// Whether the error is a failed collective operation: in a worker, most
/// often the echo of a peer that died, which the launcher then looks past.
fn collective_failed(err: &anyhow::Error) -> bool {
    let category = if let Some(e) = err.downcast_ref::<TrainError>() {
        e.category()
    } else if let Some(e) = err.downcast_ref::<StepError>() {
        e.category()
    } else if let Some(e) = err.downcast_ref::<CommError>() {
        e.category()
    } else {
        return false;
    };
    category == "collective"
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::{Value, json};

    /// Fields of `training.json` that reach the worker, with a value other
    /// than the operator's golden file's.
    fn passed() -> Vec<(&'static str, Value)> {
        vec![
            ("/model/name", json!("custom")),
            ("/model/layers", json!(3)),
            ("/model/hidden", json!(96)),
            ("/model/heads", json!(8)),
            ("/model/kv_heads", json!(1)),
            ("/model/ffn", json!(200)),
            ("/model/vocab", json!(300)),
            ("/data/source", json!("/data/other")),
            ("/data/maxSequenceLength", json!(4096)),
            ("/data/tokensPerStep", json!(65536)),
            ("/data/order", json!("Decomposed")),
            ("/data/minBucketLength", json!(128)),
            ("/data/curriculumSteps", json!(9)),
            ("/parallelism/contextParallelism", json!("Static")),
            ("/parallelism/cpDegree", json!(4)),
            ("/parallelism/maxCpDegree", json!(8)),
            ("/parallelism/hierarchical", json!(false)),
            ("/parallelism/nicAwareRouting", json!(false)),
            ("/parallelism/streamBpChunkTokens", json!(512)),
            ("/checkpoint/path", json!("/ckpt/other")),
            ("/checkpoint/intervalSteps", json!(17)),
            ("/checkpoint/keep", json!(5)),
            ("/data/format", json!("Parquet")),
            ("/data/textField", json!("content")),
            ("/data/tokenizer", json!("/tokenizers/other")),
        ]
    }

    /// Fields of a job that starts from a Hugging Face checkpoint, with a
    /// value other than [`pretrained_base`]'s.
    fn passed_pretrained(dir: &Path) -> Vec<(&'static str, Value)> {
        vec![
            (
                "/pretrained/checkpoint",
                json!(dir.join("other").display().to_string()),
            ),
            ("/pretrained/rope/rope_type", json!("linear")),
            ("/pretrained/rope/factor", json!(4.0)),
            (
                "/pretrained/output",
                json!(dir.join("elsewhere").display().to_string()),
            ),
        ]
    }

    /// A Hugging Face model directory as a worker's settings read it (its
    /// config and tokenizer; no weights, which the ranks read).
    fn tiny_hf_model(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let config = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
            "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "eos_token_id": 2, "tie_word_embeddings": false,
        });
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "a": 1, "</s>": 2},
                      "unk_token": "[UNK]"},
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    }

    /// The golden file with a job that starts from a checkpoint in `dir`.
    fn pretrained_base(dir: &Path) -> Value {
        tiny_hf_model(&dir.join("model"));
        tiny_hf_model(&dir.join("other"));
        let mut base = golden();
        base["version"] = json!(2);
        base.as_object_mut().unwrap().remove("model");
        base["pretrained"] = json!({
            "checkpoint": dir.join("model").display().to_string(),
            "rope": {"rope_type": "yarn", "factor": 2.0},
            "output": dir.join("out").display().to_string(),
        });
        base["data"]["maxSequenceLength"] = json!(128);
        base["data"]["tokensPerStep"] = json!(256);
        base
    }

    /// Fields of `training.json` the worker has no use for, and why.
    const NOT_FOR_THE_WORKER: &[(&str, &str)] = &[
        ("/version", "the file's format, checked when it is read"),
        (
            "/checkpoint/claimName",
            "the operator mounts the claim at checkpoint.path",
        ),
    ];

    fn golden() -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../operator/tests/golden/training.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// What the worker runs for `training` with its default flags: the
    /// run's configuration, or the error that refuses it (a refusal by name
    /// is taking effect too).
    fn runs_for(training: &Value) -> String {
        let training: weft_crds::worker::TrainingParameters =
            serde_json::from_value(training.clone()).unwrap();
        let Command::Worker { steps, run, .. } =
            Cli::try_parse_from(["weft-trainer", "worker", "--device", "cpu"])
                .unwrap()
                .command
        else {
            unreachable!("parsed as the worker")
        };
        match job_args(&training, steps, run, (None, None)) {
            Ok(args) => format!("{:?}", args.config(1).map_err(|e| e.to_string())),
            Err(refused) => format!("Err({refused:#})"),
        }
    }

    /// A worker takes its run's settings whole, as `local` wrote them: the
    /// flags' defaults are the only ones (a field missing from the JSON is
    /// refused, never filled in with a second default), and every choice
    /// travels as itself.
    #[test]
    fn a_workers_settings_travel_whole_with_the_flags_defaults_alone() {
        let Command::Local { train, .. } = Cli::try_parse_from([
            "weft-trainer",
            "local",
            "--data-format=jsonl",
            "--data-order=decomposed",
            "--strategy=flexsp",
            "--device=cpu",
            "--collectives=gloo",
            "--precision=bf16",
        ])
        .unwrap()
        .command
        else {
            unreachable!("parsed as local")
        };
        let json = serde_json::to_value(&*train).unwrap();
        let back: TrainArgs = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        assert_eq!(back.data_format, DataFormat::JsonLines);
        assert_eq!(back.data_order, weft_crds::DataOrder::Decomposed);
        assert_eq!(back.strategy, Strategy::FlexSp);
        assert_eq!(back.run.device, DeviceChoice::Cpu);
        assert_eq!(back.run.collectives, CollectivesChoice::Gloo);
        assert_eq!(back.run.precision, Some(Precision::Bf16));
        for field in [
            "steps",
            "text_field",
            "data_format",
            "bucket_min",
            "checkpoint_keep",
        ] {
            let mut missing = json.clone();
            missing.as_object_mut().unwrap().remove(field);
            let err = serde_json::from_value::<TrainArgs>(missing).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        for field in ["device", "collectives", "plan_svg_every"] {
            let mut missing = json.clone();
            missing.as_object_mut().unwrap().remove(field);
            assert!(
                serde_json::from_value::<TrainArgs>(missing).is_err(),
                "{field}"
            );
        }
    }

    /// Every leaf of `value`, as JSON pointers.
    fn leaves(value: &Value, at: &str, out: &mut Vec<String>) {
        match value.as_object() {
            Some(map) => {
                for (key, child) in map {
                    leaves(child, &format!("{at}/{key}"), out);
                }
            }
            None => out.push(at.to_string()),
        }
    }

    /// Every field the operator can put in `training.json` (each optional
    /// one set) is either passed on to the worker or named as not for it;
    /// a new field fails here until it is one or the other.
    #[test]
    fn every_field_of_training_json_is_accounted_for() {
        let mut full = golden();
        full["data"] = serde_json::to_value(weft_crds::DataSpec::default()).unwrap();
        full["parallelism"] = serde_json::to_value(weft_crds::ParallelismSpec {
            cp_degree: Some(1),
            max_cp_degree: Some(1),
            stream_bp_chunk_tokens: Some(1),
            ..Default::default()
        })
        .unwrap();
        full["checkpoint"] = serde_json::to_value(weft_crds::CheckpointSpec {
            claim_name: Some("claim".into()),
            ..Default::default()
        })
        .unwrap();
        full["data"] = serde_json::to_value(weft_crds::DataSpec {
            format: weft_crds::DataFormat::Parquet,
            text_field: "content".into(),
            tokenizer: Some("/tokenizer".into()),
            ..Default::default()
        })
        .unwrap();
        full["pretrained"] = json!({
            "checkpoint": "/model",
            "rope": {"rope_type": "yarn", "factor": 2.0},
            "output": "/out",
        });
        let mut found = Vec::new();
        leaves(&full, "", &mut found);
        let known: Vec<String> = passed()
            .into_iter()
            .chain(passed_pretrained(Path::new("/")))
            .map(|(p, _)| p.to_string())
            .chain(NOT_FOR_THE_WORKER.iter().map(|(p, _)| p.to_string()))
            .collect();
        let unknown: Vec<&String> = found.iter().filter(|f| !known.contains(f)).collect();
        assert!(
            unknown.is_empty(),
            "fields the worker neither uses nor declares unused: {unknown:?}"
        );
        let gone: Vec<&String> = known.iter().filter(|k| !found.contains(k)).collect();
        assert!(
            gone.is_empty(),
            "listed fields the file no longer has: {gone:?}"
        );
    }

    #[test]
    fn every_job_field_changes_what_a_worker_runs() {
        let base = golden();
        let runs = runs_for(&base);
        assert!(runs.starts_with("Ok("), "{runs}");
        let set = |json: &mut Value, pointer: &str, value: &Value| {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            json.pointer_mut(parent).unwrap()[key] = value.clone();
        };
        for (pointer, value) in passed() {
            // The buckets of Dataset Decomposition matter with its order.
            let mut base = base.clone();
            if pointer == "/data/minBucketLength" || pointer == "/data/curriculumSteps" {
                set(&mut base, "/data/order", &json!("Decomposed"));
            }
            let runs = runs_for(&base);
            assert!(runs.starts_with("Ok("), "{runs}");
            let mut changed = base.clone();
            set(&mut changed, pointer, &value);
            assert_ne!(
                runs_for(&changed),
                runs,
                "{pointer} = {value} changes nothing the worker runs"
            );
        }
        // A job that starts from a checkpoint: its rotary settings, its
        // output and the checkpoint itself each change the run.
        let dir = std::env::temp_dir().join(format!("weft-job-fields-{}", std::process::id()));
        let base = pretrained_base(&dir);
        let runs = runs_for(&base);
        assert!(runs.starts_with("Ok("), "{runs}");
        for (pointer, value) in passed_pretrained(&dir) {
            let mut changed = base.clone();
            set(&mut changed, pointer, &value);
            let now = runs_for(&changed);
            assert!(now.starts_with("Ok("), "{pointer} = {value}: {now}");
            assert_ne!(
                now, runs,
                "{pointer} = {value} changes nothing the worker runs"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `worker --save` repeats the job's model.output or is refused, and
    /// needs a job that starts from a checkpoint; `--model` repeats its
    /// model.checkpoint.
    #[test]
    fn worker_save_agrees_with_the_jobs_output() {
        let dir = std::env::temp_dir().join(format!("weft-worker-save-{}", std::process::id()));
        let base: weft_crds::worker::TrainingParameters =
            serde_json::from_value(pretrained_base(&dir)).unwrap();
        let run = || {
            let Command::Worker { run, .. } = Cli::try_parse_from(["weft-trainer", "worker"])
                .unwrap()
                .command
            else {
                unreachable!("parsed as the worker")
            };
            run
        };
        let output = PathBuf::from(base.pretrained.as_ref().unwrap().output.clone().unwrap());
        let same = job_args(&base, 1, run(), (Some(output.clone()), None)).unwrap();
        assert_eq!(same.save, Some(output));
        let err = job_args(&base, 1, run(), (Some(dir.join("x")), None)).unwrap_err();
        assert!(
            err.to_string()
                .contains("differs from the job's model.output"),
            "{err}"
        );
        let plain: weft_crds::worker::TrainingParameters =
            serde_json::from_value(golden()).unwrap();
        let err = job_args(&plain, 1, run(), (Some(dir.join("x")), None)).unwrap_err();
        assert!(err.to_string().contains("spec.model.checkpoint"), "{err}");
        // --model repeats the job's checkpoint, or is refused.
        let checkpoint = PathBuf::from(&base.pretrained.as_ref().unwrap().checkpoint);
        let same = job_args(&base, 1, run(), (None, Some(checkpoint.clone()))).unwrap();
        assert_eq!(same.model, checkpoint.display().to_string());
        let err = job_args(&base, 1, run(), (None, Some(dir.join("y")))).unwrap_err();
        assert!(
            err.to_string()
                .contains("differs from the job's model.checkpoint"),
            "{err}"
        );
        let err = job_args(&plain, 1, run(), (None, Some(dir.join("y")))).unwrap_err();
        assert!(
            err.to_string().contains("a pod trains its job's model"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
