//! The operator's Prometheus metrics and its HTTP endpoints: `/metrics`
//! (OpenMetrics text), `/healthz` (the process serves) and `/readyz` (it has
//! reached the API server: it leads, or stands by ready to).
//!
//! Counters and the latency histogram are updated by each reconcile; the
//! per-job gauges (jobs by phase, workers, mesh epochs) are read from the
//! controller's cache when scraped, so a deleted job disappears from them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use kube::ResourceExt;
use kube::api::DynamicObject;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use weft_crds::{Phase, TrainingJobStatus};

type Labels = Vec<(String, String)>;

const PHASES: [Phase; 7] = [
    Phase::Pending,
    Phase::Starting,
    Phase::Running,
    Phase::Rescaling,
    Phase::Suspended,
    Phase::Succeeded,
    Phase::Failed,
];

/// Errors of the HTTP endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl ServeError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            ServeError::Bind { .. } => "metrics_listen",
        }
    }
}

/// Everything the operator measures.
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: Counter,
    /// Failed reconciles, by error category.
    pub errors: Family<Labels, Counter>,
    /// How long a reconcile takes.
    pub reconcile_seconds: Histogram,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// 1 once the operator has reached the API server.
    pub ready: AtomicBool,
    /// While leading: the node and pod caches hold a full list.
    caches_synced: AtomicBool,
    /// While leading: when the TrainingJob or pod watch of the controller
    /// last failed.
    last_watch_failure: std::sync::Mutex<Option<std::time::Instant>>,
    jobs: Family<Labels, Gauge>,
    workers_ready: Family<Labels, Gauge>,
    workers_desired: Family<Labels, Gauge>,
    mesh_epoch: Family<Labels, Gauge>,
    restarts: Family<Labels, Gauge>,
    time_to_first_step: Family<Labels, Gauge>,
    last_recovery: Family<Labels, Gauge>,
    last_recovery_from_fault: Family<Labels, Gauge>,
    goodput: Family<Labels, Gauge<f64, AtomicU64>>,
    stalled: Family<Labels, Gauge>,
    store: Mutex<Option<Store<DynamicObject>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// How long a failed watch keeps `/readyz` at 503: a watch that keeps
/// failing fails again within it (its backoff is shorter).
pub const WATCH_FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

impl Metrics {
    /// While leading: whether the node and pod caches hold a full list.
    pub fn set_caches_synced(&self, synced: bool) {
        self.caches_synced.store(synced, Ordering::Relaxed);
    }

    /// While leading: the TrainingJob or pod watch of the controller failed
    /// now (it retries with a backoff; a watch that keeps failing keeps
    /// saying so).
    pub fn watch_failed(&self) {
        if let Ok(mut last) = self.last_watch_failure.lock() {
            *last = Some(std::time::Instant::now());
        }
    }

    /// A new term of leadership: no failures yet.
    pub fn clear_watch_failures(&self) {
        if let Ok(mut last) = self.last_watch_failure.lock() {
            *last = None;
        }
    }

    fn watch_failed_lately(&self) -> bool {
        self.last_watch_failure
            .lock()
            .ok()
            .and_then(|last| *last)
            .is_some_and(|at| at.elapsed() < WATCH_FAILURE_MEMORY)
    }

    /// Why `/readyz` says no: not connected yet, or leading without being
    /// able to reconcile (caches not synced, the job watch failed within the
    /// last [`WATCH_FAILURE_MEMORY`]). A standby is ready when connected: it
    /// is ready to lead.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Relaxed) {
            return Some("not connected to the API server yet");
        }
        if self.leader.get() == 1 {
            if !self.caches_synced.load(Ordering::Relaxed) {
                return Some("leading, but the node and pod caches are not synced yet");
            }
            if self.watch_failed_lately() {
                return Some(
                    "leading, but the TrainingJob or pod watch failed within the last minute (the operator's log says why)",
                );
            }
        }
        None
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weft");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        // 1 ms to ~33 s.
        let reconcile_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let leader = Gauge::default();
        let jobs = Family::<Labels, Gauge>::default();
        let workers_ready = Family::<Labels, Gauge>::default();
        let workers_desired = Family::<Labels, Gauge>::default();
        let mesh_epoch = Family::<Labels, Gauge>::default();
        let restarts = Family::<Labels, Gauge>::default();
        let time_to_first_step = Family::<Labels, Gauge>::default();
        let last_recovery = Family::<Labels, Gauge>::default();
        let last_recovery_from_fault = Family::<Labels, Gauge>::default();
        let goodput = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let stalled = Family::<Labels, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by error category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile of one job takes",
            reconcile_seconds.clone(),
        );
        registry.register("leader", "1 while this replica leads", leader.clone());
        registry.register("jobs", "TrainingJobs by phase", jobs.clone());
        registry.register(
            "job_workers_ready",
            "Running workers of a job",
            workers_ready.clone(),
        );
        registry.register(
            "job_workers_desired",
            "Workers the job's current mesh wants",
            workers_desired.clone(),
        );
        registry.register(
            "job_mesh_epoch",
            "The job's current mesh epoch",
            mesh_epoch.clone(),
        );
        registry.register(
            "job_restarts",
            "Worker failures counted against the job's restart limit",
            restarts.clone(),
        );
        registry.register(
            "job_time_to_first_step_seconds",
            "Seconds from the job's start to its first training step",
            time_to_first_step.clone(),
        );
        registry.register(
            "job_last_recovery_seconds",
            "Seconds from the job's last membership change to the first step of its mesh epoch",
            last_recovery.clone(),
        );
        registry.register(
            "job_last_recovery_from_fault_seconds",
            "Seconds from the fault behind the job's last membership change (a node NotReady, a worker failed or deleted) to the first step of its mesh epoch",
            last_recovery_from_fault.clone(),
        );
        registry.register(
            "job_goodput",
            "Useful training time over wall time since the job's start",
            goodput.clone(),
        );
        registry.register(
            "job_stalled",
            "1 while the job's Stalled condition is true (jobs that set elasticity.stallTimeoutSeconds)",
            stalled.clone(),
        );
        Metrics {
            registry,
            reconciles,
            errors,
            reconcile_seconds,
            leader,
            ready: AtomicBool::new(false),
            caches_synced: AtomicBool::new(false),
            last_watch_failure: std::sync::Mutex::new(None),
            jobs,
            workers_ready,
            workers_desired,
            mesh_epoch,
            restarts,
            time_to_first_step,
            last_recovery,
            last_recovery_from_fault,
            goodput,
            stalled,
            store: Mutex::new(None),
        }
    }

    /// Counts a failed reconcile.
    pub fn error(&self, category: &str) {
        self.errors
            .get_or_create(&vec![("category".to_string(), category.to_string())])
            .inc();
    }

    /// The controller's cache, from which the per-job gauges are read.
    pub fn watch_jobs(&self, store: Store<DynamicObject>) {
        if let Ok(mut slot) = self.store.lock() {
            *slot = Some(store);
        }
    }

    /// Sets the per-job gauges from `jobs` (TrainingJobs as the API server
    /// holds them). A job whose status cannot be read counts under the
    /// phase `Unreadable` and has no gauges of its own.
    pub fn observe_jobs(&self, jobs: &[Arc<DynamicObject>]) {
        for family in [
            &self.workers_ready,
            &self.workers_desired,
            &self.mesh_epoch,
            &self.restarts,
            &self.time_to_first_step,
            &self.last_recovery,
            &self.last_recovery_from_fault,
            &self.stalled,
        ] {
            family.clear();
        }
        self.goodput.clear();
        let statuses: Vec<(&DynamicObject, Option<TrainingJobStatus>)> = jobs
            .iter()
            .map(|job| {
                let status = match job.data.get("status") {
                    None | Some(serde_json::Value::Null) => Some(TrainingJobStatus::default()),
                    Some(status) => serde_json::from_value(status.clone()).ok(),
                };
                (&**job, status)
            })
            .collect();
        for phase in PHASES {
            let count = statuses
                .iter()
                .filter(|(_, s)| s.as_ref().is_some_and(|s| s.phase == phase))
                .count();
            self.jobs
                .get_or_create(&vec![("phase".to_string(), format!("{phase:?}"))])
                .set(count as i64);
        }
        self.jobs
            .get_or_create(&vec![("phase".to_string(), "Unreadable".to_string())])
            .set(statuses.iter().filter(|(_, s)| s.is_none()).count() as i64);
        for (job, status) in statuses {
            let Some(status) = status else { continue };
            let labels = vec![
                ("namespace".to_string(), job.namespace().unwrap_or_default()),
                ("job".to_string(), job.name_any()),
            ];
            self.workers_ready
                .get_or_create(&labels)
                .set(status.workers_ready.into());
            self.workers_desired
                .get_or_create(&labels)
                .set(status.workers_desired.into());
            self.mesh_epoch
                .get_or_create(&labels)
                .set(status.mesh_epoch);
            self.restarts
                .get_or_create(&labels)
                .set(status.restarts.into());
            // The figures a job has once it trains, and the condition of
            // a job that asks for it.
            if let Some(seconds) = status.time_to_first_step_seconds {
                self.time_to_first_step.get_or_create(&labels).set(seconds);
            }
            if let Some(recovery) = &status.last_recovery {
                self.last_recovery
                    .get_or_create(&labels)
                    .set(recovery.seconds);
                if let Some(seconds) = recovery.from_fault_seconds {
                    self.last_recovery_from_fault
                        .get_or_create(&labels)
                        .set(seconds);
                }
            }
            if let Some(goodput) = status.goodput {
                self.goodput.get_or_create(&labels).set(goodput);
            }
            if let Some(stalled) = status
                .conditions
                .iter()
                .find(|c| c.type_ == crate::status::CONDITION_STALLED)
            {
                self.stalled
                    .get_or_create(&labels)
                    .set(i64::from(stalled.status == "True"));
            }
        }
    }

    /// The metrics as OpenMetrics text.
    pub fn render(&self) -> String {
        let jobs = self
            .store
            .lock()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.state()));
        if let Some(jobs) = jobs {
            self.observe_jobs(&jobs);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        "/readyz" => match metrics.not_ready_reason() {
            None => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            Some(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{reason}\n"),
            ),
        },
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics, /healthz or /readyz\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds `addr`; the returned future serves the endpoints until dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(SocketAddr, impl Future<Output = ()>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    let serving = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = respond(&metrics, request.uri().path());
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                // A client that hangs up mid-request is its own problem.
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    };
    Ok((bound, serving))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_crds::{TrainingJob, TrainingJobSpec};

    fn job(name: &str, phase: Phase, epoch: i64) -> Arc<DynamicObject> {
        let mut job = TrainingJob::new(name, TrainingJobSpec::new("weft:dev", 1, 2));
        job.metadata.namespace = Some("team-a".into());
        job.status = Some(TrainingJobStatus {
            phase,
            mesh_epoch: epoch,
            workers_ready: 2,
            workers_desired: 2,
            ..Default::default()
        });
        Arc::new(serde_json::from_value(serde_json::to_value(job).unwrap()).unwrap())
    }

    #[test]
    fn the_exposition_counts_jobs_by_phase_and_names_each_job() {
        let metrics = Metrics::new();
        metrics.reconciles.inc();
        metrics.error("kubernetes_api");
        metrics.reconcile_seconds.observe(0.02);
        metrics.observe_jobs(&[
            {
                let mut a = (*job("a", Phase::Running, 3)).clone();
                let status = &mut a.data["status"];
                status["timeToFirstStepSeconds"] = 42.into();
                status["lastRecovery"] =
                    serde_json::json!({"meshEpoch": 3, "seconds": 7, "fromFaultSeconds": 29});
                status["goodput"] = 0.8.into();
                status["conditions"] = serde_json::json!([{
                    "type": "Stalled", "status": "True", "reason": "NoStepReported",
                    "message": "no training step reported for 600 s",
                    "lastTransitionTime": "2026-12-06T12:00:00Z",
                }]);
                Arc::new(a)
            },
            job("b", Phase::Running, 1),
            job("c", Phase::Pending, 0),
            {
                let mut bad = (*job("d", Phase::Running, 1)).clone();
                bad.data["status"]["lastRescaleTime"] = "2026-12-06T12:00:00.123456789123Z".into();
                Arc::new(bad)
            },
        ]);
        let text = {
            let mut out = String::new();
            encode(&mut out, &metrics.registry).unwrap();
            out
        };
        for line in [
            "weft_job_time_to_first_step_seconds{namespace=\"team-a\",job=\"a\"} 42",
            "weft_job_last_recovery_seconds{namespace=\"team-a\",job=\"a\"} 7",
            "weft_job_last_recovery_from_fault_seconds{namespace=\"team-a\",job=\"a\"} 29",
            "weft_job_goodput{namespace=\"team-a\",job=\"a\"} 0.8",
            "weft_job_stalled{namespace=\"team-a\",job=\"a\"} 1",
            "weft_reconciles_total 1",
            "weft_reconcile_errors_total{category=\"kubernetes_api\"} 1",
            "weft_reconcile_duration_seconds_count 1",
            "weft_jobs{phase=\"Running\"} 2",
            "weft_jobs{phase=\"Pending\"} 1",
            "weft_jobs{phase=\"Unreadable\"} 1",
            "weft_jobs{phase=\"Failed\"} 0",
            "weft_job_mesh_epoch{namespace=\"team-a\",job=\"a\"} 3",
            "weft_job_workers_ready{namespace=\"team-a\",job=\"c\"} 2",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // A job that has not trained has none of the figures.
        for name in [
            "time_to_first_step_seconds",
            "last_recovery_seconds",
            "last_recovery_from_fault_seconds",
            "goodput",
            "stalled",
        ] {
            let line = format!("weft_job_{name}{{namespace=\"team-a\",job=\"b\"}}");
            assert!(!text.contains(&line), "{line:?} in\n{text}");
        }
        // A job gone from the cache is gone from the gauges.
        metrics.observe_jobs(&[job("a", Phase::Succeeded, 3)]);
        let mut out = String::new();
        encode(&mut out, &metrics.registry).unwrap();
        assert!(!out.contains("job=\"b\""), "{out}");
        assert!(out.contains("weft_jobs{phase=\"Running\"} 0"), "{out}");
    }

    #[tokio::test]
    async fn the_endpoints_answer_over_http() {
        let metrics = Arc::new(Metrics::new());
        let (addr, serving) = serve("127.0.0.1:0".parse().unwrap(), metrics.clone())
            .await
            .unwrap();
        let server = tokio::spawn(serving);
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.ready.store(true, Ordering::Relaxed);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        // A leader is ready only while it can reconcile.
        metrics.leader.set(1);
        let not_synced = get("/readyz").await;
        assert!(
            not_synced.starts_with("HTTP/1.1 503") && not_synced.contains("caches are not synced"),
            "{not_synced}"
        );
        metrics.set_caches_synced(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        metrics.watch_failed();
        let failing = get("/readyz").await;
        assert!(
            failing.starts_with("HTTP/1.1 503") && failing.contains("watch failed"),
            "{failing}"
        );
        metrics.clear_watch_failures();
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        let text = get("/metrics").await;
        assert!(text.contains("weft_reconciles_total 0"), "{text}");
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
