//! What the `weft-operator` binary tells the people who run it: JSON log
//! lines that name the job they are about, and OpenTelemetry traces of each
//! reconcile exported over OTLP/HTTP to the endpoint in the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` variable. The collector here is a small
//! HTTP server of the test's own that keeps what it is sent.
//!
//! Needs `cargo build -p weft-operator` first (scripts/test does it).

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, ensure};
use kube::Api;
use kube::api::PostParams;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;
use weft_crds::{Phase, TrainingJob, TrainingJobSpec, WorkerResources};
use weft_e2e::{HarnessError, TestEnv, operator_binary, wait_for, wait_job_status};

/// One request the collector received: its path and body.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A minimal OTLP/HTTP collector: answers every POST with 200 and keeps it.
async fn collector() -> anyhow::Result<(u16, Received)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let received: Received = Arc::default();
    let keep = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = keep.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = request_line
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or_default()
                        .to_string();
                    let mut length = 0usize;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if let Ok(mut all) = keep.lock() {
                        all.push((path, String::from_utf8_lossy(&body).into_owned()));
                    }
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                    if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok((port, received))
}

/// Every span in the OTLP/JSON export requests received so far: (name, the
/// string attributes by key).
fn spans(received: &Received) -> Vec<(String, serde_json::Map<String, serde_json::Value>)> {
    let bodies: Vec<(String, String)> = received.lock().map(|r| r.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for (path, body) in bodies {
        if path != "/v1/traces" {
            continue;
        }
        let Ok(doc) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
        };
        let resource_spans = doc["resourceSpans"].as_array().cloned().unwrap_or_default();
        for rs in resource_spans {
            for ss in rs["scopeSpans"].as_array().cloned().unwrap_or_default() {
                for span in ss["spans"].as_array().cloned().unwrap_or_default() {
                    let mut attributes = serde_json::Map::new();
                    for kv in span["attributes"].as_array().cloned().unwrap_or_default() {
                        if let (Some(key), Some(value)) =
                            (kv["key"].as_str(), kv["value"]["stringValue"].as_str())
                        {
                            attributes.insert(key.to_string(), value.into());
                        }
                    }
                    out.push((
                        span["name"].as_str().unwrap_or_default().to_string(),
                        attributes,
                    ));
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn json_logs_and_otlp_traces_name_the_job() -> anyhow::Result<()> {
    let env = TestEnv::connect().await?;
    weft_e2e::ensure_training_job_crd(&env).await?;
    env.run("telemetry", |ns| async move {
        let (port, received) = collector().await?;
        let log_path = std::env::temp_dir().join(format!("weft-e2e-{}-operator.log", ns.name));
        let log = std::fs::File::create(&log_path)?;
        let _operator = Command::new(operator_binary()?)
            .args(["--log-format", "json", "run", "--namespace", &ns.name])
            .args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            )
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
                let received = received.clone();
                let namespace = ns.name.clone();
                async move {
                    let spans = spans(&received);
                    let reconcile = spans.iter().any(|(name, attributes)| {
                        name == "reconcile"
                            && attributes.get("job").and_then(|v| v.as_str()) == Some("traced")
                            && attributes.get("namespace").and_then(|v| v.as_str())
                                == Some(namespace.as_str())
                            && attributes.get("outcome").and_then(|v| v.as_str()) == Some("ok")
                    });
                    let children = spans.iter().any(|(name, _)| name == "list_job_pods")
                        && spans.iter().any(|(name, _)| name == "write_status");
                    Ok::<_, HarnessError>((reconcile && children).then_some(spans.len()))
                }
            },
        )
        .await?;
        ensure!(found > 0);
        let service = received
            .lock()
            .map(|r| r.iter().any(|(_, body)| body.contains("\"weft-operator\"")))
            .unwrap_or(false);
        ensure!(
            service,
            "the exported resource does not name the service weft-operator"
        );

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
