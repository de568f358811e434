//! Every field of a TrainingJob's spec takes effect: the operator acts on it,
//! or passes it to the workers (whose own test shows each one changes what a
//! worker runs: `trainer/src/bin/weft-trainer.rs`, `every_job_field_changes_what_a_worker_runs`).
//! A field added to the spec and to no list here fails this test, so a new
//! field cannot be accepted and silently ignored.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde_json::{Value, json};
use weft_crds::TrainingJob;
use weft_operator::build::build;
use weft_planner::cluster::parse_cluster;
use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};

/// Fields that change the objects the operator builds (worker pods, their
/// volumes), with a value other than the base job's.
fn built() -> Vec<(&'static str, Value)> {
    vec![
        ("image", json!("weft-trainer:other")),
        ("command", json!(["/bin/weft-trainer"])),
        ("args", json!(["worker", "--steps", "7"])),
        ("env", json!([{"name": "EXTRA", "value": "1"}])),
        ("resources.gpus", json!(4)),
        ("resources.cpu", json!("12")),
        ("resources.memory", json!("99Gi")),
        ("scheduling.nodeSelector", json!({"pool": "a"})),
        ("scheduling.priorityClassName", json!("high")),
        ("scheduling.schedulerName", json!("volcano")),
        (
            "scheduling.tolerations",
            json!([{"key": "gpu", "operator": "Exists"}]),
        ),
        ("checkpoint.claimName", json!("shared-ckpt")),
        (
            "volumes",
            json!([{"claimName": "models", "mountPath": "/models", "readOnly": true}]),
        ),
    ]
}

/// Fields passed to the workers in `training.json`, with a value other than
/// the base job's.
fn passed() -> Vec<(&'static str, Value)> {
    vec![
        ("model.preset", json!("tiny")),
        ("model.layers", json!(3)),
        ("model.hidden", json!(96)),
        ("model.heads", json!(8)),
        ("model.kvHeads", json!(1)),
        ("model.ffn", json!(200)),
        ("model.vocab", json!(300)),
        ("data.source", json!("/data/other")),
        ("data.maxSequenceLength", json!(4096)),
        ("data.tokensPerStep", json!(65536)),
        ("data.order", json!("Decomposed")),
        ("data.minBucketLength", json!(128)),
        ("data.curriculumSteps", json!(9)),
        ("parallelism.contextParallelism", json!("Static")),
        ("parallelism.cpDegree", json!(4)),
        ("parallelism.maxCpDegree", json!(8)),
        ("parallelism.hierarchical", json!(false)),
        ("parallelism.nicAwareRouting", json!(false)),
        ("parallelism.streamBpChunkTokens", json!(512)),
        ("checkpoint.path", json!("/ckpt/other")),
        ("checkpoint.intervalSteps", json!(17)),
        ("checkpoint.keep", json!(5)),
        ("data.format", json!("Parquet")),
        ("data.textField", json!("content")),
        ("data.tokenizer", json!("/tokenizers/llama")),
        ("model.checkpoint", json!("/models/llama")),
    ]
}

/// Fields of a job that starts from a checkpoint, passed to the workers
/// (under `pretrained`), with a value other than [`pretrained_base`]'s.
fn passed_with_checkpoint() -> Vec<(&'static str, Value)> {
    vec![
        ("model.checkpoint", json!("/models/other")),
        ("model.output", json!("/out/llama")),
        ("model.rope.type", json!("llama3")),
        ("model.rope.theta", json!(1000000.0)),
        ("model.rope.factor", json!(8.0)),
        ("model.rope.originalMaxPositionEmbeddings", json!(4096)),
        ("model.rope.lowFreqFactor", json!(1.0)),
        ("model.rope.highFreqFactor", json!(4.0)),
        ("model.rope.betaFast", json!(16.0)),
        ("model.rope.betaSlow", json!(2.0)),
        ("model.rope.mscale", json!(0.7)),
        ("model.rope.mscaleAllDim", json!(0.5)),
        ("model.rope.attentionFactor", json!(1.2)),
        ("model.rope.truncate", json!(false)),
    ]
}

/// A job that starts from a checkpoint, with YaRN settings.
fn pretrained_base() -> Value {
    let mut job = base();
    job["spec"]["model"] = json!({
        "checkpoint": "/models/llama",
        "rope": {"type": "yarn", "factor": 2.0},
    });
    job
}

/// Fields the reconcile decides with, each read by a pure function that
/// has its own tests (named here).
const DECIDED: &[(&str, &str)] = &[
    (
        "suspend",
        "controller: a suspended job's workers are stopped",
    ),
    (
        "workers.min",
        "controller's mesh request; lifecycle::growth_limit",
    ),
    ("workers.max", "lifecycle::growth_limit"),
    (
        "elasticity.restartLimit",
        "lifecycle::restart_budget_exhausted",
    ),
    (
        "elasticity.rescaleCooldownSeconds",
        "lifecycle::growth_limit",
    ),
    (
        "elasticity.unschedulableTimeoutSeconds",
        "lifecycle::avoided_nodes, next_refusal_timeout",
    ),
    (
        "elasticity.stallTimeoutSeconds",
        "status::stalled_condition, status::until_stalled",
    ),
    (
        "scheduling.topologyKey",
        "inventory::fit_to_job: the rack of each node",
    ),
];

/// Every leaf of the spec's schema, as dotted paths (maps, lists and
/// free-form objects are leaves).
fn schema_fields() -> BTreeSet<String> {
    fn walk(schema: &Value, path: &str, out: &mut BTreeSet<String>) {
        match schema.get("properties").and_then(Value::as_object) {
            Some(properties) if schema.get("type") == Some(&json!("object")) => {
                for (name, child) in properties {
                    let child_path = if path.is_empty() {
                        name.clone()
                    } else {
                        format!("{path}.{name}")
                    };
                    walk(child, &child_path, out);
                }
            }
            _ => {
                out.insert(path.to_string());
            }
        }
    }
    let crd = serde_json::to_value(weft_crds::crd().unwrap()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut out = BTreeSet::new();
    walk(spec, "", &mut out);
    out
}

#[test]
fn every_spec_field_is_acted_on_or_passed_to_the_workers() {
    let schema = schema_fields();
    let listed: BTreeSet<String> = built()
        .into_iter()
        .chain(passed())
        .chain(passed_with_checkpoint())
        .map(|(p, _)| p.to_string())
        .chain(DECIDED.iter().map(|(p, _)| p.to_string()))
        .collect();
    let unlisted: Vec<&String> = schema.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "spec fields nobody reads (make each take effect or refuse it, then list it here): {unlisted:?}"
    );
    let gone: Vec<&String> = listed.difference(&schema).collect();
    assert!(
        gone.is_empty(),
        "listed fields the spec no longer has: {gone:?}"
    );
}

/// The base job: a custom model, so that every model field matters.
fn base() -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "llm", "namespace": "team-a", "uid": "uid-1"},
        "spec": {
            "image": "weft-trainer:dev",
            "workers": {"min": 2, "max": 3},
            "resources": {"gpus": 8, "cpu": "96", "memory": "1Ti"},
            "model": {"layers": 2, "hidden": 64, "heads": 4, "kvHeads": 2, "ffn": 128, "vocab": 512},
        }
    })
}

fn with(mut job: Value, path: &str, value: &Value) -> Value {
    let mut at = &mut job["spec"];
    let parts: Vec<&str> = path.split('.').collect();
    for part in &parts[..parts.len() - 1] {
        at = &mut at[*part];
    }
    at[parts[parts.len() - 1]] = value.clone();
    job
}

fn objects(job: &Value) -> (Value, Value) {
    let job: TrainingJob = serde_json::from_value(job.clone()).unwrap();
    let nodes = MeshNode::all_free(&parse_cluster("4x8:nics=4").unwrap());
    let request = MeshRequest {
        job: "llm".into(),
        min_workers: 2,
        max_workers: 3,
        gpus_per_worker: 8,
        epoch: 1,
    };
    let mesh = plan_mesh(&request, &nodes, &[]).unwrap();
    let objects = build(&job, &mesh).unwrap();
    let training: Value =
        serde_json::from_str(&objects.mesh.data.as_ref().unwrap()["training.json"]).unwrap();
    (serde_json::to_value(&objects.pods).unwrap(), training)
}

#[test]
fn each_built_field_changes_the_worker_pods() {
    let (pods, _) = objects(&base());
    for (path, value) in built() {
        let (changed, _) = objects(&with(base(), path, &value));
        assert_ne!(changed, pods, "{path} = {value} changes no worker pod");
    }
}

#[test]
fn each_passed_field_reaches_training_json() {
    let (_, training) = objects(&base());
    for (path, value) in passed() {
        let (_, changed) = objects(&with(base(), path, &value));
        assert_ne!(
            changed, training,
            "{path} = {value} does not reach training.json"
        );
        // Passed as set (the model resolved from its preset or dimensions).
        if !path.starts_with("model.") {
            let pointer = format!("/{}", path.replace('.', "/"));
            assert_eq!(changed.pointer(&pointer), Some(&value), "{path}");
        }
    }
}

#[test]
fn each_field_of_a_checkpoint_reaches_training_json() {
    let (_, training) = objects(&pretrained_base());
    assert_eq!(training["version"], 2);
    for (path, value) in passed_with_checkpoint() {
        let (_, changed) = objects(&with(pretrained_base(), path, &value));
        assert_ne!(
            changed, training,
            "{path} = {value} does not reach training.json"
        );
    }
}
