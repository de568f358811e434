//! weft's end-to-end harness.
//!
//! Every test takes its cluster from `KUBECONFIG` (the local control plane that
//! `e2e/cluster/up` starts, kind, or a real cluster), runs in a namespace of its
//! own, deletes it afterwards, and, when it fails, prints the namespace's objects
//! and events (and writes them under `$WEFT_E2E_ARTIFACTS` when that is set).
//!
//! Expected flow: `let env = TestEnv::connect().await?;` then
//! `env.run("name", |ns| async move { ... }).await`. A control plane that cannot
//! be reached fails the test at `connect` with [`HarnessError::Unreachable`], whose
//! message says which server was tried and how to start the local one.

pub mod egress;
pub mod jobs;
pub mod nodes;
pub mod replicas;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, LogParams, ObjectMeta, PostParams};
use kube::{Api, Client, Config, ResourceExt};

/// What went wrong in the harness itself (not in the code under test).
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "no cluster configuration: {0}. Set KUBECONFIG, or start the local control plane with e2e/cluster/up"
    )]
    NoConfig(String),
    #[error(
        "the Kubernetes control plane at {server} is not reachable: {reason}. Is it running? Start the local one with e2e/cluster/up (e2e/cluster/status shows what runs)"
    )]
    Unreachable { server: String, reason: String },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
    #[error("Kubernetes API call failed: {0}")]
    Api(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

impl HarnessError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            HarnessError::NoConfig(_) => "harness_config",
            HarnessError::Unreachable { .. } => "control_plane_unreachable",
            HarnessError::Timeout { .. } => "timeout",
            HarnessError::Api(_) => "api",
            HarnessError::Other(_) => "check",
        }
    }
}

/// A connection to the cluster under test.
#[derive(Clone)]
pub struct TestEnv {
    pub client: Client,
    pub server: String,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("server", &self.server)
            .finish()
    }
}

impl TestEnv {
    /// Connects to the cluster in `KUBECONFIG` and checks that it answers.
    pub async fn connect() -> Result<TestEnv, HarnessError> {
        let config = Config::infer()
            .await
            .map_err(|e| HarnessError::NoConfig(e.to_string()))?;
        Self::connect_with(config).await
    }

    /// Connects with an explicit configuration and checks that the server answers
    /// within a few seconds.
    pub async fn connect_with(mut config: Config) -> Result<TestEnv, HarnessError> {
        let server = config.cluster_url.to_string();
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(30));
        let unreachable = |reason: String| HarnessError::Unreachable {
            server: server.clone(),
            reason,
        };
        let client = Client::try_from(config).map_err(|e| unreachable(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(TestEnv { client, server }),
            Ok(Err(e)) => Err(unreachable(error_chain(&e))),
            Err(_) => Err(unreachable("no answer within 10 s".to_string())),
        }
    }

    /// Runs `body` in a fresh namespace named after the test. On failure (an
    /// error or a panic) dumps the namespace first; always deletes it afterwards.
    pub async fn run<F, Fut>(&self, test: &str, body: F) -> anyhow::Result<()>
    where
        F: FnOnce(TestNamespace) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let artifacts = std::env::var_os("WEFT_E2E_ARTIFACTS").map(PathBuf::from);
        self.run_with_artifacts(test, artifacts, body).await
    }

    /// Like [`TestEnv::run`], writing the dump of a failed test under `artifacts`.
    pub async fn run_with_artifacts<F, Fut>(
        &self,
        test: &str,
        artifacts: Option<PathBuf>,
        body: F,
    ) -> anyhow::Result<()>
    where
        F: FnOnce(TestNamespace) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let ns = self.create_namespace(test).await?;
        let outcome = std::panic::AssertUnwindSafe(body(ns.clone()))
            .catch_unwind()
            .await;
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => Err(anyhow::anyhow!("test panicked: {}", panic_message(&panic))),
        };
        if let Err(err) = &result {
            eprintln!("e2e test {test} failed: {err:#}");
            let dump = ns.dump().await;
            eprintln!("{dump}");
            if let Some(dir) = artifacts {
                let path = dir.join(format!("{}.txt", ns.name));
                if let Some(parent) = path.parent() {
                    let _ = std::fs::create_dir_all(parent);
                }
                let _ = std::fs::write(&path, &dump);
            }
        }
        ns.delete().await;
        result
    }

    async fn create_namespace(&self, test: &str) -> Result<TestNamespace, HarnessError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let prefix: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        // The API server picks a name no namespace has (`generateName`).
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("e2e-{}-", prefix.trim_matches('-'))),
                labels: Some([("weft.dev/e2e".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let made = api.create(&PostParams::default(), &namespace).await?;
        let ns = TestNamespace {
            client: self.client.clone(),
            name: made.name_any(),
        };
        // Pods are refused until the service-account controller made `default`.
        let sa: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &ns.name);
        wait_for(
            "the default ServiceAccount",
            Duration::from_secs(60),
            || {
                let sa = sa.clone();
                async move { Ok(sa.get_opt("default").await?.map(|_| ())) }
            },
        )
        .await?;
        Ok(ns)
    }
}

/// A namespace that belongs to one test.
#[derive(Clone)]
pub struct TestNamespace {
    pub client: Client,
    pub name: String,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish()
    }
}

impl TestNamespace {
    /// A namespaced API for `K` in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// The namespace's pods, services, config maps and events, as text, and
    /// the container logs of the pods on real nodes.
    pub async fn dump(&self) -> String {
        let mut out = format!("==== state of namespace {} ====\n", self.name);
        out += &dump_kind::<Pod>(self, "pods").await;
        out += &self.container_logs().await;
        out += &dump_kind::<Service>(self, "services").await;
        out += &dump_kind::<ConfigMap>(self, "configmaps").await;
        let events: Api<Event> = self.api();
        match events.list(&ListParams::default()).await {
            Ok(list) => {
                out += "--- events ---\n";
                for e in list.items {
                    out += &format!(
                        "{} {}/{}: {} {}\n",
                        e.type_.unwrap_or_default(),
                        e.involved_object.kind.unwrap_or_default(),
                        e.involved_object.name.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.message.unwrap_or_default()
                    );
                }
            }
            Err(err) => out += &format!("--- events: could not list: {err}\n"),
        }
        out
    }

    /// The last lines of every container's log (and of its previous run) of
    /// the pods on real nodes, through the API server as `kubectl logs`
    /// reads them. Pods on kwok nodes have no containers and are left out.
    pub async fn container_logs(&self) -> String {
        const TAIL: i64 = 200;
        let nodes: Api<Node> = Api::all(self.client.clone());
        let real: Vec<String> = match nodes
            .list(&ListParams::default().labels(&format!("{}=true", nodes::REAL_NODE_LABEL)))
            .await
        {
            Ok(list) => list.items.iter().map(|n| n.name_any()).collect(),
            Err(err) => return format!("--- container logs: could not list nodes: {err}\n"),
        };
        if real.is_empty() {
            return String::new();
        }
        let pods: Api<Pod> = self.api();
        let list = match pods.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(err) => return format!("--- container logs: could not list pods: {err}\n"),
        };
        let mut out = String::new();
        for pod in list {
            let on_real = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .is_some_and(|n| real.contains(n));
            if !on_real {
                continue;
            }
            let containers: Vec<String> = pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .collect();
            for container in containers {
                for previous in [true, false] {
                    let params = LogParams {
                        container: Some(container.clone()),
                        previous,
                        tail_lines: Some(TAIL),
                        ..Default::default()
                    };
                    let which = if previous { "previous run" } else { "log" };
                    match pods.logs(&pod.name_any(), &params).await {
                        Ok(text) => {
                            out += &format!(
                                "--- {which} of {}/{container} (last {TAIL} lines) ---\n{text}\n",
                                pod.name_any()
                            );
                        }
                        // No previous run is the usual case: say nothing.
                        Err(_) if previous => {}
                        Err(err) => {
                            out += &format!(
                                "--- log of {}/{container}: could not read: {err}\n",
                                pod.name_any()
                            );
                        }
                    }
                }
            }
        }
        out
    }

    /// Deletes the namespace and does not wait: the namespace controller empties it.
    pub async fn delete(&self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        if let Err(err) = api.delete(&self.name, &DeleteParams::background()).await {
            eprintln!("e2e: could not delete namespace {}: {err}", self.name);
        }
    }
}

async fn dump_kind<K>(ns: &TestNamespace, label: &str) -> String
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
    <K as kube::Resource>::DynamicType: Default,
{
    let api: Api<K> = ns.api();
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            let mut out = format!("--- {label} ({}) ---\n", list.items.len());
            for item in list.items {
                out += &serde_saphyr::to_string(&item).unwrap_or_else(|e| format!("<{e}>\n"));
                out += "---\n";
            }
            out
        }
        Err(err) => format!("--- {label}: could not list: {err}\n"),
    }
}

/// Waits until the CustomResourceDefinition `name` is Established.
pub async fn wait_for_crd(
    client: &Client,
    name: &str,
    timeout: Duration,
) -> Result<(), HarnessError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    wait_for(
        &format!("the CRD {name} to be Established"),
        timeout,
        || {
            let crds = crds.clone();
            async move {
                let established = crds
                    .get_opt(name)
                    .await?
                    .and_then(|c| c.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Established" && c.status == "True")
                    });
                Ok(established.then_some(()))
            }
        },
    )
    .await
}

/// Polls `probe` every 250 ms until it returns `Some`, an error, or `timeout` passes.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> Result<T, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, HarnessError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The repository root (the e2e crate lives one level below it).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The helm binary: `$WEFT_HELM`, else the one `e2e/cluster/build` made, else `helm` on PATH.
pub fn helm_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("WEFT_HELM") {
        return PathBuf::from(path);
    }
    let wrapper = repo_root().join("e2e/cluster/helm");
    if wrapper.exists() {
        return wrapper;
    }
    PathBuf::from("helm")
}

/// Waits (up to 90 s) until the status of TrainingJob `job` satisfies
/// `done`, and returns it.
pub async fn wait_job_status(
    jobs: &Api<weft_crds::TrainingJob>,
    job: &str,
    what: &str,
    done: impl Fn(&weft_crds::TrainingJobStatus) -> bool,
) -> Result<weft_crds::TrainingJobStatus, HarnessError> {
    let done = &done;
    wait_for(what, Duration::from_secs(90), || {
        let jobs = jobs.clone();
        async move {
            let status = jobs.get(job).await?.status.unwrap_or_default();
            Ok(done(&status).then_some(status))
        }
    })
    .await
}

/// Runs helm with `args` (the chart path may be written `{chart}`), failing
/// with helm's own error output.
pub async fn helm(args: &[&str]) -> anyhow::Result<()> {
    let chart = repo_root().join("charts/weft");
    let chart = chart.to_string_lossy();
    let args: Vec<String> = args.iter().map(|a| a.replace("{chart}", &chart)).collect();
    let output = tokio::process::Command::new(helm_binary())
        .args(&args)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("could not run {}: {e}", helm_binary().display()))?;
    anyhow::ensure!(
        output.status.success(),
        "helm {} failed: {}",
        args.first().map(String::as_str).unwrap_or(""),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The `weft-operator` binary of this build (`target/<profile>/weft-operator`,
/// next to the test binary's `deps/` or to this crate's binaries), or
/// `$WEFT_OPERATOR`.
pub fn operator_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("weft-operator", "WEFT_OPERATOR")
}

/// The `weft-trainer` binary of this build, or `$WEFT_TRAINER`.
pub fn trainer_binary() -> anyhow::Result<PathBuf> {
    workspace_binary("weft-trainer", "WEFT_TRAINER")
}

fn workspace_binary(name: &str, variable: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // A test binary lives in `<profile>/deps/`, a binary of this crate in `<profile>/`.
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("cannot find the target directory of {}", exe.display()))?;
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let binary = profile_dir.join(name);
    anyhow::ensure!(
        binary.exists(),
        "{} is missing: build it first with `cargo build -p {name}` (scripts/test does)",
        binary.display()
    );
    Ok(binary)
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text += ": ";
            text += &cause_text;
        }
        source = cause.source();
    }
    text
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_string()
    }
}

/// Installs the TrainingJob CRD unless it is there (as the chart would), and
/// waits until the API server serves it.
pub async fn ensure_training_job_crd(env: &TestEnv) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(env.client.clone());
    // Applied, not created: a cluster left up by an earlier build gets this
    // build's schema.
    let crd = weft_crds::crd()?;
    crds.patch(
        "trainingjobs.weft.dev",
        &kube::api::PatchParams::apply("weft-e2e").force(),
        &kube::api::Patch::Apply(&crd),
    )
    .await?;
    wait_for_crd(
        &env.client,
        "trainingjobs.weft.dev",
        Duration::from_secs(60),
    )
    .await?;
    Ok(())
}

/// Writes a kubeconfig that authenticates as ServiceAccount `account` of
/// `ns` (a token from the TokenRequest API, valid for an hour), against the
/// cluster of `KUBECONFIG`; returns its path. What that account may do is
/// then exactly what RBAC grants it.
pub async fn service_account_kubeconfig(
    ns: &TestNamespace,
    account: &str,
) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let accounts: Api<ServiceAccount> = ns.api();
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await?
        .status
        .context("a TokenRequest without status")?
        .token;
    let path = std::env::var("KUBECONFIG").context("KUBECONFIG is not set")?;
    let admin = kube::config::Kubeconfig::read_from(&path)?;
    let mut config = serde_json::to_value(&admin)?;
    let user = format!("{account}-sa");
    config["users"] = serde_json::json!([{ "name": user, "user": { "token": token } }]);
    if let Some(contexts) = config["contexts"].as_array_mut() {
        for context in contexts {
            context["context"]["user"] = serde_json::json!(user);
        }
    }
    let out = std::env::temp_dir().join(format!("weft-e2e-{}-{account}.kubeconfig", ns.name));
    std::fs::write(&out, serde_json::to_vec(&config)?)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_control_plane_that_is_down_is_reported_as_such() {
        // Bind and drop a listener so the port is (almost certainly) closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
        let err = TestEnv::connect_with(config).await.unwrap_err();
        assert_eq!(err.category(), "control_plane_unreachable");
        let message = err.to_string();
        assert!(message.contains("not reachable"), "{message}");
        assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert!(message.contains("e2e/cluster/up"), "{message}");
    }
}
