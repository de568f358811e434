//! weft's pod agent: what a worker pod asks of the Kubernetes API server,
//! apart from the trainer's numeric engine (`weft-trainer`'s library builds
//! and tests without a Kubernetes client).
//!
//! - [`mirror`]: the mesh followed through the API server as well as the
//!   pod's ConfigMap volume;
//! - [`report`]: the job's progress written into its status.
//!
//! Both run on one [`ApiLink`]: one async runtime (one thread) and one
//! client, made once per pod.

pub mod mirror;
pub mod report;

use std::future::Future;

/// One async runtime, on a thread of its own, and one client of the API
/// server, shared by everything a worker pod asks of it.
pub struct ApiLink {
    /// Always there until the link is dropped.
    runtime: Option<tokio::runtime::Runtime>,
    client: kube::Client,
}

impl std::fmt::Debug for ApiLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiLink")
    }
}

impl ApiLink {
    /// Connects as the pod's ServiceAccount (or as `KUBECONFIG` says);
    /// outside a cluster, why not.
    pub fn connect() -> Result<ApiLink, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("weft-api")
            .enable_all()
            .build()
            .map_err(|e| format!("no async runtime: {e}"))?;
        let client = runtime
            .block_on(kube::Client::try_default())
            .map_err(|e| format!("no cluster: {e}"))?;
        Ok(ApiLink {
            runtime: Some(runtime),
            client,
        })
    }

    /// The client.
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.as_ref().map(|r| r.handle())
    }

    /// Runs `task` on the link's runtime.
    pub fn spawn<F>(&self, task: F) -> Option<tokio::task::JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle().map(|h| h.spawn(task))
    }

    /// Waits, from a thread outside the runtime, for `task` to end.
    pub fn wait<T>(&self, task: tokio::task::JoinHandle<T>) -> Option<T> {
        self.handle()?.block_on(task).ok()
    }
}

impl Drop for ApiLink {
    /// Stops the runtime without waiting for its tasks (a watch, a write
    /// in flight): a pod's worker never waits on the API server to exit.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
