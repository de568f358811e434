//! Progress into the TrainingJob's status: the pod of rank 0 writes the last
//! step, the throughput, when the last step was reported and how long steps
//! take, the first step of its mesh epoch, and the last complete checkpoint
//! into `status.step`, `tokensPerSecond`, `lastStepTime`, `stepSeconds`,
//! `epochFirstStep` and `lastCheckpoint`, as the job's worker ServiceAccount
//! (which may write that job's status and nothing else). The operator keeps
//! these fields when it writes the rest, and derives from them the time to
//! the first step, the last recovery, goodput and the `Stalled` condition.
//!
//! Writes go out at most every few seconds, from a task on the pod's
//! [`ApiLink`], so the API server never slows a step (the first step of a
//! mesh epoch goes out at once: the recovery time reads it); a failed write
//! is logged and the next one carries the newer figures. Outside a cluster
//! (no in-cluster account and no KUBECONFIG) there is no link, nothing is
//! written, and training goes on.

use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
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
    /// Seconds the step took.
    pub step_seconds: f64,
    /// The mesh epoch the step was trained in.
    pub epoch: u64,
    /// The checkpoint this step completed: its step and directory.
    pub checkpoint: Option<(u64, String)>,
}

/// What one write says: the latest step's progress, when it was reported,
/// the mean step time since the write before, the first step of its epoch,
/// and the checkpoint completed since the write before.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub step: u64,
    pub tokens_per_s: f64,
    pub last_step_time: Time,
    pub step_seconds: f64,
    /// The epoch, its first step and when that was reported.
    pub epoch_first_step: (u64, u64, Time),
    pub checkpoint: Option<(u64, String)>,
}

/// Now, as Kubernetes writes a Time (whole seconds), so that the operator,
/// which writes the status back, keeps the value as it is.
fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// The reports of a stream of steps: what each write carries, and whether
/// a step must be written at once (the first of a mesh epoch).
#[derive(Debug, Default)]
pub struct Reports {
    latest: Option<(Progress, Time)>,
    epoch_first_step: Option<(u64, u64, Time)>,
    checkpoint: Option<(u64, String)>,
    /// Step seconds since the last write: their sum and count.
    seconds: (f64, u32),
}

impl Reports {
    /// Adds a step reported at `at`; true when it is the first of its
    /// epoch (write it now).
    pub fn add(&mut self, progress: Progress, at: Time) -> bool {
        let first = self
            .epoch_first_step
            .as_ref()
            .is_none_or(|(epoch, _, _)| *epoch != progress.epoch);
        if first {
            self.epoch_first_step = Some((progress.epoch, progress.step, at.clone()));
        }
        if progress.step_seconds.is_finite() && progress.step_seconds >= 0.0 {
            self.seconds.0 += progress.step_seconds;
            self.seconds.1 += 1;
        }
        self.checkpoint = progress.checkpoint.clone().or(self.checkpoint.take());
        self.latest = Some((progress, at));
        first
    }

    /// The report to write now, if a step came since the last one.
    pub fn take_report(&mut self) -> Option<Report> {
        let (progress, at) = self.latest.take()?;
        // Set by `add` with the step `latest` holds.
        let epoch_first_step = self.epoch_first_step.clone()?;
        let (sum, count) = std::mem::take(&mut self.seconds);
        Some(Report {
            step: progress.step,
            tokens_per_s: progress.tokens_per_s,
            last_step_time: at,
            step_seconds: if count > 0 {
                sum / f64::from(count)
            } else {
                progress.step_seconds.max(0.0)
            },
            epoch_first_step,
            checkpoint: self.checkpoint.take(),
        })
    }
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
            let mut reports = Reports::default();
            let mut last_write = Instant::now() - EVERY;
            let mut reported = false;
            loop {
                let (closed, at_once) =
                    match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                        Ok(Some(p)) => (false, reports.add(p, now())),
                        Ok(None) => (true, false),
                        Err(_) => (false, false),
                    };
                let due = last_write.elapsed() >= EVERY || closed || at_once;
                if let Some(p) = due.then(|| reports.take_report()).flatten() {
                    let body = progress_patch(&p);
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

/// The merge patch of the status for a report (with the checkpoint
/// completed since the last write, if any: its step and directory).
pub fn progress_patch(report: &Report) -> serde_json::Value {
    let (epoch, first_step, first) = &report.epoch_first_step;
    let mut status = serde_json::json!({
        "step": report.step,
        // A printer column: a tenth of a token per second is all anyone reads.
        "tokensPerSecond": (report.tokens_per_s * 10.0).round() / 10.0,
        "lastStepTime": report.last_step_time,
        "stepSeconds": report.step_seconds,
        "epochFirstStep": { "meshEpoch": epoch, "step": first_step, "time": first },
    });
    if let Some((step, path)) = &report.checkpoint {
        status["lastCheckpoint"] = serde_json::json!({
            "step": step,
            "path": path,
            "time": report.last_step_time,
        });
    }
    serde_json::json!({ "status": status })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(step: u64, epoch: u64, checkpoint: bool) -> Progress {
        Progress {
            step,
            tokens_per_s: 8192.0,
            step_seconds: step as f64,
            epoch,
            checkpoint: checkpoint.then(|| (step, format!("/ckpt/step-{step:08}"))),
        }
    }

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + seconds).unwrap())
    }

    #[test]
    fn tokens_per_second_is_written_to_a_tenth() {
        let mut reports = Reports::default();
        let mut p = progress(1, 1, false);
        p.tokens_per_s = 2152.3010513271797;
        reports.add(p, at(0));
        let patch = progress_patch(&reports.take_report().unwrap());
        assert_eq!(patch["status"]["tokensPerSecond"].to_string(), "2152.3");
    }

    #[test]
    fn a_step_and_a_checkpoint_become_the_status_fields() {
        let mut reports = Reports::default();
        assert!(
            reports.add(progress(12, 3, true), at(0)),
            "first of epoch 3"
        );
        let patch = progress_patch(&reports.take_report().unwrap());
        assert_eq!(patch["status"]["step"], 12);
        assert_eq!(patch["status"]["tokensPerSecond"], 8192.0);
        assert_eq!(patch["status"]["stepSeconds"], 12.0);
        assert_eq!(patch["status"]["epochFirstStep"]["meshEpoch"], 3);
        assert_eq!(patch["status"]["epochFirstStep"]["step"], 12);
        assert_eq!(patch["status"]["lastCheckpoint"]["step"], 12);
        assert_eq!(
            patch["status"]["lastCheckpoint"]["path"],
            "/ckpt/step-00000012"
        );
        // Whole seconds, as the API server and the operator write it.
        for time in [
            &patch["status"]["lastCheckpoint"]["time"],
            &patch["status"]["lastStepTime"],
            &patch["status"]["epochFirstStep"]["time"],
        ] {
            let time = time.as_str().unwrap();
            assert!(time.ends_with('Z') && !time.contains('.'), "{time}");
            assert_eq!(time.len(), "2026-11-29T09:20:52Z".len(), "{time}");
        }
        // Nothing new: nothing to write.
        assert!(reports.take_report().is_none());
        assert!(!reports.add(progress(13, 3, false), at(5)));
        let plain = progress_patch(&reports.take_report().unwrap());
        assert!(plain["status"].get("lastCheckpoint").is_none());
    }

    /// Steps between writes: the latest one's figures and time, their mean
    /// step time, the epoch's first step kept until a new epoch's first
    /// step, which is written at once; a checkpoint between writes is not
    /// lost.
    #[test]
    fn the_reports_of_a_stream_of_steps() {
        let mut reports = Reports::default();
        assert!(reports.add(progress(1, 1, false), at(10)));
        assert!(!reports.add(progress(2, 1, true), at(11)));
        assert!(!reports.add(progress(3, 1, false), at(12)));
        let r = reports.take_report().unwrap();
        assert_eq!((r.step, r.step_seconds), (3, 2.0));
        assert_eq!(r.last_step_time, at(12));
        assert_eq!(r.epoch_first_step, (1, 1, at(10)));
        assert_eq!(r.checkpoint, Some((2, "/ckpt/step-00000002".to_string())));
        assert!(!reports.add(progress(4, 1, false), at(20)));
        let r = reports.take_report().unwrap();
        assert_eq!((r.step_seconds, r.checkpoint), (4.0, None));
        assert_eq!(r.epoch_first_step, (1, 1, at(10)));
        // A new epoch (the run resumed from step 2 after a change).
        assert!(reports.add(progress(3, 2, false), at(40)));
        assert_eq!(
            reports.take_report().unwrap().epoch_first_step,
            (2, 3, at(40))
        );
    }
}
