//! The ground every operator test stands on: a real API server, scheduler,
//! controller manager and kwok GPU nodes, as `KUBECONFIG` points to.
//!
//! When `WEFT_E2E_CLUSTER` holds the cluster shorthand the cluster was started
//! with (the test script sets it), the nodes are checked against it exactly;
//! otherwise every GPU node is checked for consistency.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, PodSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use weft_crds::topology::{self, ANNOTATION_NICS, LABEL_GPU_PRODUCT, RESOURCE_GPU};
use weft_crds::{TrainingJob, TrainingJobSpec, WorkerRange};
use weft_e2e::{HarnessError, TestEnv, wait_for, wait_for_crd};

fn gpus_of(node: &Node) -> u32 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(RESOURCE_GPU))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

async fn gpu_nodes(env: &TestEnv) -> anyhow::Result<Vec<Node>> {
    let nodes: Api<Node> = Api::all(env.client.clone());
    let list = nodes.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().filter(|n| gpus_of(n) > 0).collect())
}

fn gpu_pod(name: &str, gpus: u32, node_selector: Option<BTreeMap<String, String>>) -> Pod {
    let image = std::env::var("WEFT_E2E_IMAGE").unwrap_or_else(|_| "busybox:1.36".to_string());
    let limits = BTreeMap::from([(RESOURCE_GPU.to_string(), Quantity(gpus.to_string()))]);
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "main".to_string(),
                image: Some(image),
                command: Some(vec!["sleep".into(), "3600".into()]),
                resources: Some(ResourceRequirements {
                    limits: Some(limits),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            node_selector,
            termination_grace_period_seconds: Some(0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test]
async fn gpu_nodes_are_ready_with_the_capacity_and_topology_asked_for() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    let nodes = gpu_nodes(&env).await?;
    ensure!(
        !nodes.is_empty(),
        "the cluster has no node with {RESOURCE_GPU} capacity"
    );
    for node in &nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        ensure!(is_ready(node), "node {name} is not Ready");
        if let Some(value) = node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_NICS))
        {
            topology::parse_nics(value, gpus_of(node)).with_context(|| format!("node {name}"))?;
        }
    }
    let Ok(spec) = std::env::var("WEFT_E2E_CLUSTER") else {
        return Ok(());
    };
    let expected = weft_planner::cluster::parse_cluster(&spec)?;
    let by_name: BTreeMap<_, _> = nodes
        .iter()
        .map(|n| (n.metadata.name.clone().unwrap_or_default(), n))
        .collect();
    ensure!(
        by_name.len() == expected.nodes.len(),
        "expected {} GPU nodes from {spec:?}, found {}",
        expected.nodes.len(),
        by_name.len()
    );
    for want in &expected.nodes {
        let got = by_name
            .get(&want.name)
            .with_context(|| format!("node {} of {spec:?} is missing", want.name))?;
        ensure!(gpus_of(got) == want.gpus, "node {}: GPU count", want.name);
        ensure!(
            label(got, LABEL_GPU_PRODUCT) == Some(want.gpu.product_label.as_str()),
            "node {}: GPU product label",
            want.name
        );
        ensure!(
            label(got, topology::LABEL_RACK) == Some(want.rack.as_str()),
            "node {}: rack",
            want.name
        );
        ensure!(
            label(got, topology::LABEL_BLOCK) == Some(want.block.as_str()),
            "node {}: block",
            want.name
        );
        let nics = got
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_NICS))
            .with_context(|| format!("node {} has no {ANNOTATION_NICS} annotation", want.name))?;
        let nics = topology::parse_nics(nics, want.gpus)?;
        let affinity: Vec<_> = nics
            .iter()
            .map(|n| (n.name.clone(), n.gpus.clone()))
            .collect();
        let wanted: Vec<_> = want
            .nics
            .iter()
            .map(|n| (n.name.clone(), n.gpus.clone()))
            .collect();
        ensure!(
            affinity == wanted,
            "node {}: NIC affinity {affinity:?} != {wanted:?}",
            want.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_pod_asking_for_a_whole_gpu_node_is_scheduled_onto_a_matching_node_and_runs()
-> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    let nodes = gpu_nodes(&env).await?;
    let biggest = nodes
        .iter()
        .filter(|n| is_ready(n))
        .max_by_key(|n| gpus_of(n))
        .context("no Ready GPU node")?;
    let gpus = gpus_of(biggest);
    let product = label(biggest, LABEL_GPU_PRODUCT).map(str::to_string);
    env.run("gpu-pod-runs", |ns| async move {
        let selector = product
            .clone()
            .map(|p| BTreeMap::from([(LABEL_GPU_PRODUCT.to_string(), p)]));
        let pods: Api<Pod> = ns.api();
        pods.create(
            &PostParams::default(),
            &gpu_pod("whole-node", gpus, selector),
        )
        .await?;
        let pod = wait_for("the GPU pod to be Running", Duration::from_secs(90), || {
            let pods = pods.clone();
            async move {
                let pod = pods.get("whole-node").await?;
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                Ok(running.then_some(pod))
            }
        })
        .await?;
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .context("a Running pod has no node")?;
        let node = Api::<Node>::all(ns.client.clone()).get(&node_name).await?;
        ensure!(
            gpus_of(&node) >= gpus,
            "placed on {node_name}, which has fewer GPUs than asked"
        );
        ensure!(
            label(&node, LABEL_GPU_PRODUCT).map(str::to_string) == product,
            "placed on {node_name}, which has another GPU product"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_pod_asking_for_more_gpus_than_any_node_has_stays_pending_with_the_schedulers_reason()
-> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    let most = gpu_nodes(&env)
        .await?
        .iter()
        .map(gpus_of)
        .max()
        .unwrap_or(0);
    env.run("gpu-pod-pending", |ns| async move {
        let pods: Api<Pod> = ns.api();
        pods.create(&PostParams::default(), &gpu_pod("too-big", most + 1, None))
            .await?;
        let message = wait_for(
            "the scheduler to report the pod unschedulable",
            Duration::from_secs(60),
            || {
                let pods = pods.clone();
                async move {
                    let pod = pods.get("too-big").await?;
                    let condition = pod
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .into_iter()
                        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
                    Ok(condition
                        .filter(|c| c.reason.as_deref() == Some("Unschedulable"))
                        .map(|c| c.message.unwrap_or_default()))
                }
            },
        )
        .await?;
        ensure!(
            message.contains(&format!("Insufficient {RESOURCE_GPU}")),
            "scheduler message does not name the GPU shortage: {message}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pod = pods.get("too-big").await?;
        ensure!(
            pod.spec.and_then(|s| s.node_name).is_none(),
            "pod was bound to a node"
        );
        ensure!(
            pod.status.and_then(|s| s.phase).as_deref() == Some("Pending"),
            "pod is not Pending"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    env.run("garbage-collection", |ns| async move {
        let maps: Api<ConfigMap> = ns.api();
        let owner = maps
            .create(
                &PostParams::default(),
                &ConfigMap {
                    metadata: ObjectMeta {
                        name: Some("owner".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await?;
        let uid = owner.metadata.uid.context("created object has no uid")?;
        let dependent = ConfigMap {
            metadata: ObjectMeta {
                name: Some("dependent".into()),
                owner_references: Some(vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: "owner".into(),
                    uid,
                    ..Default::default()
                }]),
                ..Default::default()
            },
            ..Default::default()
        };
        maps.create(&PostParams::default(), &dependent).await?;
        maps.delete("owner", &DeleteParams::background()).await?;
        wait_for(
            "the dependent to be garbage-collected",
            Duration::from_secs(90),
            || {
                let maps = maps.clone();
                async move { Ok(maps.get_opt("dependent").await?.is_none().then_some(())) }
            },
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_helm_chart_installs_the_trainingjob_crd_and_the_api_server_serves_and_validates_it()
-> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    env.run("helm-crd", |ns| async move {
        let release = "weft-e2e";
        weft_e2e::helm(&[
            "upgrade",
            "--install",
            release,
            "{chart}",
            "--namespace",
            &ns.name,
            "--wait",
            "--timeout",
            "120s",
        ])
        .await?;
        wait_for_crd(&ns.client, "trainingjobs.weft.dev", Duration::from_secs(60)).await?;

        let jobs: Api<TrainingJob> = ns.api();
        let spec = TrainingJobSpec::new("weft-trainer:dev", 2, 4);
        let job = TrainingJob::new("tiny", spec.clone());
        // The API server may take a moment to serve a freshly established CRD.
        wait_for(
            "the TrainingJob API to accept a job",
            Duration::from_secs(30),
            || {
                let jobs = jobs.clone();
                let job = job.clone();
                async move {
                    match jobs.create(&PostParams::default(), &job).await {
                        Ok(_) => Ok(Some(())),
                        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
                        Err(e) => Err(HarnessError::Api(e)),
                    }
                }
            },
        )
        .await?;
        let stored = jobs.get("tiny").await?;
        ensure!(
            stored.spec == spec,
            "stored spec differs: {:?}",
            stored.spec
        );

        let bad = TrainingJob::new(
            "inverted",
            TrainingJobSpec {
                workers: WorkerRange { min: 3, max: 2 },
                ..spec
            },
        );
        match jobs.create(&PostParams::default(), &bad).await {
            Ok(_) => bail!("the API server accepted workers.min > workers.max"),
            Err(kube::Error::Api(status)) => {
                ensure!(
                    status.code == 422,
                    "expected 422 Invalid, got {}",
                    status.code
                );
                ensure!(
                    status
                        .message
                        .contains("workers.min must not be greater than workers.max"),
                    "rejection does not explain itself: {}",
                    status.message
                );
            }
            Err(other) => return Err(other.into()),
        }

        weft_e2e::helm(&["uninstall", release, "--namespace", &ns.name]).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_failing_test_dumps_its_namespace_and_still_cleans_up() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    let artifacts = std::env::temp_dir().join(format!("weft-e2e-dump-{}", std::process::id()));
    let mut seen_ns = String::new();
    let result = env
        .run_with_artifacts("dump-on-failure", Some(artifacts.clone()), |ns| {
            let name = ns.name.clone();
            seen_ns = name.clone();
            async move {
                let maps: Api<ConfigMap> = ns.api();
                let evidence = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some("evidence-of-state".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                };
                maps.create(&PostParams::default(), &evidence).await?;
                bail!("failing on purpose in {name}")
            }
        })
        .await;
    let err = result.expect_err("the body failed, so run must fail");
    ensure!(err.to_string().contains("failing on purpose"), "{err}");
    let dump = std::fs::read_to_string(artifacts.join(format!("{seen_ns}.txt")))
        .context("no dump was written")?;
    ensure!(
        dump.contains("evidence-of-state"),
        "dump lacks the namespace's objects:\n{dump}"
    );
    ensure!(dump.contains("--- events"), "dump lacks the events section");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    let ns = namespaces.get_opt(&seen_ns).await?;
    let deleting = ns.is_none_or(|n| n.metadata.deletion_timestamp.is_some());
    ensure!(
        deleting,
        "namespace {seen_ns} was not deleted after the failure"
    );
    let _ = std::fs::remove_dir_all(&artifacts);
    Ok(())
}
