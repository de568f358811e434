//! Progress into the TrainingJob's status: the pod of rank 0 writes the last
//! step, the throughput and the last complete checkpoint into
//! `status.step`, `status.tokensPerSecond` and `status.lastCheckpoint`, as
//! the job's worker ServiceAccount (which may write that job's status and
//! nothing else). The operator keeps these fields when it writes the rest.
//!
//! Writes go out at most every few seconds, from a thread of their own, so
//! the API server never slows a step; a failed write is logged and the next
//! one carries the newer figures. Outside a cluster (no in-cluster account
//! and no KUBECONFIG) nothing is written, and training goes on.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use weft_crds::TrainingJob;

use crate::train::StepMetrics;

/// How often progress is written at most.
const EVERY: Duration = Duration::from_secs(5);

/// Hands each step's metrics (rank 0's) to the thread that writes them.
#[derive(Debug)]
pub struct StatusReporter {
    tx: Option<mpsc::Sender<StepMetrics>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusReporter {
    /// Starts writing the progress of job `job` in `namespace`; checkpoints
    /// are reported under `checkpoint_path`.
    pub fn start(
        namespace: String,
        job: String,
        checkpoint_path: String,
        log: impl Fn(&str) + Send + 'static,
    ) -> StatusReporter {
        let (tx, rx) = mpsc::channel::<StepMetrics>();
        let thread = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    log(&format!("progress is not reported: no async runtime: {e}"));
                    return drain(rx);
                }
            };
            let client = match runtime.block_on(Client::try_default()) {
                Ok(c) => c,
                Err(e) => {
                    log(&format!(
                        "progress is not reported to the job's status (no cluster: {e})"
                    ));
                    return drain(rx);
                }
            };
            let jobs: Api<TrainingJob> = Api::namespaced(client, &namespace);
            let mut pending: Option<StepMetrics> = None;
            let mut checkpoint: Option<u64> = None;
            let mut last_write = Instant::now() - EVERY;
            let mut reported = false;
            loop {
                let closed = match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(m) => {
                        checkpoint = m.checkpoint.or(checkpoint);
                        pending = Some(m);
                        false
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Err(mpsc::RecvTimeoutError::Disconnected) => true,
                };
                let due = last_write.elapsed() >= EVERY || closed;
                if let Some(m) = pending.take_if(|_| due) {
                    let body = progress_patch(&m, checkpoint.take(), &checkpoint_path);
                    let written = runtime.block_on(jobs.patch_status(
                        &job,
                        &PatchParams::default(),
                        &Patch::Merge(&body),
                    ));
                    match written {
                        Ok(_) if !reported => {
                            log(&format!(
                                "reporting progress to the status of TrainingJob {namespace}/{job} (step {})",
                                m.step
                            ));
                            reported = true;
                        }
                        Ok(_) => {}
                        Err(e) => log(&format!(
                            "could not write step {} to the job's status: {e}",
                            m.step
                        )),
                    }
                    last_write = Instant::now();
                }
                if closed {
                    return;
                }
            }
        });
        StatusReporter {
            tx: Some(tx),
            thread: Some(thread),
        }
    }

    /// A sender for another thread (the reader of rank 0's output).
    pub fn sender(&self) -> Option<mpsc::Sender<StepMetrics>> {
        self.tx.clone()
    }

    /// Writes what is still pending and stops.
    pub fn finish(mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn drain(rx: mpsc::Receiver<StepMetrics>) {
    for _ in rx {}
}

/// The merge patch of the status for a step (and the checkpoint completed
/// since the last write, if any: its directory under `checkpoint_path`).
pub fn progress_patch(
    metrics: &StepMetrics,
    checkpoint: Option<u64>,
    checkpoint_path: &str,
) -> serde_json::Value {
    let mut status = serde_json::json!({
        "step": metrics.step,
        "tokensPerSecond": metrics.tokens_per_s,
    });
    if let Some(step) = checkpoint {
        // As Kubernetes writes a Time (whole seconds), so that the operator,
        // which writes the status back, keeps the value as it is.
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        let path = crate::train::checkpoint_path(std::path::Path::new(checkpoint_path), step);
        status["lastCheckpoint"] = serde_json::json!({
            "step": step,
            "path": path.display().to_string(),
            "time": now,
        });
    }
    serde_json::json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_and_a_checkpoint_become_the_status_fields() {
        let metrics: StepMetrics = serde_json::from_value(serde_json::json!({
            "step": 12, "loss": 3.5, "tokens": 4096, "sequences": 9, "step_time_s": 0.5,
            "tokens_per_s": 8192.0, "lr": 0.001, "grad_norm": 1.0, "world": 2,
            "strategy": "weft", "micro_batches": 1, "max_cp_degree": 1, "balance": 1.0,
            "token_balance": 1.0, "attention_s": 0.1, "remap_s": 0.0, "all_reduce_s": 0.1,
            "plan_s": 0.01, "checkpoint": 12
        }))
        .unwrap();
        let patch = progress_patch(&metrics, metrics.checkpoint, "/ckpt");
        assert_eq!(patch["status"]["step"], 12);
        assert_eq!(patch["status"]["tokensPerSecond"], 8192.0);
        assert_eq!(patch["status"]["lastCheckpoint"]["step"], 12);
        assert_eq!(
            patch["status"]["lastCheckpoint"]["path"],
            "/ckpt/step-00000012"
        );
        // Whole seconds, as the API server and the operator write it.
        let time = patch["status"]["lastCheckpoint"]["time"].as_str().unwrap();
        assert!(time.ends_with('Z') && !time.contains('.'), "{time}");
        assert_eq!(time.len(), "2026-11-29T09:20:52Z".len(), "{time}");
        let plain = progress_patch(&metrics, None, "/ckpt");
        assert!(plain["status"].get("lastCheckpoint").is_none());
    }
}
