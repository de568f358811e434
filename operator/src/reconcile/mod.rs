//! One reconcile of one `TrainingJob`, as a pipeline:
//!
//! 1. [`observe`]: the job as the API server holds it now, its pods, claims
//!    and published mesh, and the caches of the cluster's nodes and pods;
//! 2. [`decide`] (pure): the job's life ([`decide::settle`]), then under the
//!    planning turn the mesh and its workers ([`decide::place`]);
//! 3. [`apply`]: the Service, the workers' identity, the pods created and
//!    deleted; then what creating them came to is decided
//!    ([`decide::conclude`]): the mesh to publish, the status, the events;
//! 4. the decision carried out: the mesh, **one** conditional status write,
//!    and only once it succeeded, the events it records and the deletions it
//!    gives the reason for (a write that conflicts tells and deletes nothing;
//!    the reconcile that runs again does both, once).

pub mod apply;
pub mod decide;
pub mod observe;

use std::sync::Arc;
use std::time::Duration;

use kube::Resource;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::controller::Action;
use weft_crds::TrainingJob;

use crate::controller::{Context, ControllerError, TURN_WAIT};
use apply::carry_out;
use decide::{Decision, Settle, Tell};

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
        // Deleted: nothing of it is kept.
        ctx.forget(cached);
        return Ok(Action::await_change());
    };
    let job = match job {
        Ok(job) => job,
        Err(err) => {
            let told = Tell::warning(
                "Unreadable",
                format!("{err}; weft leaves this job as it is until the value is fixed"),
            );
            let resource = ApiResource::erase::<TrainingJob>(&());
            apply::tell(&ctx.events, &object.object_ref(&resource), &told).await;
            return Err(err);
        }
    };
    let seen = observe::observe(ctx, job).await?;
    let mut job = seen.job.clone();

    let placing = match decide::settle(&seen, &now) {
        Settle::Decided(decision) => {
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
    let Some(created) = apply::create_workers(ctx, &job, &placing, &placement).await? else {
        // A worker's name is still held by a pod being deleted: not a
        // failure, the name is free again in a moment.
        return Ok(Action::requeue(Duration::from_secs(1)));
    };
    drop(turn);

    let decision: Decision = decide::conclude(&seen, &placing, placement, &created, &now)?;
    carry_out(&ctx.client, &ctx.events, &mut job, &decision).await?;
    // Kept once the status that says why is written.
    ctx.remember_refusal(
        job.metadata.uid.as_deref().unwrap_or_default(),
        decision.refusals,
    );
    Ok(action(decision.requeue))
}

#[cfg(test)]
mod tests;
