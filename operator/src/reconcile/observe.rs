//! The reconcile's reads: the job as the API server holds it now, its own
//! pods, its volume claims, its published mesh, and the watch caches of the
//! cluster's nodes and pods, gathered into one [`Seen`].

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod};
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Resource, ResourceExt};
use tracing::Instrument;
use weft_crds::{Phase, TrainingJob};

use super::decide::Seen;
use crate::build::LABEL_JOB;
use crate::controller::{
    Context, ControllerError, owned_by, published_change, published_fault, read_published,
    recorded_epoch, terminal,
};
use crate::status::JobClaim;

/// The job's own pods: those labelled with its name whose controller is
/// this job. A pod that only carries the label (a user's, a batch Job's) is
/// never taken for a worker: not counted, not deleted, not its end.
pub(crate) async fn list_job_pods(
    pods: &Api<Pod>,
    job: &TrainingJob,
) -> Result<Vec<Pod>, ControllerError> {
    let uid = job.metadata.uid.as_deref().unwrap_or_default();
    let listed = pods
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={}", job.name_any())))
        .instrument(tracing::info_span!("list_job_pods"))
        .await?
        .items;
    Ok(listed
        .into_iter()
        .filter(|p| owned_by(p, uid))
        .map(crate::controller::slim_worker)
        .collect())
}

/// The job named as `cached` is, as the API server holds it now (not as the
/// watch cache last saw it: the status accumulates, and a status computed
/// from a stale copy would write old values over new ones; every status
/// write is conditional on this version). Read as raw JSON first: a job
/// with a value weft cannot read is an error reported on that job alone.
/// `None` when it is gone.
pub(crate) async fn fresh_job(
    ctx: &Context,
    cached: &DynamicObject,
) -> Result<Option<(DynamicObject, Result<TrainingJob, ControllerError>)>, ControllerError> {
    let namespace = cached.namespace().ok_or(ControllerError::NoNamespace)?;
    let resource = ApiResource::erase::<TrainingJob>(&());
    let object = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &namespace, &resource)
        .get_opt(&cached.name_any())
        .instrument(tracing::info_span!("get_job"))
        .await?;
    Ok(object.map(|object| {
        let job = crate::controller::read_job(&object);
        (object, job)
    }))
}

/// Everything the decisions about `job` read.
pub(crate) async fn observe(ctx: &Context, job: TrainingJob) -> Result<Seen, ControllerError> {
    let namespace = job.namespace().ok_or(ControllerError::NoNamespace)?;
    let client = ctx.client.clone();
    ctx.caches_synced()
        .instrument(tracing::info_span!("wait_for_caches"))
        .await?;
    let pods = list_job_pods(&Api::namespaced(client.clone(), &namespace), &job).await?;
    let ended = matches!(
        job.status.as_ref().map(|s| s.phase),
        Some(Phase::Succeeded | Phase::Failed)
    );
    let any_live = pods.iter().any(|p| !terminal(p));
    // The claims matter only before any worker is placed.
    let mut missing_claim = None;
    if !ended && !job.spec.suspend && !any_live {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
        for claim in JobClaim::of(&job) {
            let found = claims
                .get_opt(claim.name())
                .instrument(tracing::info_span!("get_volume_claim"))
                .await?;
            if found.is_none() {
                missing_claim = Some(claim);
                break;
            }
        }
    }
    let recorded = recorded_epoch(&job);
    let (published, published_change, published_fault) = if ended || job.spec.suspend {
        (crate::controller::Published::Absent, None, None)
    } else {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
        let name = job.name_any();
        let config_map = config_maps
            .get_opt(&crate::build::mesh_config_map_name(&name))
            .instrument(tracing::info_span!("get_mesh"))
            .await?;
        let published = read_published(config_map.as_ref(), &name, recorded);
        let change = published_change(config_map.as_ref(), &published);
        let fault = published_fault(config_map.as_ref(), &published);
        (published, change, fault)
    };
    let refused_ago = ctx.refused_below_min(job.meta().uid.as_deref().unwrap_or_default());
    Ok(Seen {
        job,
        pods,
        missing_claim,
        nodes: ctx.nodes.state(),
        cluster_pods: ctx.pods.state(),
        published,
        published_change,
        published_fault,
        refused_ago,
        trace_parent: {
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            weft_telemetry::trace_parent(&tracing::Span::current().context())
        },
    })
}
