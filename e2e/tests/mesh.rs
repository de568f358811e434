//! The operator's pure steps against the real API server: the nodes are read
//! (observe), a mesh is planned (planner) and the job's objects are built
//! (build); applied, they are accepted, and the real scheduler places every
//! worker on the node the mesh chose, where kwok runs it.
//!
//! Its own test binary, so that it does not share GPUs with the ground suite's
//! tests running in parallel.

use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::Api;
use kube::api::{ListParams, PostParams};
use weft_crds::{TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::{HarnessError, TestEnv, wait_for};
use weft_operator::build::build;
use weft_operator::controller::mesh_inputs;
use weft_operator::inventory::read_nodes;
use weft_planner::mesh::{MeshRequest, plan_mesh};

#[tokio::test]
async fn built_workers_are_accepted_and_placed_where_the_mesh_planned() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("mesh-placement", |ns| async move {
        // Observe: GPU nodes, and the GPUs pods already hold on each.
        let nodes: Api<Node> = Api::all(ns.client.clone());
        let (cluster_nodes, _) = read_nodes(&nodes.list(&ListParams::default()).await?.items);
        let all_pods: Api<Pod> = Api::all(ns.client.clone());
        let all_pods = all_pods.list(&ListParams::default()).await?.items;
        let (mesh_nodes, _) = mesh_inputs(&cluster_nodes, &all_pods, &[]);

        // The job, as a user would create it.
        let jobs: Api<TrainingJob> = ns.api();
        let job = jobs
            .create(
                &PostParams::default(),
                &TrainingJob::new(
                    "mesh-demo",
                    TrainingJobSpec {
                        command: Some(vec!["sleep".into(), "3600".into()]),
                        resources: WorkerResources {
                            gpus: 2,
                            cpu: Some("1".into()),
                            memory: Some("1Gi".into()),
                        },
                        ..TrainingJobSpec::new(
                            std::env::var("WEFT_E2E_IMAGE")
                                .unwrap_or_else(|_| "busybox:1.36".into()),
                            2,
                            3,
                        )
                    },
                ),
            )
            .await?;

        // Plan and build.
        let mesh = plan_mesh(
            &MeshRequest {
                job: "mesh-demo".into(),
                min_workers: 2,
                max_workers: 3,
                gpus_per_worker: 2,
                epoch: 1,
            },
            &mesh_nodes,
            &[],
        )?;
        ensure!(
            mesh.workers.len() == 3,
            "the cluster has room for 3 workers of 2 GPUs"
        );
        let objects = build(&job, &mesh)?;

        // Apply.
        ns.api::<ConfigMap>()
            .create(&PostParams::default(), &objects.mesh)
            .await?;
        ns.api::<Service>()
            .create(&PostParams::default(), &objects.service)
            .await?;
        // The workers' identity and what it may do, before the pods that
        // run as it (the API server refuses a pod whose account is missing).
        ns.api::<ServiceAccount>()
            .create(&PostParams::default(), &objects.account)
            .await?;
        ns.api::<Role>()
            .create(&PostParams::default(), &objects.role)
            .await?;
        ns.api::<RoleBinding>()
            .create(&PostParams::default(), &objects.role_binding)
            .await?;
        let pods: Api<Pod> = ns.api();
        for pod in &objects.pods {
            pods.create(&PostParams::default(), pod).await?;
        }

        // Every worker runs on the node the mesh chose.
        for worker in &mesh.workers {
            let name = worker.name.clone();
            let pod = wait_for(
                &format!("worker {name} to run"),
                Duration::from_secs(90),
                || {
                    let pods = pods.clone();
                    let name = name.clone();
                    async move {
                        let pod = pods.get(&name).await.map_err(HarnessError::Api)?;
                        let running =
                            pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        Ok(running.then_some(pod))
                    }
                },
            )
            .await?;
            let node = pod
                .spec
                .and_then(|s| s.node_name)
                .context("a running pod has no node")?;
            ensure!(
                node == worker.node,
                "worker {name} runs on {node}, the mesh chose {}",
                worker.node
            );
        }
        Ok(())
    })
    .await
}
