//! Progress into the TrainingJob's status: the pod of rank 0 writes the last
//! step, the throughput and the last complete checkpoint into
//! `status.step`, `status.tokensPerSecond` and `status.lastCheckpoint`, as
//! the job's worker ServiceAccount (which may write that job's status and
//! nothing else). The operator keeps these fields when it writes the rest.
//!
//! Writes go out at most every few seconds, from a task on the pod's
//! [`ApiLink`], so the API server never slows a step; a failed write is
//! logged and the next one carries the newer figures. Outside a cluster (no
//! in-cluster account and no KUBECONFIG) there is no link, nothing is
//! written, and training goes on.

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::mpsc;
use weft_crds::TrainingJob;

use crate::ApiLink;

/// How often progress is written at most.
const EVERY: Duration = Duration::from_secs(5);

/// What a step reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub tokens_per_s: f64,
    /// The checkpoint this step completed: its step and directory.
    pub checkpoint: Option<(u64, String)>,
}

/// Hands each step's progress (rank 0's) to the task that writes it.
#[derive(Debug)]
pub struct StatusReporter {
    tx: Option<mpsc::UnboundedSender<Progress>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StatusReporter {
    /// Starts writing the progress of job `job` in `namespace` over `link`.
    pub fn start(
        link: &ApiLink,
        namespace: String,
        job: String,
        log: impl Fn(&str) + Send + 'static,
    ) -> StatusReporter {
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let jobs: Api<TrainingJob> = Api::namespaced(link.client(), &namespace);
        let task = link.spawn(async move {
            let mut pending: Option<Progress> = None;
            let mut checkpoint: Option<(u64, String)> = None;
            let mut last_write = Instant::now() - EVERY;
            let mut reported = false;
            loop {
                let closed = match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
                {
                    Ok(Some(p)) => {
                        checkpoint = p.checkpoint.clone().or(checkpoint);
                        pending = Some(p);
                        false
                    }
                    Ok(None) => true,
                    Err(_) => false,
                };
                let due = last_write.elapsed() >= EVERY || closed;
                if let Some(p) = pending.take_if(|_| due) {
                    let body = progress_patch(&p, checkpoint.take());
                    let written = jobs
                        .patch_status(&job, &PatchParams::default(), &Patch::Merge(&body))
                        .await;
                    match written {
                        Ok(_) if !reported => {
                            log(&format!(
                                "reporting progress to the status of TrainingJob {namespace}/{job} (step {})",
                                p.step
                            ));
                            reported = true;
                        }
                        Ok(_) => {}
                        Err(e) => log(&format!(
                            "could not write step {} to the job's status: {e}",
                            p.step
                        )),
                    }
                    last_write = Instant::now();
                }
                if closed {
                    return;
                }
            }
        });
        StatusReporter { tx: Some(tx), task }
    }

    /// A sender for another thread (the reader of rank 0's output).
    pub fn sender(&self) -> Option<mpsc::UnboundedSender<Progress>> {
        self.tx.clone()
    }

    /// Writes what is still pending and stops (once every sender is gone).
    pub fn finish(mut self, link: &ApiLink) {
        self.tx = None;
        if let Some(task) = self.task.take() {
            link.wait(task);
        }
    }
}

/// The merge patch of the status for a step's progress (and the checkpoint
/// completed since the last write, if any: its step and directory).
pub fn progress_patch(progress: &Progress, checkpoint: Option<(u64, String)>) -> serde_json::Value {
    let mut status = serde_json::json!({
        "step": progress.step,
        "tokensPerSecond": progress.tokens_per_s,
    });
    if let Some((step, path)) = checkpoint {
        // As Kubernetes writes a Time (whole seconds), so that the operator,
        // which writes the status back, keeps the value as it is.
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        );
        status["lastCheckpoint"] = serde_json::json!({
            "step": step,
            "path": path,
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
        let progress = Progress {
            step: 12,
            tokens_per_s: 8192.0,
            checkpoint: Some((12, "/ckpt/step-00000012".into())),
        };
        let patch = progress_patch(&progress, progress.checkpoint.clone());
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
        let plain = progress_patch(&progress, None);
        assert!(plain["status"].get("lastCheckpoint").is_none());
    }
}
