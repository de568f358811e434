//! One reconcile of one `TrainingJob`, as a pipeline:
//!
//! 1. [`observe`]: the job as the API server holds it now, its pods, claims
//!    and published mesh, and the caches of the cluster's nodes and pods;
//! 2. [`decide`] (pure): the job's life ([`decide::settle`]), then under the
//!    planning turn the mesh and its workers ([`decide::place`]);
//! 3. [`apply`]: the Service, the workers' identity, the pods created and
//!    deleted; then what creating them came to is decided
//!    ([`decide::conclude`]): the mesh to publish, the status, the events;
//! 4. the decision carried out: deletions, the mesh, **one** conditional
//!    status write, and only once it succeeded, the events (a write that
//!    conflicts tells nothing; the reconcile that runs again tells once).

pub mod apply;
pub mod decide;
pub mod observe;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::TrainingJob;

use crate::controller::{Context, ControllerError, Planning, TURN_WAIT};
use apply::{Creation, apply, carry_out, create_worker};
use decide::{Created, Decision, Settle, Tell};

/// Pod creations a reconcile keeps in flight at once.
const POD_CREATES_IN_FLIGHT: usize = 16;

/// One reconcile of one job, counted, timed and traced (a `reconcile` span
/// named after the job, with a child span for each call to the API server).
#[tracing::instrument(
    name = "reconcile",
    skip_all,
    fields(
        namespace = job.metadata.namespace.as_deref().unwrap_or_default(),
        job = job.metadata.name.as_deref().unwrap_or_default(),
        outcome = tracing::field::Empty,
    )
)]
pub async fn reconcile(
    job: Arc<DynamicObject>,
    ctx: Arc<Context>,
) -> Result<Action, ControllerError> {
    let started = std::time::Instant::now();
    let result = reconcile_job(&job, &ctx).await;
    if result.is_ok() {
        ctx.reconciled(&job);
    }
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.category(),
    };
    tracing::Span::current().record("outcome", outcome);
    tracing::debug!(
        seconds = started.elapsed().as_secs_f64(),
        outcome,
        "reconciled"
    );
    result
}

fn action(requeue: Option<Duration>) -> Action {
    match requeue {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    }
}

async fn reconcile_job(
    cached: &DynamicObject,
    ctx: &Arc<Context>,
) -> Result<Action, ControllerError> {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let Some((object, job)) = observe::fresh_job(ctx, cached).await? else {
        return Ok(Action::await_change());
    };
    let job = match job {
        Ok(job) => job,
        Err(err) => {
            let told = Tell {
                type_: crate::events::EventType::Warning,
                reason: "Unreadable".to_string(),
                note: format!("{err}; weft leaves this job as it is until the value is fixed"),
            };
            let resource = ApiResource::erase::<TrainingJob>(&());
            apply::tell(&ctx.events, &object.object_ref(&resource), &told).await;
            return Err(err);
        }
    };
    let seen = observe::observe(ctx, job).await?;
    let mut job = seen.job.clone();

    let placing = match decide::settle(&seen, &now) {
        Settle::Done(decision) => {
            carry_out(&ctx.client, &ctx.events, &mut job, &decision).await?;
            return Ok(action(decision.requeue));
        }
        Settle::Place(placing) => placing,
    };

    // This job's turn to plan: the pod cache holds the workers of jobs
    // planned before it (the turn ends once it holds this job's new ones).
    let turn = tokio::time::timeout(TURN_WAIT, ctx.planning.lock())
        .await
        .map_err(|_| ControllerError::PlanningStalled(TURN_WAIT.as_secs()))?;
    let placement = tracing::info_span!("plan_mesh", nodes = placing.nodes.len())
        .in_scope(|| decide::place(&seen, &placing, &ctx.pods.state(), &now))?;
    let Some(created) = create_workers(ctx, &job, &placing, &placement).await? else {
        // A worker's name is still held by a pod being deleted: not a
        // failure, the name is free again in a moment.
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    drop(turn);

    let decision: Decision = decide::conclude(&seen, &placing, placement, &created, &now)?;
    ctx.remember_refusal(
        job.metadata.uid.as_deref().unwrap_or_default(),
        decision.refusals,
    );
    carry_out(&ctx.client, &ctx.events, &mut job, &decision).await?;
    Ok(action(decision.requeue))
}

/// The workers first, then the mesh that names them (in
/// [`decide::conclude`]), so a mesh epoch is published only for workers
/// that exist: applies the Service and the workers' identity, deletes the
/// pods the mesh dropped, creates the missing workers side by side, and
/// waits until the pod cache holds the ones made. `None` when a name is
/// still held by a pod on its way out.
async fn create_workers(
    ctx: &Context,
    job: &TrainingJob,
    placing: &decide::Placing,
    placement: &decide::Placement,
) -> Result<Option<Created>, ControllerError> {
    let Some(objects) = &placement.objects else {
        return Ok(Some(Created::default()));
    };
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    let client = &ctx.client;
    apply(client, &namespace, &objects.service).await?;
    // The workers' identity, before any pod that runs as it.
    apply(client, &namespace, &objects.account).await?;
    apply(client, &namespace, &objects.role).await?;
    apply(client, &namespace, &objects.role_binding).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    for deletion in placing.delete.iter().chain(&placement.delete) {
        apply::delete_pod(&pods, deletion).await?;
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
            Creation::Made(pod) => created.made.push(*pod),
            Creation::Exists => {}
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

#[cfg(test)]
mod tests;
