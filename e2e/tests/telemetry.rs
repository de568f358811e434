//! What the `weft-operator` binary tells the people who run it: JSON log
//! lines that name the job they are about, and OpenTelemetry traces of each
//! reconcile exported over OTLP/HTTP to the endpoint in the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable; the mesh it publishes carries the
//! reconcile's trace context to the workers. The collector is a small HTTP
//! server that keeps what it is sent (`weft_telemetry::collector`).
//!
//! Needs `cargo build -p weft-operator` first (scripts/test does it).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use tokio::process::Command;
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::{HarnessError, TestEnv, operator_binary, wait_for, wait_job_status};
use weft_planner::mesh::MeshPlan;
use weft_telemetry::collector::Collector;

#[tokio::test]
async fn json_logs_and_otlp_traces_name_the_job() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("telemetry", |ns| async move {
        let collector = Collector::start()?;
        let log_path = std::env::temp_dir().join(format!("weft-e2e-{}-operator.log", ns.name));
        let log = std::fs::File::create(&log_path)?;
        let _operator = Command::new(operator_binary()?)
            .args(["--log-format", "json", "run", "--namespace", &ns.name])
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint())
            // Export batches every 200 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()?;

        let jobs: Api<TrainingJob> = ns.api();
        let spec = TrainingJobSpec {
            command: Some(vec!["sleep".into(), "3600".into()]),
            resources: WorkerResources {
                gpus: 4,
                cpu: Some("1".into()),
                memory: Some("1Gi".into()),
            },
            ..TrainingJobSpec::new("busybox:1.36", 1, 1)
        };
        jobs.create(&PostParams::default(), &TrainingJob::new("traced", spec))
            .await?;
        wait_job_status(&jobs, "traced", "traced to be Running", |s| {
            s.phase == Phase::Running
        })
        .await?;

        // Traces: a `reconcile` span named after the job, with the calls to
        // the API server as its children.
        let found = wait_for(
            "a reconcile span of job traced at the collector",
            Duration::from_secs(30),
            || {
                let collector = collector.clone();
                let namespace = ns.name.clone();
                async move {
                    let spans = collector.spans();
                    let reconcile = spans.iter().any(|span| {
                        span.name == "reconcile"
                            && span.text("job") == Some("traced")
                            && span.text("namespace") == Some(namespace.as_str())
                            && span.text("outcome") == Some("ok")
                    });
                    let children = spans.iter().any(|span| span.name == "list_job_pods")
                        && spans.iter().any(|span| span.name == "write_status");
                    Ok::<_, HarnessError>((reconcile && children).then_some(spans.len()))
                }
            },
        )
        .await?;
        ensure!(found > 0);
        let service = collector.spans().iter().any(|span| {
            span.resource.get("service.name").and_then(|v| v.as_str()) == Some("weft-operator")
        });
        ensure!(
            service,
            "the exported resource does not name the service weft-operator"
        );

        // The published mesh names the reconcile that published its epoch:
        // the workers' spans are its children.
        let config_maps: Api<ConfigMap> = ns.api();
        let mesh = config_maps.get("traced-mesh").await?;
        let mesh: MeshPlan = serde_json::from_str(
            mesh.data
                .as_ref()
                .and_then(|d| d.get("mesh.json"))
                .context("the mesh ConfigMap has no mesh.json")?,
        )?;
        let trace_parent = mesh
            .trace_parent
            .context("the published mesh carries no trace context")?;
        let parts: Vec<&str> = trace_parent.split('-').collect();
        ensure!(
            parts.len() == 4,
            "{trace_parent:?} is not a W3C traceparent"
        );
        let (trace_id, span_id) = (parts[1], parts[2]);
        wait_for(
            "the reconcile span the mesh names at the collector",
            Duration::from_secs(30),
            || {
                let collector = collector.clone();
                async move {
                    Ok::<_, HarnessError>(
                        collector
                            .spans()
                            .iter()
                            .any(|span| {
                                span.name == "reconcile"
                                    && span.trace_id == trace_id
                                    && span.span_id == span_id
                                    && span.text("job") == Some("traced")
                            })
                            .then_some(()),
                    )
                }
            },
        )
        .await?;

        // Logs: JSON lines; the event that the job runs names it.
        let text = std::fs::read_to_string(&log_path)
            .with_context(|| format!("reading {}", log_path.display()))?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .with_context(|| format!("a log line that is not JSON in:\n{text}"))?;
        let running = lines.iter().any(|line| {
            line["fields"]["message"] == "event"
                && line["fields"]["reason"] == "Running"
                && line["span"]["job"] == "traced"
                && line["level"] == "INFO"
        });
        ensure!(
            running,
            "no JSON log line of the Running event of job traced in:\n{text}"
        );
        let _ = std::fs::remove_file(&log_path);
        Ok(())
    })
    .await
}
