//! Checkpoints: one directory per step (`step-00000123`) under a root that
//! one run owns at a time.
//!
//! A checkpoint is written whole or not at all: its files go into a staging
//! directory, are synced, listed with their sizes and SHA-256 sums in
//! `manifest.json`, and only then is the directory renamed to its final name.
//! A failed write removes the staging directory. Before writing, the free
//! space is compared with what the checkpoint needs; when it is short, the
//! oldest checkpoints go first (one intact checkpoint always stays), and if
//! that is not enough the write is refused with both figures.
//!
//! On resume every file is checked against the manifest before it is
//! trusted: a checkpoint that fails is refused by name, and the newest intact
//! one is used instead ([`latest_intact`]). The manifest's sums are those of
//! `sha256sum`, so a checkpoint can also be checked by hand.
//!
//! The root is locked while a run writes into it ([`CheckpointLock`]): an
//! advisory lock on `.lock`, which names the owner, so a second run is refused
//! instead of writing under the same names.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;
use weft_planner::model::ModelSpec;

use crate::decompose::{DataOrder, DecompositionCursor};

/// The files of a checkpoint directory: the model (weft's own names), or,
/// for a run of a Hugging Face model, the model as that model's directory
/// in `model/` (`config.json`, safetensors shards, the tokenizer's files),
/// which `transformers` loads unchanged.
pub const MODEL_FILE: &str = "model.safetensors";
pub const HF_MODEL_DIR: &str = "model";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const MANIFEST_FILE: &str = "manifest.json";
/// The lock file in the root.
pub const LOCK_FILE: &str = ".lock";

/// What went wrong with a checkpoint or its directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("checkpoint {path} is refused: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Mismatch { path: PathBuf, reason: String },
    #[error(
        "no intact checkpoint in {root}; every one was refused: {}",
        refused.join("; ")
    )]
    NoneIntact { root: PathBuf, refused: Vec<String> },
    #[error(
        "the checkpoint directory {path} is in use by another run ({owner}): two runs in one directory overwrite each other's checkpoints; give this run a checkpoint directory of its own, or stop the other"
    )]
    Locked { path: PathBuf, owner: String },
    #[error("the checkpoint directory {path} cannot be written: {reason}")]
    Unwritable { path: PathBuf, reason: String },
    #[error(
        "not enough space in {path} for the checkpoint of step {step}: it needs {} ({needed} bytes), {} ({available} bytes) are free{}; free space there or point the checkpoints elsewhere",
        human_bytes(*needed),
        human_bytes(*available),
        match at_most {
            Some(most) if *most > *available => format!(
                ", and no more than {} with every checkpoint but the newest deleted",
                human_bytes(*most)
            ),
            _ => String::new(),
        }
    )]
    NoSpace {
        path: PathBuf,
        step: u64,
        needed: u64,
        available: u64,
        /// Free bytes if every checkpoint but the newest were deleted.
        at_most: Option<u64>,
    },
    #[error(
        "step {step}: parameter {parameter} holds {count} values that are NaN or infinite; no checkpoint of it is written and training stops"
    )]
    NonFinite {
        step: u64,
        parameter: String,
        count: i64,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl CheckpointError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            CheckpointError::Io { .. } | CheckpointError::Write { .. } => "checkpoint",
            CheckpointError::Corrupt { .. } | CheckpointError::NoneIntact { .. } => {
                "checkpoint_corrupt"
            }
            CheckpointError::Mismatch { .. } => "checkpoint_mismatch",
            CheckpointError::Locked { .. } => "checkpoint_locked",
            CheckpointError::Unwritable { .. } => "checkpoint_unwritable",
            CheckpointError::NoSpace { .. } => "checkpoint_space",
            CheckpointError::NonFinite { .. } => "non_finite",
            CheckpointError::Torch(_) => "torch",
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `bytes` for people: KiB, MiB or GiB with one decimal.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    const KIB: f64 = 1024.0;
    if b >= KIB * KIB * KIB {
        format!("{:.1} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.1} KiB", b / KIB)
    }
}

/// What a checkpoint's `state.json` holds besides the tensors: where the run
/// stands, and everything its data order depends on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointState {
    /// Steps completed.
    pub step: u64,
    /// The next global sample: the data order continues from here whatever
    /// the new world size.
    pub next_sample: u64,
    pub seed: u64,
    pub model: ModelSpec,
    /// World size when it was written (for information: any world may resume).
    pub world: u32,
    /// How the batches were drawn; a run resumes only in the same order.
    #[serde(default = "whole_documents")]
    pub data_order: DataOrder,
    /// Where Dataset Decomposition's buckets stand, when the order is that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buckets: Option<DecompositionCursor>,
    /// SHA-256 of the corpus's documents, in order ([`crate::data::Corpus::digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus_digest: Option<String>,
    /// The batch settings the data order depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_step: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seq_len: Option<usize>,
    /// The model's architecture beyond its shapes (rotary settings, norms,
    /// biases, tied embeddings); absent in checkpoints of an older weft.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<crate::model::Architecture>,
}

fn whole_documents() -> DataOrder {
    DataOrder::Documents
}

/// What a run's data order depends on, to compare with a checkpoint's.
#[derive(Clone, Debug, PartialEq)]
pub struct DataIdentity {
    pub seed: u64,
    pub corpus_digest: String,
    pub tokens_per_step: usize,
    pub max_seq_len: usize,
    pub data_order: DataOrder,
}

impl CheckpointState {
    /// How resuming this checkpoint with `run` would change the batches it
    /// draws: one phrase per setting that differs (none: "exactly the next
    /// batch"). Settings a checkpoint of an older weft did not record are not
    /// compared; the kind of data order is not either (another kind has no
    /// cursor to continue from at all, which is refused on its own).
    pub fn data_changes(&self, run: &DataIdentity) -> Vec<String> {
        let mut changes = Vec::new();
        if self.seed != run.seed {
            changes.push(format!(
                "the seed was {}, this run's is {} (--seed)",
                self.seed, run.seed
            ));
        }
        if let Some(digest) = &self.corpus_digest
            && *digest != run.corpus_digest
        {
            changes.push(format!(
                "the corpus differs (SHA-256 {} then, {} now; --data)",
                short(digest),
                short(&run.corpus_digest)
            ));
        }
        if let Some(tokens) = self.tokens_per_step
            && tokens != run.tokens_per_step
        {
            changes.push(format!(
                "--tokens-per-step was {tokens}, this run's is {}",
                run.tokens_per_step
            ));
        }
        if let Some(longest) = self.max_seq_len
            && longest != run.max_seq_len
        {
            changes.push(format!(
                "--max-seq-len was {longest}, this run's is {}",
                run.max_seq_len
            ));
        }
        changes
    }
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// One file of a checkpoint as its manifest lists it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileSum {
    pub bytes: u64,
    pub sha256: String,
}

/// `manifest.json`: every other file of a checkpoint, with its size and sum.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub step: u64,
    pub files: BTreeMap<String, FileSum>,
}

/// The SHA-256 of a file (hex) and its size, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> Result<FileSum, std::io::Error> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The directory of the checkpoint after `step` under `root`.
pub fn checkpoint_path(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The checkpoints under `root` by their final names, oldest first: (step,
/// directory). Whether each is intact is [`verify`]'s to say.
pub fn checkpoints(root: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let path = entry.map_err(io(root))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step
            && path.is_dir()
        {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// A checkpoint [`verify`] accepts.
#[derive(Clone, Debug, PartialEq)]
pub struct Verified {
    pub state: CheckpointState,
    /// False for a checkpoint written before weft kept manifests: its files
    /// could not be checked (it is used, and the run says so).
    pub checked: bool,
}

/// Checks every file of the checkpoint in `dir` against its manifest and
/// returns its state; the reason it is not intact otherwise. A checkpoint
/// with no manifest at all is one an older weft wrote (a checkpoint is
/// renamed to its final name only after its manifest is written): it is
/// accepted unchecked when its files are there.
pub fn verify(dir: &Path) -> Result<Verified, String> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let checked = manifest_path.exists();
    let manifest_step = if checked {
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| format!("its {MANIFEST_FILE} cannot be read ({e})"))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| format!("its {MANIFEST_FILE} is not valid ({e})"))?;
        for required in [OPTIMIZER_FILE, STATE_FILE] {
            if !manifest.files.contains_key(required) {
                return Err(format!("its manifest does not list {required}"));
            }
        }
        let hf_config = format!("{HF_MODEL_DIR}/config.json");
        if !manifest.files.contains_key(MODEL_FILE) && !manifest.files.contains_key(&hf_config) {
            return Err(format!(
                "its manifest lists no model ({MODEL_FILE} or {HF_MODEL_DIR}/)"
            ));
        }
        for (name, want) in &manifest.files {
            let got = sha256_file(&dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
            if got.bytes != want.bytes {
                return Err(format!(
                    "{name} holds {} bytes, its manifest says {}",
                    got.bytes, want.bytes
                ));
            }
            if got.sha256 != want.sha256 {
                return Err(format!(
                    "{name} does not match its SHA-256 in the manifest (the file was changed or damaged)"
                ));
            }
        }
        Some(manifest.step)
    } else {
        for required in [MODEL_FILE, OPTIMIZER_FILE, STATE_FILE] {
            if !dir.join(required).is_file() {
                return Err(format!("it has neither a {MANIFEST_FILE} nor a {required}"));
            }
        }
        None
    };
    let state = read_state(dir)?;
    if manifest_step.is_some_and(|step| step != state.step) {
        return Err(format!(
            "its state is of step {}, its manifest of step {}",
            state.step,
            manifest_step.unwrap_or_default()
        ));
    }
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse::<u64>().ok());
    if named.is_some_and(|step| step != state.step) {
        return Err(format!(
            "its directory is named for step {}, its state is of step {}",
            named.unwrap_or_default(),
            state.step
        ));
    }
    Ok(Verified { state, checked })
}

/// The state of the checkpoint in `dir` (its `state.json`), unchecked
/// against its manifest ([`verify`] checks it), or why it cannot be read.
pub fn read_state(dir: &Path) -> Result<CheckpointState, String> {
    let state = std::fs::read_to_string(dir.join(STATE_FILE)).map_err(|e| e.to_string())?;
    serde_json::from_str(&state).map_err(|e| format!("its {STATE_FILE} is not valid ({e})"))
}

/// The newest intact checkpoint, and those newer than it that were refused.
#[derive(Debug)]
pub struct Intact {
    pub dir: PathBuf,
    pub state: CheckpointState,
    /// Whether its files were checked against a manifest ([`Verified`]).
    pub checked: bool,
    /// Newer checkpoints that failed [`verify`]: (directory, reason).
    pub refused: Vec<(PathBuf, String)>,
}

/// The newest checkpoint under `root` that [`verify`] accepts. `None` when
/// `root` holds no checkpoint at all; an error naming each one when it holds
/// some but none is intact (starting over would lose them all silently).
pub fn latest_intact(root: &Path) -> Result<Option<Intact>, CheckpointError> {
    let mut refused = Vec::new();
    for (_, dir) in checkpoints(root)?.into_iter().rev() {
        match verify(&dir) {
            Ok(Verified { state, checked }) => {
                return Ok(Some(Intact {
                    dir,
                    state,
                    checked,
                    refused,
                }));
            }
            Err(reason) => refused.push((dir, reason)),
        }
    }
    if refused.is_empty() {
        return Ok(None);
    }
    Err(CheckpointError::NoneIntact {
        root: root.to_path_buf(),
        refused: refused
            .iter()
            .map(|(dir, reason)| format!("{}: {reason}", dir.display()))
            .collect(),
    })
}

/// Moves refused checkpoints out of the way (`step-N` to `.step-N.refused`,
/// kept for a person to look at): a refused checkpoint newer than the one a
/// run resumes from would otherwise be taken for the newest and outlive the
/// checkpoints the run writes. Only the owner of the lock may call this.
pub fn set_aside(_lock: &CheckpointLock, refused: &[PathBuf]) -> Result<(), CheckpointError> {
    for dir in refused {
        let Some(name) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
            continue;
        };
        let aside = dir.with_file_name(format!(".{name}.refused"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(dir, &aside).map_err(io(dir))?;
    }
    Ok(())
}

/// Fails with the first parameter that holds a NaN or an infinity: a
/// checkpoint of such weights would only resume into garbage.
pub fn check_finite(step: u64, params: &[(String, Tensor)]) -> Result<(), CheckpointError> {
    for (name, p) in params {
        let bad = p.f_isfinite()?.f_logical_not()?.f_sum(tch::Kind::Int64)?;
        let count = bad.f_int64_value(&[])?;
        if count > 0 {
            return Err(CheckpointError::NonFinite {
                step,
                parameter: name.clone(),
                count,
            });
        }
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the file system of `path`.
pub fn free_bytes(path: &Path) -> Result<u64, CheckpointError> {
    let stat = rustix::fs::statvfs(path).map_err(|e| CheckpointError::Io {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Which of `existing` checkpoints (oldest first, with their sizes) to delete
/// before writing one of `needed` bytes with `available` free: the oldest,
/// until it fits, never the newest. `Err(available after all those)` when even
/// that is not enough.
pub fn make_room(needed: u64, available: u64, existing: &[u64]) -> Result<usize, u64> {
    let mut free = available;
    let mut pruned = 0;
    while free < needed && pruned + 1 < existing.len() {
        free = free.saturating_add(existing[pruned]);
        pruned += 1;
    }
    if free >= needed {
        Ok(pruned)
    } else {
        Err(free)
    }
}

/// Bytes of the files under `dir`, its subdirectories included (a Hugging
/// Face run's `model/`).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_file() => m.len(),
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// What writing one checkpoint takes.
#[derive(Debug)]
pub struct SaveRequest<'a> {
    pub root: &'a Path,
    pub state: &'a CheckpointState,
    /// Checkpoints to keep after this one is written (at least 1).
    pub keep: usize,
    /// Bytes the tensors take in memory: the size of the checkpoint, bar
    /// headers, when none was written before to measure.
    pub tensor_bytes: u64,
}

/// Writes the checkpoint of `request.state.step` with `write_tensors`
/// (which writes the model and optimizer files into the directory it is
/// given), then deletes all but the newest `keep`. The checkpoint is whole
/// or absent: on any failure the staging directory is removed. Returns the
/// final directory.
pub fn save(
    request: &SaveRequest<'_>,
    write_tensors: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<PathBuf, CheckpointError> {
    let SaveRequest {
        root,
        state,
        keep,
        tensor_bytes,
    } = *request;
    let step = state.step;
    std::fs::create_dir_all(root).map_err(io(root))?;
    let existing = checkpoints(root)?;
    let sizes: Vec<u64> = existing.iter().map(|(_, d)| dir_bytes(d)).collect();
    // Headers and state are small; the newest checkpoint's size is the best
    // estimate of the next one's.
    let needed = sizes
        .last()
        .copied()
        .unwrap_or(0)
        .max(tensor_bytes + tensor_bytes / 100 + (64 << 10));
    let available = free_bytes(root)?;
    let no_space = |available: u64, at_most: Option<u64>| CheckpointError::NoSpace {
        path: root.to_path_buf(),
        step,
        needed,
        available,
        at_most,
    };
    match make_room(needed, available, &sizes) {
        Ok(pruned) => {
            for (_, dir) in existing.iter().take(pruned) {
                std::fs::remove_dir_all(dir).map_err(io(dir))?;
            }
        }
        // Nothing is deleted for a write that cannot fit anyway.
        Err(at_most) => return Err(no_space(available, Some(at_most))),
    }

    let dir = checkpoint_path(root, step);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".to_string());
    let staging = root.join(format!(".{name}.writing"));
    let written = write_staging(&staging, state, write_tensors);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        // A write that failed for want of space says how much is needed.
        let free = free_bytes(root).unwrap_or(u64::MAX);
        if free < needed {
            return Err(no_space(free, None));
        }
        return Err(e);
    }
    let old = root.join(format!(".{name}.old"));
    let _ = std::fs::remove_dir_all(&old);
    if dir.exists() {
        std::fs::rename(&dir, &old).map_err(io(&dir))?;
    }
    std::fs::rename(&staging, &dir).map_err(io(&dir))?;
    let _ = std::fs::remove_dir_all(&old);
    sync_dir(root);
    crate::fault::reached("checkpoint-renamed");
    prune(root, keep.max(1))?;
    Ok(dir)
}

/// The checkpoint's files in `staging`, each synced, and its manifest last.
fn write_staging(
    staging: &Path,
    state: &CheckpointState,
    write_tensors: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), CheckpointError> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging).map_err(io(staging))?;
    crate::fault::reached("checkpoint-dir");
    write_tensors(staging).map_err(|reason| CheckpointError::Write {
        path: staging.to_path_buf(),
        reason,
    })?;
    crate::fault::reached("checkpoint-tensors");
    let json = serde_json::to_string_pretty(state).map_err(|e| CheckpointError::Write {
        path: staging.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_synced(&staging.join(STATE_FILE), json.as_bytes())?;
    // Every file written, the model's directory of a Hugging Face run
    // included, by its path inside the checkpoint.
    let mut files = BTreeMap::new();
    for name in files_under(staging, "").map_err(io(staging))? {
        let path = staging.join(&name);
        File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        files.insert(name, sha256_file(&path).map_err(io(&path))?);
    }
    for required in [OPTIMIZER_FILE, STATE_FILE] {
        if !files.contains_key(required) {
            return Err(CheckpointError::Write {
                path: staging.to_path_buf(),
                reason: format!("{required} was not written"),
            });
        }
    }
    crate::fault::reached("checkpoint-sums");
    let manifest = Manifest {
        step: state.step,
        files,
    };
    let json = serde_json::to_string_pretty(&manifest).map_err(|e| CheckpointError::Write {
        path: staging.to_path_buf(),
        reason: e.to_string(),
    })?;
    write_synced(&staging.join(MANIFEST_FILE), json.as_bytes())?;
    sync_dir(staging);
    crate::fault::reached("checkpoint-manifest");
    Ok(())
}

/// The regular files under `dir`, as paths relative to it joined by `/`
/// (after `prefix`), in a sorted order.
fn files_under(dir: &Path, prefix: &str) -> Result<Vec<String>, std::io::Error> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            out.extend(files_under(&entry.path(), &format!("{name}/"))?);
        } else if kind.is_file() {
            out.push(name);
        }
    }
    Ok(out)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut file = File::create(path).map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Makes a directory's entries (a rename) durable; best effort, as some
/// file systems cannot sync a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Deletes all but the newest `keep` checkpoints under `root`.
pub fn prune(root: &Path, keep: usize) -> Result<(), CheckpointError> {
    let all = checkpoints(root)?;
    let excess = all.len().saturating_sub(keep);
    for (_, dir) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    }
    Ok(())
}

/// Puts right what writers that died left under `root`: a replaced
/// checkpoint (`.step-N.old`) whose replacement never got its name is
/// restored, a staged one (`.step-N.writing`) that is complete and intact
/// takes its final name, and the rest is deleted. Only the owner of the lock
/// may call this.
pub fn clear_dead_writes(_lock: &CheckpointLock, root: &Path) -> Result<(), CheckpointError> {
    let mut leftovers: Vec<(PathBuf, String)> = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let path = entry.map_err(io(root))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(name) = name
            && name.starts_with(".step-")
            && (name.ends_with(".writing") || name.ends_with(".old"))
            && path.is_dir()
        {
            leftovers.push((path, name));
        }
    }
    // `.old` first: a restored checkpoint is the one a staged copy of the
    // same step must not replace.
    leftovers.sort_by_key(|(_, name)| !name.ends_with(".old"));
    for (path, name) in leftovers {
        let final_name = name
            .trim_start_matches('.')
            .trim_end_matches(".writing")
            .trim_end_matches(".old")
            .to_string();
        let target = root.join(&final_name);
        let usable =
            !target.exists() && (name.ends_with(".old") || verify(&path).is_ok_and(|v| v.checked));
        if usable {
            std::fs::rename(&path, &target).map_err(io(&path))?;
        } else {
            std::fs::remove_dir_all(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Checks, before a run starts, that checkpoints can be written under
/// `root`: creates it, then writes, renames and deletes a probe file there,
/// as a checkpoint does.
pub fn probe_writable(root: &Path) -> Result<(), CheckpointError> {
    let unwritable = |what: &str, e: std::io::Error| CheckpointError::Unwritable {
        path: root.to_path_buf(),
        reason: format!("{what}: {e}"),
    };
    if root.exists() && !root.is_dir() {
        return Err(CheckpointError::Unwritable {
            path: root.to_path_buf(),
            reason: "it is not a directory".to_string(),
        });
    }
    std::fs::create_dir_all(root).map_err(|e| unwritable("creating it", e))?;
    // Unique across the pods that probe one shared volume at once (each
    // pod's worker may be process 1).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tag = format!("{}-{}-{nanos}", hostname(), std::process::id());
    let probe = root.join(format!(".probe-{tag}"));
    let renamed = root.join(format!(".probe-{tag}.renamed"));
    std::fs::write(&probe, b"weft").map_err(|e| unwritable("writing a file", e))?;
    let renaming = std::fs::rename(&probe, &renamed);
    if let Err(e) = renaming {
        let _ = std::fs::remove_file(&probe);
        return Err(unwritable("renaming a file", e));
    }
    std::fs::remove_file(&renamed).map_err(|e| unwritable("deleting a file", e))
}

/// The advisory lock a run holds on its checkpoint root while it writes
/// there; released when dropped (or when the process ends, however it ends).
#[derive(Debug)]
pub struct CheckpointLock {
    _file: File,
    /// Why the file system gave no lock (it does not support one, as some
    /// network and FUSE file systems): the run goes on unguarded.
    pub unsupported: Option<String>,
}

impl CheckpointLock {
    /// Takes the lock on `root`, waiting up to `wait` for a run that is
    /// ending (a rank of the previous mesh epoch) to let go; refuses with the
    /// owner's identity after that.
    pub fn acquire(root: &Path, wait: Duration) -> Result<CheckpointLock, CheckpointError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let path = root.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::Error(e)) if lock_unsupported(&e) => {
                    return Ok(CheckpointLock {
                        _file: file,
                        unsupported: Some(e.to_string()),
                    });
                }
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(CheckpointError::Locked {
                        path: root.to_path_buf(),
                        owner: lock_owner(root),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(io(&path)(e)),
            }
        }
        let identity = format!(
            "process {} on {}, since {} (Unix time)\n",
            std::process::id(),
            hostname(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        );
        file.set_len(0).map_err(io(&path))?;
        file.write_all(identity.as_bytes()).map_err(io(&path))?;
        Ok(CheckpointLock {
            _file: file,
            unsupported: None,
        })
    }

    /// Whether another process holds the lock on `root` now (for a check
    /// before a run starts; the run itself takes the lock).
    pub fn check_free(root: &Path) -> Result<(), CheckpointError> {
        let path = root.join(LOCK_FILE);
        let Ok(file) = File::open(&path) else {
            return Ok(());
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => Err(CheckpointError::Locked {
                path: root.to_path_buf(),
                owner: lock_owner(root),
            }),
            Err(std::fs::TryLockError::Error(e)) if lock_unsupported(&e) => Ok(()),
            Err(std::fs::TryLockError::Error(e)) => Err(io(&path)(e)),
        }
    }
}

/// Whether `e` says the file system has no locks (rather than that the
/// lock could not be taken).
fn lock_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(
            e.raw_os_error(),
            Some(code) if code == rustix::io::Errno::NOLCK.raw_os_error()
                || code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
                || code == rustix::io::Errno::NOSYS.raw_os_error()
        )
}

/// Who holds the lock on `root`, as the holder wrote it.
fn lock_owner(root: &Path) -> String {
    std::fs::read_to_string(root.join(LOCK_FILE))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "an unnamed process".to_string())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "an unknown host".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("weft-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            step,
            next_sample: step * 3,
            seed: 0,
            model: ModelSpec::preset("tiny").unwrap(),
            world: 2,
            data_order: DataOrder::Documents,
            buckets: None,
            corpus_digest: Some("ab".repeat(32)),
            tokens_per_step: Some(4096),
            max_seq_len: Some(1024),
            architecture: Some(crate::model::Architecture::default()),
        }
    }

    fn write(root: &Path, step: u64, keep: usize) -> PathBuf {
        save(
            &SaveRequest {
                root,
                state: &state(step),
                keep,
                tensor_bytes: 1024,
            },
            |dir| {
                std::fs::write(dir.join(MODEL_FILE), format!("model {step}")).unwrap();
                std::fs::write(dir.join(OPTIMIZER_FILE), vec![7u8; 4096]).unwrap();
                Ok(())
            },
        )
        .unwrap()
    }

    #[test]
    fn the_newest_checkpoints_are_kept_and_listed_oldest_first() {
        let root = scratch("keep");
        for step in [2u64, 10, 4, 8, 6] {
            write(&root, step, 10);
        }
        // Being written (not yet renamed), and a stray file: not checkpoints.
        std::fs::create_dir_all(root.join(".step-00000012.writing")).unwrap();
        std::fs::write(root.join("step-00000014"), "a file").unwrap();
        let steps = |root: &Path| -> Vec<u64> {
            checkpoints(root)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        assert_eq!(steps(&root), vec![2, 4, 6, 8, 10]);
        prune(&root, 3).unwrap();
        assert_eq!(steps(&root), vec![6, 8, 10]);
        assert!(root.join(".step-00000012.writing").exists());
        assert_eq!(
            checkpoint_path(&root, 10).file_name().unwrap(),
            "step-00000010"
        );
        assert!(checkpoints(&root.join("absent")).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_damaged_file_is_refused_by_name_and_the_newest_intact_one_is_used() {
        let root = scratch("verify");
        write(&root, 1, 5);
        let second = write(&root, 2, 5);
        assert_eq!(
            verify(&second).unwrap(),
            Verified {
                state: state(2),
                checked: true
            }
        );
        // One kilobyte of 0xFF inside the optimizer state.
        let optimizer = second.join(OPTIMIZER_FILE);
        let mut bytes = std::fs::read(&optimizer).unwrap();
        bytes[1024..2048].fill(0xFF);
        std::fs::write(&optimizer, bytes).unwrap();
        let reason = verify(&second).unwrap_err();
        assert!(reason.contains(OPTIMIZER_FILE), "{reason}");
        let intact = latest_intact(&root).unwrap().unwrap();
        assert_eq!(intact.state.step, 1);
        assert_eq!(intact.refused.len(), 1);
        assert_eq!(intact.refused[0].0, second);

        // A truncated file: refused too; with none intact, resuming is an
        // error that names each.
        let first = checkpoint_path(&root, 1);
        std::fs::write(first.join(MODEL_FILE), "mod").unwrap();
        assert!(verify(&first).unwrap_err().contains("bytes"));
        let err = latest_intact(&root).unwrap_err();
        assert_eq!(err.category(), "checkpoint_corrupt");
        let text = err.to_string();
        assert!(
            text.contains("step-00000001") && text.contains("step-00000002"),
            "{text}"
        );
        let empty = scratch("verify-empty");
        assert!(latest_intact(&empty).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&empty);
    }

    #[test]
    fn a_checkpoint_of_an_older_weft_is_used_unchecked_and_a_misnamed_one_refused() {
        let root = scratch("older");
        let dir = write(&root, 3, 5);
        // Written before manifests: no manifest.json, every other file there.
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        let verified = verify(&dir).unwrap();
        assert!(!verified.checked);
        assert_eq!(verified.state.step, 3);
        let intact = latest_intact(&root).unwrap().unwrap();
        assert!(!intact.checked);
        std::fs::remove_file(dir.join(MODEL_FILE)).unwrap();
        assert!(verify(&dir).unwrap_err().contains(MODEL_FILE));
        // A checkpoint under another step's name.
        let other = write(&root, 4, 5);
        let misnamed = root.join("step-00000009");
        std::fs::rename(&other, &misnamed).unwrap();
        let reason = verify(&misnamed).unwrap_err();
        assert!(reason.contains("named for step 9"), "{reason}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn refused_checkpoints_are_set_aside_and_dead_writes_put_right() {
        let root = scratch("aside");
        write(&root, 1, 5);
        let second = write(&root, 2, 5);
        let lock = CheckpointLock::acquire(&root, Duration::ZERO).unwrap();
        set_aside(&lock, std::slice::from_ref(&second)).unwrap();
        assert!(!second.exists());
        assert!(root.join(".step-00000002.refused").is_dir());
        assert_eq!(latest_intact(&root).unwrap().unwrap().state.step, 1);
        // A complete staged checkpoint takes its name; a replaced one whose
        // replacement never got its name comes back; a partial one goes.
        let third = write(&root, 3, 5);
        std::fs::rename(&third, root.join(".step-00000003.writing")).unwrap();
        let first = checkpoint_path(&root, 1);
        std::fs::rename(&first, root.join(".step-00000001.old")).unwrap();
        std::fs::create_dir_all(root.join(".step-00000004.writing")).unwrap();
        std::fs::write(root.join(".step-00000004.writing").join(MODEL_FILE), "half").unwrap();
        clear_dead_writes(&lock, &root).unwrap();
        let steps: Vec<u64> = checkpoints(&root)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, [1, 3]);
        assert!(!root.join(".step-00000004.writing").exists());
        assert_eq!(latest_intact(&root).unwrap().unwrap().state.step, 3);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let root = scratch("failed");
        write(&root, 1, 5);
        let err = save(
            &SaveRequest {
                root: &root,
                state: &state(2),
                keep: 5,
                tensor_bytes: 1024,
            },
            |dir| {
                std::fs::write(dir.join(MODEL_FILE), "half").unwrap();
                Err("the disk went away".to_string())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("the disk went away"), "{err}");
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["step-00000001".to_string()]);
        // What a writer that died left is cleared by the next owner.
        std::fs::create_dir_all(root.join(".step-00000002.writing")).unwrap();
        std::fs::create_dir_all(root.join(".step-00000001.old")).unwrap();
        std::fs::create_dir_all(root.join(".other")).unwrap();
        let lock = CheckpointLock::acquire(&root, Duration::ZERO).unwrap();
        clear_dead_writes(&lock, &root).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".lock", ".other", "step-00000001"]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn room_is_made_from_the_oldest_but_never_the_newest() {
        // Fits as it is.
        assert_eq!(make_room(10, 10, &[5, 5]), Ok(0));
        // One old checkpoint goes.
        assert_eq!(make_room(10, 6, &[5, 5, 5]), Ok(1));
        // Two go; the newest stays.
        assert_eq!(make_room(16, 6, &[5, 5, 5]), Ok(2));
        // Not even then: the most that could be free.
        assert_eq!(make_room(100, 6, &[5, 5, 5]), Err(16));
        assert_eq!(make_room(100, 6, &[]), Err(6));
        assert_eq!(make_room(100, 6, &[50]), Err(6));
    }

    #[test]
    fn non_finite_weights_are_named() {
        let good = Tensor::from_slice(&[1.0f32, 2.0]);
        let bad = Tensor::from_slice(&[1.0f32, f32::NAN, f32::INFINITY]);
        let params = vec![("a".to_string(), good), ("b.weight".to_string(), bad)];
        let err = check_finite(7, &params).unwrap_err();
        assert_eq!(err.category(), "non_finite");
        let text = err.to_string();
        assert!(
            text.contains("step 7") && text.contains("b.weight") && text.contains(" 2 "),
            "{text}"
        );
        assert!(check_finite(7, &params[..1]).is_ok());
    }

    #[test]
    fn a_second_owner_is_refused_with_the_first_ones_name() {
        let root = scratch("lock");
        let held = CheckpointLock::acquire(&root, Duration::ZERO).unwrap();
        CheckpointLock::check_free(&root).unwrap_err();
        let err = CheckpointLock::acquire(&root, Duration::from_millis(200)).unwrap_err();
        assert_eq!(err.category(), "checkpoint_locked");
        assert!(
            err.to_string()
                .contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(held);
        CheckpointLock::check_free(&root).unwrap();
        CheckpointLock::acquire(&root, Duration::ZERO).unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn an_unwritable_root_is_found_before_anything_runs() {
        let root = scratch("probe");
        probe_writable(&root.join("new/deeper")).unwrap();
        assert!(root.join("new/deeper").is_dir());
        assert_eq!(
            std::fs::read_dir(root.join("new/deeper")).unwrap().count(),
            0
        );
        let file = root.join("a-file");
        std::fs::write(&file, "x").unwrap();
        let err = probe_writable(&file).unwrap_err();
        assert_eq!(err.category(), "checkpoint_unwritable");
        assert!(probe_writable(&file.join("below")).is_err());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_resume_that_would_change_the_data_order_says_how() {
        let saved = state(4);
        let same = DataIdentity {
            seed: 0,
            corpus_digest: "ab".repeat(32),
            tokens_per_step: 4096,
            max_seq_len: 1024,
            data_order: DataOrder::Documents,
        };
        assert!(saved.data_changes(&same).is_empty());
        let other = DataIdentity {
            seed: 7,
            corpus_digest: "cd".repeat(32),
            tokens_per_step: 2048,
            max_seq_len: 512,
            data_order: DataOrder::Documents,
        };
        let changes = saved.data_changes(&other);
        assert_eq!(changes.len(), 4, "{changes:?}");
        assert!(changes[0].contains("--seed") && changes[1].contains("--data"));
        // An older checkpoint that recorded less is compared on what it has.
        let older = CheckpointState {
            corpus_digest: None,
            tokens_per_step: None,
            max_seq_len: None,
            ..saved
        };
        assert_eq!(older.data_changes(&other).len(), 1);
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(512), "0.5 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }
}
