//! The worker inside a pod of a TrainingJob (`weft-trainer worker`).
//!
//! The operator gives each pod its name (`WEFT_WORKER`), the mesh of the
//! current epoch (`WEFT_MESH`, a file of the job's ConfigMap, which Kubernetes
//! updates in place when the epoch changes), the training parameters
//! (`WEFT_TRAINING`) and its pod IP (`WEFT_POD_IP`). The worker finds itself
//! in the mesh, starts one rank process per GPU it was given (the same code
//! path as `weft-trainer local`), and watches the mesh:
//!
//! - a new epoch (a node lost, capacity added): its ranks stop and start again
//!   in the new world, resuming from the last checkpoint; the data order only
//!   depends on the seed, so training continues as if nothing happened, less
//!   the steps since that checkpoint;
//! - not in the mesh: it waits (the operator deletes pods the mesh dropped);
//! - a rank fails: it waits for the operator to publish a new epoch (a peer's
//!   node lost looks like this from here) and fails only if none comes;
//! - the pod is asked to stop (SIGTERM: it is being deleted, the job
//!   suspended or shrunk): its ranks, and with them every rank of the
//!   epoch, stop after the same step with a checkpoint of it, and the worker
//!   exits with [`TERMINATED_EXIT`] without waiting out the grace period.
//!
//! Every rank exits 0 after the last step: the pod succeeds, and the job with it.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use weft_crds::worker::{TrainingParameters, env};
use weft_planner::mesh::{MeshPlan, MeshWorker};

/// What can keep a pod's worker from running.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error(
        "${0} is not set: `weft-trainer worker` runs in a pod made by the weft operator (use `weft-trainer local` on one machine)"
    )]
    MissingEnv(&'static str),
    #[error("{path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error(transparent)]
    Training(#[from] weft_crds::worker::WorkerConfigError),
    #[error("{path}: the mesh of epoch {epoch} has no rendezvous address")]
    NoRendezvous { path: PathBuf, epoch: u64 },
    #[error("{path}: rendezvous {address:?} is not host:port")]
    BadRendezvous { path: PathBuf, address: String },
    #[error("could not start rank {rank}: {reason}")]
    Spawn { rank: u32, reason: String },
    #[error(
        "rank {rank} failed in epoch {epoch}: {said} ({status}); no new epoch came within {waited_s} s"
    )]
    RankFailed {
        rank: u32,
        status: String,
        epoch: u64,
        waited_s: u64,
        /// The rank's own error (what it wrote to its error file), or that
        /// it wrote none.
        said: String,
    },
}

impl PodError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            PodError::MissingEnv(_) => "pod_environment",
            PodError::Unreadable { .. }
            | PodError::Training(_)
            | PodError::NoRendezvous { .. }
            | PodError::BadRendezvous { .. } => "pod_config",
            PodError::Spawn { .. } => "launch",
            PodError::RankFailed { .. } => "worker_failed",
        }
    }
}

/// What the pod's environment says.
#[derive(Clone, Debug, PartialEq)]
pub struct PodEnv {
    /// The job (`WEFT_JOB`) and its namespace (`WEFT_NAMESPACE`): where
    /// progress is reported, when both are known.
    pub job: Option<String>,
    pub namespace: Option<String>,
    pub worker: String,
    pub mesh: PathBuf,
    /// The ConfigMap the mesh comes from (`WEFT_MESH_CONFIGMAP`), followed
    /// through the API server too when known (the pod agent's `weft_agent::mirror`).
    pub mesh_config_map: Option<String>,
    pub training: PathBuf,
    /// The address this pod's ranks bind their collectives to.
    pub bind_host: String,
}

impl PodEnv {
    /// Reads the environment the operator sets (`var` looks a name up).
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<PodEnv, PodError> {
        let need = |name: &'static str| {
            var(name)
                .filter(|v| !v.is_empty())
                .ok_or(PodError::MissingEnv(name))
        };
        let bind_host = var(env::POD_IP)
            .filter(|v| !v.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "127.0.0.1".to_string());
        Ok(PodEnv {
            job: var(env::JOB).filter(|v| !v.is_empty()),
            namespace: var(env::NAMESPACE).filter(|v| !v.is_empty()),
            worker: need(env::WORKER)?,
            mesh: PathBuf::from(need(env::MESH)?),
            mesh_config_map: var(env::MESH_CONFIGMAP).filter(|v| !v.is_empty()),
            training: PathBuf::from(need(env::TRAINING)?),
            bind_host,
        })
    }
}

/// The mesh document at `path`.
pub fn read_mesh(path: &Path) -> Result<MeshPlan, PodError> {
    read_json(path)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, PodError> {
    let unreadable = |reason: String| PodError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| unreadable(e.to_string()))
}

/// Reads and checks the training parameters.
pub fn read_training(path: &Path) -> Result<TrainingParameters, PodError> {
    Ok(weft_crds::worker::read_training(path)?)
}

/// This worker's place in one epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub epoch: u64,
    pub world: u32,
    /// The global ranks this pod runs.
    pub ranks: Vec<u32>,
    pub store_host: String,
    pub port: u16,
    /// The W3C `traceparent` of the reconcile that published the epoch: the
    /// ranks' spans are its children.
    pub trace_parent: Option<String>,
}

/// Where `worker` stands in `mesh`, or `None` when the mesh does not have it.
pub fn placement(
    mesh: &MeshPlan,
    worker: &str,
    path: &Path,
) -> Result<Option<Placement>, PodError> {
    let Some(me): Option<&MeshWorker> = mesh.workers.iter().find(|w| w.name == worker) else {
        return Ok(None);
    };
    let address = mesh
        .rendezvous
        .clone()
        .ok_or_else(|| PodError::NoRendezvous {
            path: path.to_path_buf(),
            epoch: mesh.epoch,
        })?;
    let bad = || PodError::BadRendezvous {
        path: path.to_path_buf(),
        address: address.clone(),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Some(Placement {
        epoch: mesh.epoch,
        world: mesh.world_size,
        ranks: (me.first_rank..me.first_rank + me.gpus.max(1)).collect(),
        store_host: host.to_string(),
        port,
        trace_parent: mesh.trace_parent.clone(),
    }))
}

/// Whether the mesh at `path` is of a newer epoch than `epoch` (a file that
/// cannot be read, briefly absent while Kubernetes swaps it, is not). Only
/// the epoch is parsed: every rank asks this after every step.
pub fn mesh_is_newer(path: &Path, epoch: u64) -> bool {
    #[derive(Deserialize)]
    struct Epoch {
        epoch: u64,
    }
    read_json::<Epoch>(path).is_ok_and(|m| m.epoch > epoch)
}

/// The exit status of a rank that stopped, with every other rank after the
/// same step and a checkpoint of it, because a newer mesh epoch was published
/// or a pod was asked to stop.
pub const NEW_EPOCH_EXIT: i32 = 4;

/// The exit status of a pod's worker that stopped because it was asked to
/// (SIGTERM), after its ranks stopped with a checkpoint: what a process
/// ended by SIGTERM reports (128 + 15).
pub const TERMINATED_EXIT: i32 = 143;

/// How a pod's worker ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Training is complete.
    Finished,
    /// It was asked to stop (SIGTERM) and its ranks stopped.
    Stopped,
}

/// How long the ranks get, once the mesh has moved on, to stop together at a
/// step boundary before they are stopped (a rank stuck in a collective with
/// a lost peer would otherwise wait out the collective timeout).
const DRAIN: Duration = Duration::from_secs(30);

/// How long the mesh file may stay unreadable before the worker gives up.
const MESH_UNREADABLE_FOR: Duration = Duration::from_secs(30);

/// How one epoch ended.
#[derive(Debug, PartialEq)]
pub enum EpochEnd {
    /// Every rank finished training.
    Finished,
    /// The mesh moved to a newer epoch; the ranks were stopped.
    NewEpoch,
    /// A rank failed and no newer epoch came within the wait.
    Failed { rank: u32, status: String },
    /// The pod was asked to stop; its ranks were told, and stopped.
    Stopped,
}

/// The variable naming the file a pod's rank writes its error to
/// ([`rank_error_file`]), set by its worker.
pub const RANK_ERROR_FILE: &str = "WEFT_RANK_ERROR_FILE";

/// Where rank `rank` of `epoch` writes its error before it exits with one,
/// in the worker's directory `errors`: a failed rank's own words reach the
/// worker's error, and so the pod's termination message and the job's status.
pub fn rank_error_file(errors: &Path, epoch: u64, rank: u32) -> PathBuf {
    errors.join(format!("epoch-{epoch}-rank-{rank}.error"))
}

/// The most of a failed rank's words its worker's error carries.
const RANK_SAID_BYTES: usize = 1500;

/// What a failed rank said ([`rank_error_file`]), in one line.
fn rank_said(errors: &Path, epoch: u64, rank: u32) -> String {
    let said = std::fs::read_to_string(rank_error_file(errors, epoch, rank)).unwrap_or_default();
    let said = said.split_whitespace().collect::<Vec<_>>().join(" ");
    if said.is_empty() {
        return "it wrote no error".to_string();
    }
    // The worker's own words after it must fit the termination message.
    if said.len() > RANK_SAID_BYTES {
        return format!("{} …", crate::prefix_within(&said, RANK_SAID_BYTES));
    }
    said
}

/// Runs the pod's worker until training ends: finds this worker in each
/// epoch's mesh, starts its ranks with `spawn(rank, placement)` (each writes
/// its error, if it ends with one, to [`rank_error_file`] in `errors`), and
/// follows the mesh. `wait_for_epoch` bounds how long a failed rank waits for the
/// operator to publish a new epoch before the pod fails. Once `stop_asked` is set
/// (the pod got SIGTERM), the ranks are sent SIGTERM, which stops every rank
/// of the epoch after the same step with a checkpoint, and no new epoch is
/// joined.
pub fn supervise(
    env: &PodEnv,
    errors: &Path,
    wait_for_epoch: Duration,
    stop_asked: &AtomicBool,
    mut spawn: impl FnMut(u32, &Placement) -> Result<Child, PodError>,
    mut log: impl FnMut(&str),
) -> Result<Ended, PodError> {
    let poll = Duration::from_millis(250);
    let mut waiting_logged_for = None;
    let mut unreadable_since: Option<Instant> = None;
    // The epoch whose ranks stopped together: its mesh is not joined again.
    // (They stop for a newer epoch, or because a peer's pod was asked to
    // stop: the operator then publishes the next mesh without it.)
    let mut ended: Option<u64> = None;
    loop {
        if stop_asked.load(Ordering::SeqCst) {
            return Ok(Ended::Stopped);
        }
        let mesh = match read_json::<MeshPlan>(&env.mesh) {
            Ok(mesh) => {
                unreadable_since = None;
                mesh
            }
            // Kubernetes swaps the file atomically, but it may be absent
            // for a moment; a file that stays unreadable is an error.
            Err(e) => {
                let since = *unreadable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > MESH_UNREADABLE_FOR {
                    return Err(e);
                }
                std::thread::sleep(poll);
                continue;
            }
        };
        if ended.is_some_and(|e| mesh.epoch <= e) {
            if waiting_logged_for != Some(mesh.epoch) {
                log(&format!(
                    "epoch {} stopped; waiting for the next mesh",
                    mesh.epoch
                ));
                waiting_logged_for = Some(mesh.epoch);
            }
            std::thread::sleep(poll);
            continue;
        }
        let Some(place) = placement(&mesh, &env.worker, &env.mesh)? else {
            if waiting_logged_for != Some(mesh.epoch) {
                log(&format!("not in the mesh of epoch {}; waiting", mesh.epoch));
                waiting_logged_for = Some(mesh.epoch);
            }
            std::thread::sleep(poll);
            continue;
        };
        log(&format!(
            "epoch {}: ranks {:?} of {}, store {}:{}",
            place.epoch, place.ranks, place.world, place.store_host, place.port
        ));
        let mut children = Vec::new();
        for &rank in &place.ranks {
            match spawn(rank, &place) {
                Ok(child) => children.push((rank, child)),
                Err(e) => {
                    stop(&mut children);
                    return Err(e);
                }
            }
        }
        match follow(
            &mut children,
            &env.mesh,
            place.epoch,
            wait_for_epoch,
            stop_asked,
            poll,
        ) {
            EpochEnd::Finished => return Ok(Ended::Finished),
            EpochEnd::Stopped => {
                log(&format!(
                    "asked to stop: epoch {}'s ranks stopped after a checkpoint",
                    place.epoch
                ));
                return Ok(Ended::Stopped);
            }
            EpochEnd::NewEpoch => {
                ended = Some(place.epoch);
                if mesh_is_newer(&env.mesh, place.epoch) {
                    log(&format!(
                        "epoch {} ended: a new mesh is published",
                        place.epoch
                    ));
                } else {
                    log(&format!(
                        "epoch {} ended: a peer was asked to stop",
                        place.epoch
                    ));
                }
            }
            EpochEnd::Failed { rank, status } => {
                return Err(PodError::RankFailed {
                    rank,
                    status,
                    epoch: place.epoch,
                    waited_s: wait_for_epoch.as_secs(),
                    said: rank_said(errors, place.epoch, rank),
                });
            }
        }
    }
}

/// Watches one epoch's ranks and the mesh file until the epoch ends. When
/// the mesh moves on, the ranks get [`DRAIN`] to stop together at a step
/// boundary (they watch the mesh too, and agree on the step) before they are
/// stopped.
fn follow(
    children: &mut [(u32, Child)],
    mesh: &Path,
    epoch: u64,
    wait_for_epoch: Duration,
    stop_asked: &AtomicBool,
    poll: Duration,
) -> EpochEnd {
    let newer = || mesh_is_newer(mesh, epoch);
    let mut exited: Vec<Option<std::process::ExitStatus>> = vec![None; children.len()];
    let mut drain_until: Option<Instant> = None;
    let mut told_to_stop = false;
    loop {
        if !told_to_stop && stop_asked.load(Ordering::SeqCst) {
            // The ranks stop after the step they agree on, as for a new
            // epoch; what is left of the grace period bounds the wait.
            told_to_stop = true;
            // (Only to ranks not reaped yet: a reaped one's PID may be reused.)
            for ((_, child), _) in children.iter().zip(&exited).filter(|(_, e)| e.is_none()) {
                let _ = rustix::process::kill_process(
                    rustix::process::Pid::from_child(child),
                    rustix::process::Signal::TERM,
                );
            }
            drain_until = Some(drain_until.unwrap_or_else(|| Instant::now() + DRAIN));
        }
        if drain_until.is_none() && newer() {
            drain_until = Some(Instant::now() + DRAIN);
        }
        for (index, (_, child)) in children.iter_mut().enumerate() {
            if exited[index].is_none()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited[index] = Some(status);
            }
        }
        let failed = children
            .iter()
            .zip(&exited)
            .find_map(|((rank, _), status)| {
                status
                    .filter(|s| !s.success() && s.code() != Some(NEW_EPOCH_EXIT))
                    .map(|s| (*rank, s.to_string()))
            });
        let stopped_for_epoch = exited
            .iter()
            .any(|s| s.is_some_and(|s| s.code() == Some(NEW_EPOCH_EXIT)));
        if exited.iter().all(Option::is_some) && failed.is_none() {
            stop(children);
            return if told_to_stop && stopped_for_epoch {
                EpochEnd::Stopped
            } else if stopped_for_epoch {
                EpochEnd::NewEpoch
            } else {
                EpochEnd::Finished
            };
        }
        if drain_until.is_some_and(|until| Instant::now() > until) {
            stop(children);
            return if told_to_stop {
                EpochEnd::Stopped
            } else {
                EpochEnd::NewEpoch
            };
        }
        if let Some((rank, status)) = failed {
            stop(children);
            if told_to_stop {
                return EpochEnd::Stopped;
            }
            // A peer's node lost looks like this from here: give the
            // operator the time to publish the next epoch.
            let deadline = Instant::now() + wait_for_epoch;
            loop {
                if stop_asked.load(Ordering::SeqCst) {
                    return EpochEnd::Stopped;
                }
                if newer() {
                    return EpochEnd::NewEpoch;
                }
                if Instant::now() >= deadline {
                    return EpochEnd::Failed { rank, status };
                }
                std::thread::sleep(poll);
            }
        }
        std::thread::sleep(poll);
    }
}

fn stop(children: &mut [(u32, Child)]) {
    for (_, child) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_planner::cluster::parse_cluster;
    use weft_planner::mesh::{MeshNode, MeshRequest, plan_mesh};

    fn mesh(workers: u32, gpus: u32, epoch: u64) -> MeshPlan {
        let nodes = MeshNode::all_free(&parse_cluster(&format!("{workers}x{gpus}")).unwrap());
        let request = MeshRequest {
            job: "llm".into(),
            min_workers: workers,
            max_workers: workers,
            gpus_per_worker: gpus,
            epoch,
        };
        let mut mesh = plan_mesh(&request, &nodes, &[]).unwrap();
        mesh.rendezvous = Some(format!("{}.llm:29507", mesh.workers[0].name));
        mesh
    }

    #[test]
    fn the_operators_training_parameters_carry_the_data_order() {
        use weft_crds::DataOrder;
        let golden =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/training.json");
        let text = std::fs::read_to_string(&golden).unwrap();
        let training: TrainingParameters = serde_json::from_str(&text).unwrap();
        assert_eq!(training.data.order, DataOrder::Documents);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        value["data"]["order"] = "Decomposed".into();
        value["data"]["minBucketLength"] = 128.into();
        let training: TrainingParameters = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(training.data.order, DataOrder::Decomposed);
        assert_eq!(training.data.min_bucket_length, 128);
        // Parameters from an operator that predates the data order: whole documents.
        for field in ["order", "minBucketLength", "curriculumSteps"] {
            value["data"].as_object_mut().unwrap().remove(field);
        }
        let training: TrainingParameters = serde_json::from_value(value).unwrap();
        assert_eq!(training.data.order, DataOrder::Documents);
    }

    #[test]
    fn a_worker_runs_its_own_ranks_and_meets_at_the_epochs_store() {
        let mesh = mesh(3, 4, 7);
        let second = &mesh.workers[1];
        let place = placement(&mesh, &second.name, Path::new("mesh.json"))
            .unwrap()
            .unwrap();
        assert_eq!(place.world, 12);
        assert_eq!(
            place.ranks,
            (second.first_rank..second.first_rank + 4).collect::<Vec<_>>()
        );
        assert_eq!(place.port, 29507);
        assert_eq!(place.store_host, format!("{}.llm", mesh.workers[0].name));
        assert_eq!(place.epoch, 7);
        assert_eq!(
            placement(&mesh, "someone-else", Path::new("mesh.json")).unwrap(),
            None
        );
    }

    #[test]
    fn a_mesh_without_a_usable_rendezvous_is_refused_by_name() {
        let mut m = mesh(2, 1, 1);
        let name = m.workers[0].name.clone();
        m.rendezvous = None;
        let err = placement(&m, &name, Path::new("/etc/weft/mesh/mesh.json")).unwrap_err();
        assert!(err.to_string().contains("no rendezvous address"), "{err}");
        m.rendezvous = Some("no-port".into());
        let err = placement(&m, &name, Path::new("mesh.json")).unwrap_err();
        assert_eq!(err.category(), "pod_config");
        assert!(err.to_string().contains("\"no-port\""), "{err}");
    }

    #[test]
    fn the_environment_must_come_from_the_operator() {
        let err = PodEnv::read(|_| None).unwrap_err();
        assert!(err.to_string().contains("$WEFT_WORKER"), "{err}");
        let env = PodEnv::read(|name| {
            Some(
                match name {
                    "WEFT_WORKER" => "llm-0",
                    "WEFT_MESH" => "/etc/weft/mesh/mesh.json",
                    "WEFT_TRAINING" => "/etc/weft/mesh/training.json",
                    "WEFT_POD_IP" => "10.0.0.7",
                    _ => return None,
                }
                .to_string(),
            )
        })
        .unwrap();
        assert_eq!(env.bind_host, "10.0.0.7");
        assert_eq!(env.worker, "llm-0");
    }

    #[test]
    fn the_operators_training_parameters_are_read() {
        // The file the operator's golden test pins (operator/tests/golden).
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../operator/tests/golden/training.json");
        let training = read_training(&path).unwrap();
        assert_eq!(training.model.as_ref().unwrap().name, "tiny");
        assert_eq!(
            training.parallelism.context_parallelism,
            weft_crds::ContextParallelism::Adaptive
        );
        assert!(training.checkpoint.interval_steps > 0);
        assert!(training.data.tokens_per_step >= training.data.max_sequence_length);
    }
}
