//! Every bad TrainingJob is refused by the real API server, through the
//! schema bounds and CEL rules generated from `weft-crds`, with a message
//! that names the field, exactly as `kubectl apply` shows it; and the fields
//! a running job cannot change are refused on update. The example manifests
//! are accepted as they are.

use anyhow::{bail, ensure};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use weft_crds::TrainingJob;
use weft_e2e::TestEnv;

fn job(name: &str, spec: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": { "name": name },
        "spec": spec,
    }))?)
}

/// A valid spec with `patch` merged over it (JSON merge-patch semantics).
fn spec_with(patch: Value) -> Value {
    let mut spec = json!({ "image": "busybox:1.36", "workers": { "min": 1, "max": 2 } });
    merge(&mut spec, patch);
    spec
}

fn merge(base: &mut Value, patch: Value) {
    if patch.is_object() && !base.is_object() {
        *base = json!({});
    }
    match (base, patch) {
        (Value::Object(base), Value::Object(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    base.remove(&k);
                } else {
                    merge(base.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (base, patch) => *base = patch,
    }
}

fn expect_refusal(
    what: &str,
    result: Result<DynamicObject, kube::Error>,
    wanted: &[&str],
) -> anyhow::Result<()> {
    match result {
        Ok(_) => bail!("the API server accepted {what}"),
        Err(kube::Error::Api(status)) => {
            ensure!(
                status.code == 422,
                "{what}: expected 422 Invalid, got {}: {}",
                status.code,
                status.message
            );
            for w in wanted {
                ensure!(
                    status.message.contains(w),
                    "{what}: the refusal does not say {w:?}: {}",
                    status.message
                );
            }
            Ok(())
        }
        Err(other) => Err(other.into()),
    }
}

#[tokio::test]
async fn bad_specs_and_changes_to_frozen_fields_are_refused_by_name() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("validation", |ns| async move {
        let resource = ApiResource::erase::<TrainingJob>(&());
        let jobs: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &resource);
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };

        // The smallest job is valid, and the server fills in the defaults.
        let made = jobs
            .create(&dry_run, &job("minimal", spec_with(json!({})))?)
            .await?;
        let spec = &made.data["spec"];
        ensure!(
            spec["model"]["preset"] == "tiny"
                && spec["data"]["maxSequenceLength"] == 32768
                && spec["elasticity"]["restartLimit"] == 5
                && spec["elasticity"]["unschedulableTimeoutSeconds"] == 60
                && spec["data"]["order"] == "Documents"
                && spec["parallelism"]["contextParallelism"] == "Adaptive",
            "defaults not applied: {spec}"
        );

        // Every example in manifests/examples is accepted as it is.
        let examples =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
        let mut applied = 0;
        for entry in std::fs::read_dir(&examples)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let example: DynamicObject = serde_saphyr::from_str(&std::fs::read_to_string(&path)?)?;
            jobs.create(&dry_run, &example)
                .await
                .map_err(|e| anyhow::anyhow!("{} was refused: {e}", path.display()))?;
            applied += 1;
        }
        ensure!(
            applied >= 3,
            "expected the example manifests in {}",
            examples.display()
        );

        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "min > max",
                json!({"workers": {"min": 3, "max": 2}}),
                vec![
                    "spec.workers",
                    "workers.min must not be greater than workers.max",
                ],
            ),
            (
                "zero workers",
                json!({"workers": {"min": 0}}),
                vec!["spec.workers.min", "greater than or equal to 1"],
            ),
            (
                "no image",
                json!({"image": null}),
                vec!["spec.image", "Required value"],
            ),
            (
                "negative GPUs",
                json!({"resources": {"gpus": -1}}),
                vec!["spec.resources.gpus"],
            ),
            (
                "memory that is not a quantity",
                json!({"resources": {"memory": "lots"}}),
                vec!["spec.resources.memory", "positive Kubernetes quantity"],
            ),
            (
                "an unknown model preset",
                json!({"model": {"preset": "gpt-5"}}),
                vec!["spec.model.preset", "Unsupported value"],
            ),
            (
                "a preset and dimensions",
                json!({"model": {"preset": "tiny", "layers": 4}}),
                vec!["spec.model", "give one of a preset, all of layers"],
            ),
            (
                "a checkpoint and a preset",
                json!({"model": {"preset": "tiny", "checkpoint": "/models/llama"}}),
                vec!["spec.model", "give one of a preset, all of layers"],
            ),
            (
                "a relative checkpoint",
                json!({"model": {"preset": null, "checkpoint": "models/llama"}}),
                vec!["spec.model.checkpoint", "absolute path"],
            ),
            (
                "rotary settings without a checkpoint",
                json!({"model": {"rope": {"type": "yarn", "factor": 4.0}}}),
                vec!["spec.model", "model.rope changes the rotary settings of a checkpoint"],
            ),
            (
                "an output without a checkpoint",
                json!({"model": {"output": "/out/model"}}),
                vec!["spec.model", "model.output writes the trained model"],
            ),
            (
                "yarn without a factor",
                json!({"model": {"preset": null, "checkpoint": "/m", "rope": {"type": "yarn"}}}),
                vec!["spec.model.rope", "model.rope.factor is required"],
            ),
            (
                "a llama3 key on yarn",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "yarn", "factor": 4.0, "lowFreqFactor": 1.0}}}),
                vec!["spec.model.rope", "belong to the llama3 type"],
            ),
            (
                "a rope type weft does not compute",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "longrope", "factor": 2.0}}}),
                vec!["spec.model.rope.type", "Unsupported value"],
            ),
            (
                "a rope factor below one",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "linear", "factor": 0.5}}}),
                vec!["spec.model.rope.factor"],
            ),
            (
                "a relative output",
                json!({"model": {"preset": null, "checkpoint": "/m", "output": "out"}}),
                vec!["spec.model.output", "absolute path"],
            ),
            (
                "a text field for the built-in corpus",
                json!({"data": {"textField": "body"}}),
                vec!["spec.data", "data.format and data.textField read a data.source directory"],
            ),
            (
                "an unknown data format",
                json!({"data": {"source": "/data", "format": "Csv"}}),
                vec!["spec.data.format", "Unsupported value"],
            ),
            (
                "a relative tokenizer",
                json!({"data": {"tokenizer": "tok.json"}}),
                vec!["spec.data.tokenizer", "absolute path"],
            ),
            (
                "two volumes at one path",
                json!({"volumes": [{"claimName": "a", "mountPath": "/m"},
                                   {"claimName": "b", "mountPath": "/m"}]}),
                vec!["spec.volumes", "two volumes are mounted at the same mountPath"],
            ),
            (
                "a volume over the checkpoints",
                json!({"volumes": [{"claimName": "a", "mountPath": "/var/lib/weft/checkpoints"}]}),
                vec!["spec", "a mountPath must not be checkpoint.path"],
            ),
            (
                "a text field with whole text files",
                json!({"data": {"source": "/data", "format": "Text", "textField": "body"}}),
                vec!["spec.data", "data.format Text reads whole files"],
            ),
            (
                "llama3 without its frequency factors",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "llama3", "factor": 8.0}}}),
                vec!["spec.model.rope", "type llama3 needs lowFreqFactor and a greater highFreqFactor"],
            ),
            (
                "mscale without mscaleAllDim",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "yarn", "factor": 4.0, "mscale": 0.7}}}),
                vec!["spec.model.rope", "give both or neither"],
            ),
            (
                "a zero beta",
                json!({"model": {"preset": null, "checkpoint": "/m",
                                 "rope": {"type": "yarn", "factor": 4.0, "betaFast": 0.0}}}),
                vec!["spec.model.rope.betaFast", "must be greater than 0"],
            ),
            (
                "an output on no volume the workers share",
                json!({"model": {"preset": null, "checkpoint": "/m", "output": "/out/model"}}),
                vec!["spec", "model.output must be inside a volume every worker mounts and may write"],
            ),
            (
                "an output on a read-only volume",
                json!({"model": {"preset": null, "checkpoint": "/m", "output": "/out/model"},
                       "volumes": [{"claimName": "o", "mountPath": "/out", "readOnly": true}]}),
                vec!["spec", "model.output must be inside a volume every worker mounts and may write"],
            ),
            (
                "a mount over the system",
                json!({"volumes": [{"claimName": "a", "mountPath": "/dev/shm"}]}),
                vec!["spec.volumes[0].mountPath", "must not be /, nor under /dev"],
            ),
            (
                "a mount path with a trailing slash",
                json!({"volumes": [{"claimName": "a", "mountPath": "/models/"}]}),
                vec!["spec.volumes[0].mountPath", "without a trailing"],
            ),
            (
                "a relative mount path",
                json!({"volumes": [{"claimName": "a", "mountPath": "models"}]}),
                vec!["spec.volumes[0].mountPath", "absolute path"],
            ),
            (
                "heads not a multiple of kv heads",
                json!({"model": {"preset": null, "layers": 2, "hidden": 96, "heads": 6,
                                 "kvHeads": 4, "ffn": 256, "vocab": 257}}),
                vec![
                    "spec.model",
                    "model.heads must be a multiple of model.kvHeads",
                ],
            ),
            (
                "an odd head dimension",
                json!({"model": {"preset": null, "layers": 2, "hidden": 96, "heads": 32,
                                 "kvHeads": 8, "ffn": 256, "vocab": 257}}),
                vec!["spec.model", "even head dimension"],
            ),
            (
                "a step smaller than a sequence",
                json!({"data": {"maxSequenceLength": 4096, "tokensPerStep": 1024}}),
                vec![
                    "spec.data",
                    "data.tokensPerStep must be at least data.maxSequenceLength",
                ],
            ),
            (
                "decomposed data whose longest bucket is not a power of two",
                json!({"data": {"order": "Decomposed", "maxSequenceLength": 3000}}),
                vec![
                    "spec.data",
                    "data.order Decomposed needs data.maxSequenceLength to be a power of two",
                ],
            ),
            (
                "decomposed data with a shortest bucket above the longest",
                json!({"data": {"order": "Decomposed", "maxSequenceLength": 1024,
                                "minBucketLength": 2048}}),
                vec![
                    "spec.data",
                    "data.minBucketLength must be a power of two no larger than",
                ],
            ),
            (
                "an unknown data order",
                json!({"data": {"order": "Shuffled"}}),
                vec!["spec.data.order", "Unsupported value"],
            ),
            (
                "a relative data source",
                json!({"data": {"source": "corpus/"}}),
                vec!["spec.data.source", "absolute path"],
            ),
            (
                "static CP without a degree",
                json!({"parallelism": {"contextParallelism": "Static"}}),
                vec!["spec.parallelism", "cpDegree is required"],
            ),
            (
                "a CP degree over its maximum",
                json!({"parallelism": {"contextParallelism": "Static", "cpDegree": 16,
                                       "maxCpDegree": 8}}),
                vec![
                    "spec.parallelism",
                    "must not be greater than parallelism.maxCpDegree",
                ],
            ),
            (
                "a CP degree more ranks than workers.min workers have",
                json!({"resources": {"gpus": 4},
                       "parallelism": {"contextParallelism": "Static", "cpDegree": 8}}),
                vec![
                    "spec",
                    "parallelism.cpDegree must not be greater than the ranks of workers.min workers",
                ],
            ),
            (
                "a StreamBP chunk longer than any sequence",
                json!({"data": {"maxSequenceLength": 4096},
                       "parallelism": {"streamBpChunkTokens": 8192}}),
                vec![
                    "spec",
                    "parallelism.streamBpChunkTokens must not be greater than data.maxSequenceLength",
                ],
            ),
            (
                "a zero StreamBP chunk",
                json!({"parallelism": {"streamBpChunkTokens": 0}}),
                vec!["spec.parallelism.streamBpChunkTokens"],
            ),
            (
                "a relative checkpoint path",
                json!({"checkpoint": {"path": "ckpt"}}),
                vec!["spec.checkpoint.path", "absolute path"],
            ),
            (
                "a zero checkpoint interval",
                json!({"checkpoint": {"intervalSteps": 0}}),
                vec!["spec.checkpoint.intervalSteps"],
            ),
            (
                "weft's own environment variable",
                json!({"env": [{"name": "WEFT_WORLD_SIZE", "value": "1"}]}),
                vec![
                    "spec.env",
                    "names starting with WEFT_ are set by weft itself",
                ],
            ),
            (
                "a negative restart limit",
                json!({"elasticity": {"restartLimit": -1}}),
                vec!["spec.elasticity.restartLimit"],
            ),
            (
                "a stall timeout shorter than a step report's interval",
                json!({"elasticity": {"stallTimeoutSeconds": 5}}),
                vec!["spec.elasticity.stallTimeoutSeconds"],
            ),
            (
                "no time at all for a worker to be scheduled",
                json!({"elasticity": {"unschedulableTimeoutSeconds": 0}}),
                vec!["spec.elasticity.unschedulableTimeoutSeconds"],
            ),
            (
                "an unknown context-parallel mode",
                json!({"parallelism": {"contextParallelism": "Sometimes"}}),
                vec!["spec.parallelism.contextParallelism", "Unsupported value"],
            ),
        ];
        for (what, patch, wanted) in cases {
            let result = jobs.create(&dry_run, &job("bad", spec_with(patch))?).await;
            expect_refusal(what, result, &wanted)?;
        }

        // Names: the job's Service is named after it, and each worker's host
        // name is <name>-worker-<index> (at most 63 characters).
        for (name, max, wanted) in [
            ("dot.ted", 2, "metadata.name must be lower-case letters"),
            ("Upper", 2, "metadata.name must be lower-case letters"),
            ("ends-with-", 2, "metadata.name must be lower-case letters"),
            (&*"n".repeat(60), 2, "metadata.name is too long for workers.max"),
            (&*"n".repeat(54), 11, "metadata.name is too long for workers.max"),
        ] {
            let result = jobs
                .create(
                    &dry_run,
                    &job(name, spec_with(json!({"workers": {"max": max}})))?,
                )
                .await;
            expect_refusal(&format!("the name {name:?} with max {max}"), result, &[wanted])?;
        }
        for (name, max) in [(&*"n".repeat(54), 10), (&*"n".repeat(50), 65536)] {
            jobs.create(
                &dry_run,
                &job(name, spec_with(json!({"workers": {"max": max}})))?,
            )
            .await
            .map_err(|e| anyhow::anyhow!("the name {name:?} with max {max} was refused: {e}"))?;
        }

        // On a running (not suspended) job the model, data, image and
        // resources are frozen; the worker range is not.
        jobs.create(
            &PostParams::default(),
            &job("frozen", spec_with(json!({})))?,
        )
        .await?;
        let patch = |body: Value| {
            let jobs = jobs.clone();
            async move {
                jobs.patch("frozen", &PatchParams::default(), &Patch::Merge(&body))
                    .await
            }
        };
        expect_refusal(
            "a new model",
            patch(json!({"spec": {"model": {"preset": "llama-7b"}}})).await,
            &["spec.model cannot change once the job exists"],
        )?;
        expect_refusal(
            "new data",
            patch(json!({"spec": {"data": {"maxSequenceLength": 1024}}})).await,
            &["spec.data cannot change once the job exists"],
        )?;
        expect_refusal(
            "a new image on a running job",
            patch(json!({"spec": {"image": "busybox:1.37"}})).await,
            &["spec.image and spec.resources can change only while the job is suspended"],
        )?;
        expect_refusal(
            "new resources on a running job",
            patch(json!({"spec": {"resources": {"gpus": 4}}})).await,
            &["spec.image and spec.resources can change only while the job is suspended"],
        )?;
        for (what, change) in [
            ("new arguments", json!({"args": ["--steps", "9"]})),
            ("a new command", json!({"command": ["/bin/sh"]})),
            ("a new environment", json!({"env": [{"name": "A", "value": "1"}]})),
        ] {
            expect_refusal(
                &format!("{what} on a running job"),
                patch(json!({ "spec": change })).await,
                &["spec.command, spec.args and spec.env can change only while the job is suspended"],
            )?;
        }
        expect_refusal(
            "new volumes on a running job",
            patch(json!({"spec": {"volumes": [{"claimName": "a", "mountPath": "/m"}]}})).await,
            &["spec.volumes can change only while the job is suspended"],
        )?;
        // Growing the range must keep every worker's name short enough.
        let long = "l".repeat(52);
        jobs.create(&PostParams::default(), &job(&long, spec_with(json!({})))?)
            .await?;
        expect_refusal(
            "a worker range whose last worker's name would be too long",
            jobs.patch(
                &long,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"workers": {"max": 10000}}})),
            )
            .await,
            &["metadata.name is too long for workers.max"],
        )?;
        // An empty list where there was none changes nothing, and is taken.
        patch(json!({"spec": {"env": [], "args": []}})).await?;
        patch(json!({"spec": {"workers": {"max": 4}}})).await?;
        patch(json!({"spec": {"suspend": true}})).await?;
        let changed = patch(json!({"spec": {"image": "busybox:1.37", "args": ["--steps", "9"]}})).await?;
        ensure!(
            changed.data["spec"]["image"] == "busybox:1.37"
                && changed.data["spec"]["args"][1] == "9",
            "a suspended job takes a new image and new arguments"
        );

        // The status: every time any reader can parse is taken, and nothing
        // else, whoever writes it (a worker may write its progress).
        let status = |body: Value| {
            let jobs = jobs.clone();
            async move {
                jobs.patch_status("frozen", &PatchParams::default(), &Patch::Merge(&json!({ "status": body })))
                    .await
            }
        };
        for digits in 0..=12usize {
            let fraction = if digits == 0 { String::new() } else { format!(".{}", "1".repeat(digits)) };
            for offset in ["Z", "+05:30", "-23:59"] {
                let time = format!("2026-12-06T12:00:00{fraction}{offset}");
                let result = status(json!({
                    "lastRescaleTime": time,
                    "lastCheckpoint": {"step": 1, "path": "/c", "time": time},
                }))
                .await;
                if digits <= 9 {
                    let written = result.map_err(|e| anyhow::anyhow!("the time {time} was refused: {e}"))?;
                    let read: TrainingJob = serde_json::from_value(serde_json::to_value(&written)?)
                        .map_err(|e| anyhow::anyhow!("{time} was taken but cannot be read: {e}"))?;
                    ensure!(read.status.is_some_and(|s| s.last_rescale_time.is_some()));
                } else {
                    expect_refusal(&format!("the time {time}"), result, &["status.lastRescaleTime", "status.lastCheckpoint.time"])?;
                }
            }
        }
        for (what, body, wanted) in [
            ("a year no reader can hold", json!({"startTime": "9999-12-31T23:59:59Z"}), "status.startTime"),
            ("an offset over a day", json!({"startTime": "2026-12-06T12:00:00+99:00"}), "status.startTime"),
            ("a restart count past 32 bits", json!({"restarts": 2147483648_i64}), "status.restarts"),
            ("a negative step", json!({"step": -1}), "status.step"),
            ("a negative epoch", json!({"meshEpoch": -1}), "status.meshEpoch"),
            (
                "an epoch past the largest",
                json!({"meshEpoch": weft_crds::MAX_MESH_EPOCH + 1}),
                "status.meshEpoch",
            ),
        ] {
            expect_refusal(what, status(body).await, &[wanted])?;
        }
        // The largest values that are taken can be read.
        let written = status(json!({"step": i64::MAX, "meshEpoch": weft_crds::MAX_MESH_EPOCH, "restarts": i32::MAX,
                                    "tokensPerSecond": 1.0e300}))
            .await?;
        serde_json::from_value::<TrainingJob>(serde_json::to_value(&written)?)
            .map_err(|e| anyhow::anyhow!("the largest counters were taken but cannot be read: {e}"))?;
        Ok(())
    })
    .await
}
