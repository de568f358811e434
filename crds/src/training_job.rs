//! The `TrainingJob` resource (`weft.dev/v1alpha1`, short name `tj`).
//!
//! An ML engineer writes the spec; the operator owns the status. Invariants that
//! can be checked on one object are enforced by the API server itself, through the
//! OpenAPI bounds and CEL rules generated from the attributes below, so a bad
//! object is refused at `kubectl apply` with a message that names the field.
//!
//! This is the first draft of the API: the worker gang, its resources and
//! `suspend`. The model, data, parallelism, checkpoint, elasticity and scheduling
//! sections follow with the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
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
pub struct TrainingJobSpec {
    /// Container image of the weft trainer.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Overrides the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Overrides the image's arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// How many workers (one pod each) the job may run with.
    pub workers: WorkerRange,
    /// What each worker asks for.
    #[serde(default)]
    pub resources: WorkerResources,
    /// A suspended job runs no workers; setting it back to false resumes from the
    /// last checkpoint.
    #[serde(default)]
    pub suspend: bool,
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

/// Observed state of a training job, written by the operator only.
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
    pub observed_generation: Option<i64>,
    /// Workers the current mesh wants.
    #[serde(default)]
    pub workers_desired: i32,
    /// Workers running and ready.
    #[serde(default)]
    pub workers_ready: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready_summary: Option<String>,
    /// Bumped at every membership change.
    #[serde(default)]
    pub mesh_epoch: i64,
    /// Last training step reported by the workers.
    #[serde(default)]
    pub step: i64,
    /// Training throughput reported by the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
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
    }
}
