//! Leader election over a `coordination.k8s.io` Lease (through
//! `kube-lease-manager`), so two or more replicas can run: one reconciles,
//! the others stand by and take over when its lease runs out. A replica
//! that loses the lease stops reconciling at once.

use std::sync::Arc;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;

use crate::metrics::Metrics;

/// Where the lease is and who this replica is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub lease: String,
    /// This replica's identity (the pod name in a cluster).
    pub identity: String,
    /// How long a lease lasts without renewal: how soon a standby takes
    /// over from a leader that died.
    pub duration_s: u64,
}

/// Why leader election stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lease {namespace}/{lease}: {source}")]
    Lease {
        namespace: String,
        lease: String,
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("the lease watcher stopped")]
    WatcherStopped,
}

impl LeaderError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            LeaderError::Lease { .. } => "leader_lease",
            LeaderError::WatcherStopped => "leader_watch",
        }
    }
}

/// Runs the controller whenever this replica holds the lease, until the
/// controller's stream ends.
pub async fn run_elected(
    client: Client,
    election: Election,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
) -> Result<(), LeaderError> {
    let manager = LeaseManagerBuilder::new(client.clone(), &election.lease)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(election.duration_s)
        .with_grace(election.duration_s.div_ceil(3).max(1))
        .build()
        .await
        .map_err(|source| LeaderError::Lease {
            namespace: election.namespace.clone(),
            lease: election.lease.clone(),
            source,
        })?;
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut leading, _watcher) = manager.watch().await;
    loop {
        while !*leading.borrow_and_update() {
            leading
                .changed()
                .await
                .map_err(|_| LeaderError::WatcherStopped)?;
        }
        metrics.leader.set(1);
        tracing::info!(
            identity = election.identity,
            lease = format!("{}/{}", election.namespace, election.lease),
            "leading"
        );
        let controller =
            crate::controller::run_with(client.clone(), namespace.clone(), metrics.clone());
        let lost = async {
            loop {
                if leading.changed().await.is_err() || !*leading.borrow() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = controller => return Ok(()),
            _ = lost => {
                metrics.leader.set(0);
                tracing::warn!(identity = election.identity, "lost the lease; standing by");
            }
        }
    }
}
