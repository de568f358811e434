//! What the operator hands each worker of a job, in one place for both:
//! the environment's names, and the training parameters published beside
//! the mesh as `training.json` (written by the operator, read by the
//! trainer's `worker`, with one set of types and defaults: the spec's own).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The environment of a worker pod (values set by the operator).
pub mod env {
    /// The job, and its namespace: where progress is reported.
    pub const JOB: &str = "WEFT_JOB";
    pub const NAMESPACE: &str = "WEFT_NAMESPACE";
    /// The pod's worker name in the mesh.
    pub const WORKER: &str = "WEFT_WORKER";
    /// The mesh of the pod's epoch, as created (the file follows newer ones).
    pub const MESH_EPOCH: &str = "WEFT_MESH_EPOCH";
    pub const WORLD_SIZE: &str = "WEFT_WORLD_SIZE";
    pub const FIRST_RANK: &str = "WEFT_FIRST_RANK";
    pub const LOCAL_RANKS: &str = "WEFT_LOCAL_RANKS";
    pub const RENDEZVOUS: &str = "WEFT_RENDEZVOUS";
    /// The mesh file, the ConfigMap it comes from, and the training
    /// parameters beside it.
    pub const MESH: &str = "WEFT_MESH";
    pub const MESH_CONFIGMAP: &str = "WEFT_MESH_CONFIGMAP";
    pub const TRAINING: &str = "WEFT_TRAINING";
    /// The pod's IP (the downward API), which its ranks bind to.
    pub const POD_IP: &str = "WEFT_POD_IP";
}

/// Why a worker cannot take its training parameters.
#[derive(Debug, thiserror::Error)]
pub enum WorkerConfigError {
    #[error("{path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error(
        "{path}: training parameters version {found}; this trainer reads versions 1 and 2 (use the trainer image of the operator's release)"
    )]
    Version { path: String, found: u32 },
    #[error("{path}: the training parameters name no model (neither model nor pretrained)")]
    NoModel { path: String },
}

impl WorkerConfigError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "worker_config"
    }
}

/// What the workers of a job need besides the mesh, published next to it as
/// `training.json`. Version 1, or 2 where the job uses what version 1 has
/// no place for ([`TrainingParameters::version_needed`]), so a trainer that
/// reads only version 1 refuses such a job rather than ignore its settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrainingParameters {
    pub version: u32,
    /// The model with every dimension resolved (a preset's sizes filled
    /// in); absent when the model is a checkpoint (`pretrained`), whose
    /// config the workers read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<weft_planner::model::ModelSpec>,
    /// A Hugging Face checkpoint to start from (version 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<Pretrained>,
    pub data: crate::DataSpec,
    pub parallelism: crate::ParallelismSpec,
    pub checkpoint: crate::CheckpointSpec,
}

/// The job's `model.checkpoint`, its rotary settings (in `config.json`'s
/// `rope_parameters` form) and where the trained model goes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Pretrained {
    pub checkpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl TrainingParameters {
    /// The parameters of `spec`.
    pub fn of(
        spec: &crate::TrainingJobSpec,
    ) -> Result<TrainingParameters, weft_planner::model::ModelError> {
        let pretrained = spec.model.checkpoint.as_ref().map(|checkpoint| Pretrained {
            checkpoint: checkpoint.clone(),
            rope: spec.model.rope.as_ref().map(|r| r.rope_parameters()),
            output: spec.model.output.clone(),
        });
        let mut parameters = TrainingParameters {
            version: 1,
            model: resolve_model(&spec.model)?,
            pretrained,
            data: spec.data.clone(),
            parallelism: spec.parallelism.clone(),
            checkpoint: spec.checkpoint.clone(),
        };
        parameters.version = parameters.version_needed();
        Ok(parameters)
    }

    /// 2 where the job starts from a checkpoint or reads its data in a way
    /// of version 2 (a format, a text field, a tokenizer), else 1.
    pub fn version_needed(&self) -> u32 {
        let data = &self.data;
        let version_2 = self.pretrained.is_some()
            || data.format != crate::DataFormat::Auto
            || data.text_field != crate::DEFAULT_TEXT_FIELD
            || data.tokenizer.is_some();
        if version_2 { 2 } else { 1 }
    }
}

/// The model a spec names, every dimension resolved and checked; `None` for
/// a checkpoint, whose shapes its workers read from its `config.json`.
pub fn resolve_model(
    spec: &crate::ModelSpec,
) -> Result<Option<weft_planner::model::ModelSpec>, weft_planner::model::ModelError> {
    use weft_planner::model::ModelSpec;
    if spec.checkpoint.is_some() {
        return Ok(None);
    }
    let model = match spec.preset {
        Some(preset) => ModelSpec::preset(preset.name())?,
        None => {
            let dim = |v: Option<i32>| v.unwrap_or(0).max(0) as u32;
            ModelSpec {
                name: "custom".to_string(),
                layers: dim(spec.layers),
                hidden: dim(spec.hidden),
                heads: dim(spec.heads),
                kv_heads: dim(spec.kv_heads),
                ffn: dim(spec.ffn),
                vocab: dim(spec.vocab),
                tied_embeddings: false,
            }
        }
    };
    model.validate()?;
    Ok(Some(model))
}

/// Reads and checks a worker's training parameters (`training.json`).
pub fn read_training(path: &Path) -> Result<TrainingParameters, WorkerConfigError> {
    let shown = path.display().to_string();
    let unreadable = |reason: String| WorkerConfigError::Unreadable {
        path: shown.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    let training: TrainingParameters =
        serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))?;
    if !(1..=2).contains(&training.version) {
        return Err(WorkerConfigError::Version {
            path: shown,
            found: training.version,
        });
    }
    if training.model.is_none() && training.pretrained.is_none() {
        return Err(WorkerConfigError::NoModel { path: shown });
    }
    Ok(training)
}

#[cfg(test)]
mod tests {
    // Test code: a failed unwrap is a failed test.
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn written(name: &str, json: &serde_json::Value) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("weft-training-{}-{name}", std::process::id()));
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    /// The operator's golden file reads; a version this trainer does not
    /// know, a file with no model and one that is not JSON are refused by
    /// name.
    #[test]
    fn training_parameters_are_read_or_refused_by_name() {
        let golden =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/training.json");
        let read = read_training(&golden).unwrap();
        assert_eq!(read.version, 1);
        assert_eq!(read.model.as_ref().map(|m| m.name.as_str()), Some("tiny"));
        assert_eq!(read.version_needed(), 1);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&golden).unwrap()).unwrap();
        let mut newer = json.clone();
        newer["version"] = 3.into();
        let err = read_training(&written("v3", &newer))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version 3; this trainer reads versions 1 and 2"),
            "{err}"
        );
        let mut none = json.clone();
        none.as_object_mut().unwrap().remove("model");
        let err = read_training(&written("none", &none))
            .unwrap_err()
            .to_string();
        assert!(err.contains("name no model"), "{err}");
        let path = written("bad", &serde_json::json!("not parameters"));
        let err = read_training(&path).unwrap_err().to_string();
        assert!(
            err.contains("weft-training-") && err.contains("invalid type"),
            "{err}"
        );
    }
}
