//! The reconcile's writes: objects applied (server-side apply, as the
//! operator's field manager), worker pods created and deleted, the status
//! written once, conditionally, and the events told after it.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::{TrainingJob, TrainingJobStatus};

use super::decide::{Decision, Deletion, Tell};
use crate::controller::{ControllerError, FIELD_MANAGER, owned_by};
use crate::events::{EventType, Events};

/// The status fields the job's workers write (its progress); the operator
/// reads them and never writes them.
pub const WORKER_STATUS_FIELDS: [&str; 3] = ["step", "tokensPerSecond", "lastCheckpoint"];

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
    Exists,
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
            Ok(Some(_)) => Creation::Exists,
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

/// Writes `status` if the job is still at the version `job` was read at (a
/// write from an older view fails with [`ControllerError::Conflict`] and the
/// reconcile runs again), and brings `job` up to the written version.
#[tracing::instrument(skip_all, fields(phase = ?status.phase))]
pub(crate) async fn write_status(
    jobs: &Api<TrainingJob>,
    job: &mut TrainingJob,
    status: &TrainingJobStatus,
) -> Result<(), ControllerError> {
    let mut operators_part =
        serde_json::to_value(status).map_err(|e| ControllerError::Serialise(e.to_string()))?;
    // The workers' own fields are left as they are: never written back from
    // the operator's copy (a time is re-written in another form on the way).
    if let Some(fields) = operators_part.as_object_mut() {
        for field in WORKER_STATUS_FIELDS {
            fields.remove(field);
        }
    }
    let body = serde_json::json!({
        "metadata": { "resourceVersion": job.metadata.resource_version },
        "status": operators_part,
    });
    let written = jobs
        .patch_status(
            &job.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&body),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 => ControllerError::Conflict,
            e => e.into(),
        })?;
    job.metadata.resource_version = written.metadata.resource_version;
    job.status = written.status;
    Ok(())
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

/// Carries out `decision` for `job`: the deletions, the mesh, then the one
/// status write, and only once it succeeded, the events (a write that
/// conflicts leaves them to the reconcile that runs again, which tells
/// them once).
pub(crate) async fn carry_out(
    client: &Client,
    events: &Events,
    job: &mut TrainingJob,
    decision: &Decision,
) -> Result<(), ControllerError> {
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    for deletion in &decision.delete {
        delete_pod(&pods, deletion).await?;
    }
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
    Ok(())
}
