//! The reconcile's writes: objects applied (server-side apply, as the
//! operator's field manager), worker pods created and deleted, the status
//! written once, conditionally, and the events told after it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::{TrainingJob, TrainingJobStatus};

use futures::StreamExt;

use super::decide::{Created, Decision, Deletion, Placement, Tell, ToPlace};
use crate::controller::{Context, ControllerError, FIELD_MANAGER, Planning, owned_by};
use crate::events::{EventType, Events};

/// The status fields the job's workers write (its progress); the operator
/// reads them and never writes them.
pub const WORKER_STATUS_FIELDS: [&str; 6] = [
    "step",
    "tokensPerSecond",
    "lastStepTime",
    "stepSeconds",
    "epochFirstStep",
    "lastCheckpoint",
];

/// The operator's status fields that it removes when its status has none
/// (a fault belongs to the membership change it caused alone), by path; a
/// nested one where its parent object is written (a merge patch merges
/// objects: a recovery without a fault would keep the last one's).
const CLEARED_WHEN_ABSENT: [&[&str]; 2] =
    [&["lastFaultTime"], &["lastRecovery", "fromFaultSeconds"]];

/// Applies `object` in `namespace` (server-side apply, as the operator's
/// field manager, taking over fields another manager set).
pub(crate) async fn apply<K>(
    client: &Client,
    namespace: &str,
    object: &K,
) -> Result<(), ControllerError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(&object.name_any(), &params, &Patch::Apply(object))
        .await?;
    Ok(())
}

/// Deletes a worker pod; one already gone is deleted.
#[tracing::instrument(skip(pods))]
pub(crate) async fn delete_pod(
    pods: &Api<Pod>,
    deletion: &Deletion,
) -> Result<(), ControllerError> {
    let params = if deletion.force {
        DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        }
    } else {
        DeleteParams::default()
    };
    match pods.delete(&deletion.pod, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// How the creation of one worker pod went.
#[derive(Debug)]
pub(crate) enum Creation {
    /// Created, as the API server returned it.
    Made(Box<Pod>),
    /// This job's pod of that name exists already (an earlier reconcile
    /// made it and the list did not show it yet).
    Exists(Box<Pod>),
    /// Refused for a reason a retry does not change soon: a quota, an
    /// invalid pod, a pod of that name that is not this job's.
    Refused(String),
    /// A pod of this job by that name is still being deleted: retried.
    Leaving,
    /// Failed otherwise (the API server unreachable, overloaded): retried.
    Failed(kube::Error),
}

pub(crate) async fn create_worker(pods: &Api<Pod>, pod: &Pod, job_uid: &str) -> Creation {
    match pods.create(&PostParams::default(), pod).await {
        Ok(made) => Creation::Made(Box::new(made)),
        Err(kube::Error::Api(s)) if s.code == 409 => match pods.get_opt(&pod.name_any()).await {
            Ok(Some(other)) if !owned_by(&other, job_uid) => Creation::Refused(format!(
                "a pod named {} exists and is not this job's",
                pod.name_any()
            )),
            // This job's, on its way out (placed again elsewhere): made
            // once it is gone.
            Ok(Some(leaving)) if leaving.metadata.deletion_timestamp.is_some() => Creation::Leaving,
            Ok(Some(mine)) => Creation::Exists(Box::new(mine)),
            // Gone between the two calls.
            Ok(None) => Creation::Leaving,
            Err(e) => Creation::Failed(e),
        },
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
            Creation::Refused(s.message)
        }
        Err(e) => Creation::Failed(e),
    }
}

/// How many times a status write is tried again after conflicts that only
/// the workers' progress reports caused.
const WRITE_TRIES: usize = 4;

/// The operator's part of a status: all but what the workers write.
pub(crate) fn operators_part(
    status: Option<&TrainingJobStatus>,
) -> Result<serde_json::Value, ControllerError> {
    let mut part =
        serde_json::to_value(status).map_err(|e| ControllerError::Serialise(e.to_string()))?;
    // The workers' own fields are left as they are: never written back from
    // the operator's copy (a time is re-written in another form on the way).
    if let Some(fields) = part.as_object_mut() {
        for field in WORKER_STATUS_FIELDS {
            fields.remove(field);
        }
        // A merge patch keeps what it does not name: these are cleared.
        for path in CLEARED_WHEN_ABSENT {
            let Some((leaf, parents)) = path.split_last() else {
                continue;
            };
            let mut object = Some(&mut *fields);
            for parent in parents {
                object = object
                    .and_then(|o| o.get_mut(*parent))
                    .and_then(|v| v.as_object_mut());
            }
            if let Some(object) = object {
                object
                    .entry(leaf.to_string())
                    .or_insert(serde_json::Value::Null);
            }
        }
    }
    Ok(part)
}

/// Whether the job `now` differs from `read` only in what its workers write
/// (their progress), so a status decided from `read` is still right.
pub(crate) fn only_progress_changed(read: &TrainingJob, now: &TrainingJob) -> bool {
    read.metadata.uid == now.metadata.uid
        && read.metadata.generation == now.metadata.generation
        && read.metadata.deletion_timestamp == now.metadata.deletion_timestamp
        && matches!(
            (
                operators_part(Some(&read.status.clone().unwrap_or_default())),
                operators_part(Some(&now.status.clone().unwrap_or_default())),
            ),
            (Ok(a), Ok(b)) if a == b
        )
}

/// Writes `status` if the job is still as `job` was read (a write from an
/// older view fails with [`ControllerError::Conflict`] and the reconcile
/// decides again), and brings `job` up to the written version. A conflict
/// that only the workers' progress reports caused (every few seconds while
/// a job trains) is not one: the write is tried again on the new version.
#[tracing::instrument(skip_all, fields(phase = ?status.phase))]
pub(crate) async fn write_status(
    jobs: &Api<TrainingJob>,
    job: &mut TrainingJob,
    status: &TrainingJobStatus,
) -> Result<(), ControllerError> {
    let operators_part = operators_part(Some(status))?;
    let name = job.name_any();
    for _ in 0..WRITE_TRIES {
        let body = serde_json::json!({
            "metadata": { "resourceVersion": job.metadata.resource_version },
            "status": operators_part,
        });
        match jobs
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(written) => {
                job.metadata.resource_version = written.metadata.resource_version;
                job.status = written.status;
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => match jobs.get_opt(&name).await {
                Ok(Some(now)) if only_progress_changed(job, &now) => {
                    job.metadata.resource_version = now.metadata.resource_version;
                }
                Ok(_) | Err(kube::Error::SerdeError(_)) => return Err(ControllerError::Conflict),
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    Err(ControllerError::Conflict)
}

/// Publishes an event about the object `regarding`. Events are for people:
/// a failure to publish one is logged, never fails the reconcile.
pub(crate) async fn tell(
    events: &Events,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    told: &Tell,
) {
    let (reason, note) = (told.reason.as_str(), told.note.as_str());
    match told.type_ {
        EventType::Warning => tracing::warn!(reason, note, "event"),
        EventType::Normal => tracing::info!(reason, note, "event"),
    }
    if let Err(e) = events.publish(regarding, told.type_, reason, note).await {
        tracing::warn!(reason, error = %e, "could not publish the event");
    }
}

/// Carries out `decision` for `job`: the mesh (its workers exist), the one
/// status write, then the events it records, then the deletions. The status
/// goes before the deletions so that what a deletion follows from (the job
/// ended, suspended, below its minimum; a failure counted) is on record
/// first: a write that conflicts deletes nothing and tells nothing, and the
/// reconcile that runs again does both, once. The events go before the
/// deletions: a deletion that fails is done again by the next reconcile,
/// which finds the status on record and has nothing new to tell.
pub(crate) async fn carry_out(
    client: &Client,
    events: &Events,
    job: &mut TrainingJob,
    decision: &Decision,
) -> Result<(), ControllerError> {
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    if let Some(mesh) = &decision.mesh {
        apply(client, &namespace, mesh)
            .instrument(tracing::info_span!("apply_mesh"))
            .await?;
    }
    if let Some(status) = &decision.status {
        let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
        write_status(&jobs, job, status).await?;
    }
    let regarding = job.object_ref(&());
    for told in &decision.events {
        tell(events, &regarding, told).await;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    for deletion in &decision.delete {
        delete_pod(&pods, deletion).await?;
    }
    Ok(())
}

/// Pod creations a reconcile keeps in flight at once.
const POD_CREATES_IN_FLIGHT: usize = 16;

/// The workers first, then the mesh that names them (decided by
/// [`super::decide::conclude`]), so a mesh epoch is published only for
/// workers that exist: applies the Service and the workers' identity,
/// deletes the pods placing dropped, creates the missing workers side by
/// side, and waits until the pod cache holds the ones made. `None` when a
/// name is still held by a pod on its way out.
pub(crate) async fn create_workers(
    ctx: &Context,
    job: &TrainingJob,
    placing: &ToPlace,
    placement: &Placement,
) -> Result<Option<Created>, ControllerError> {
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    let client = &ctx.client;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    // Workers to place again elsewhere go whether or not a mesh is planned.
    for deletion in &placing.delete {
        delete_pod(&pods, deletion).await?;
    }
    let Some(objects) = &placement.objects else {
        return Ok(Some(Created::default()));
    };
    apply(client, &namespace, &objects.service).await?;
    // The workers' identity, before any pod that runs as it.
    apply(client, &namespace, &objects.account).await?;
    apply(client, &namespace, &objects.role).await?;
    apply(client, &namespace, &objects.role_binding).await?;
    for deletion in &placement.delete {
        delete_pod(&pods, deletion).await?;
    }
    // Created side by side: one at a time, a 256-worker job spends seconds
    // on round trips before its last worker exists.
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let creations: Vec<(String, Creation)> = futures::stream::iter(placement.create.clone())
        .map(|pod: Pod| {
            let pods = pods.clone();
            let uid = uid.clone();
            async move { (pod.name_any(), create_worker(&pods, &pod, &uid).await) }
        })
        .buffer_unordered(POD_CREATES_IN_FLIGHT)
        .collect()
        .instrument(tracing::info_span!("create_pods"))
        .await;
    let mut created = Created::default();
    let mut failed = None;
    let mut leaving = false;
    for (worker, creation) in creations {
        match creation {
            Creation::Made(pod) => created.made.push(crate::controller::slim_worker(*pod)),
            Creation::Exists(pod) => created.found.push(crate::controller::slim_worker(*pod)),
            Creation::Refused(why) => created.refused.push((worker, why)),
            Creation::Leaving => leaving = true,
            Creation::Failed(e) => failed = Some(e),
        }
    }
    // The pods that were made count before the turn ends, even when
    // another's creation failed.
    let made: Vec<String> = created
        .made
        .iter()
        .filter_map(|p| p.metadata.uid.clone())
        .collect();
    Planning::cache_holds(&ctx.pods, &made).await;
    // Retried as a whole: the next reconcile sees the pods made so far.
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok((!leaving).then_some(created))
}
