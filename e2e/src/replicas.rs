//! Replicas of `weft-operator` for the e2e tests, as production runs them:
//! with leader election, the chart's credentials, their health served.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::process::{Child, Command};

use crate::{HarnessError, TestNamespace, operator_binary, wait_for};

pub const LEASE: &str = "weft-operator";
pub const LEASE_SECONDS: &str = "3";

/// Installs the chart (no in-cluster replicas) and writes a kubeconfig that
/// authenticates as its ServiceAccount.
pub async fn chart_credentials(ns: &TestNamespace) -> anyhow::Result<std::path::PathBuf> {
    let release = ns.name.clone();
    crate::helm(&[
        "upgrade",
        "--install",
        &release,
        "{chart}",
        "--namespace",
        &ns.name,
        "--set",
        "replicas=0",
    ])
    .await?;
    crate::service_account_kubeconfig(ns, &format!("{release}-operator")).await
}

/// `weft-operator run` with leader election under `identity`, its health
/// served on a port of its own choosing.
pub fn replica(
    ns: &TestNamespace,
    kubeconfig: &std::path::Path,
    identity: &str,
) -> anyhow::Result<Child> {
    replica_on(ns, kubeconfig, identity, 0)
}

pub async fn holder(leases: &Api<Lease>) -> anyhow::Result<Option<String>> {
    Ok(leases
        .get_opt(LEASE)
        .await?
        .and_then(|l| l.spec?.holder_identity)
        .filter(|h| !h.is_empty()))
}

pub async fn wait_holder(leases: &Api<Lease>, not: Option<&str>) -> anyhow::Result<String> {
    let holder = wait_for(
        "a replica to hold the lease",
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            let not = not.map(str::to_string);
            async move {
                let h = holder(&leases)
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                Ok(h.filter(|h| Some(h) != not.as_ref()))
            }
        },
    )
    .await?;
    Ok(holder)
}

/// `weft-operator run` with leader election under `identity`, serving its
/// health on `port`.
pub fn replica_on(
    ns: &TestNamespace,
    kubeconfig: &std::path::Path,
    identity: &str,
    port: u16,
) -> anyhow::Result<Child> {
    let log = std::env::temp_dir().join(format!("weft-e2e-{}-{identity}.log", ns.name));
    let log = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    let child = Command::new(operator_binary()?)
        .args(["run", "--namespace", &ns.name])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--leader-elect", "--lease-namespace", &ns.name])
        .args(["--lease-name", LEASE, "--identity", identity])
        .args(["--lease-seconds", LEASE_SECONDS])
        .env("POD_NAME", identity)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    Ok(child)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The HTTP status of `GET path` on the operator at `port` (0 when it does
/// not answer).
pub async fn http_status(port: u16, path: &str) -> u16 {
    http_get(port, path)
        .await
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// The whole HTTP response to `GET path` on 127.0.0.1:`port` (empty when
/// nothing answers).
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}

/// The operator's count of reconciles (`weft_reconciles_total`) on `port`.
pub async fn reconciles(port: u16) -> u64 {
    http_get(port, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("weft_reconciles_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `identity` holds the lease.
pub async fn wait_leads(leases: &Api<Lease>, identity: &str) -> anyhow::Result<()> {
    wait_for(
        &format!("{identity} to hold the lease"),
        Duration::from_secs(60),
        || {
            let leases = leases.clone();
            async move {
                let h = holder(&leases)
                    .await
                    .map_err(|e| HarnessError::Other(e.to_string()))?;
                Ok((h.as_deref() == Some(identity)).then_some(()))
            }
        },
    )
    .await?;
    Ok(())
}

/// Kills `child` as kill -9 would (no goodbye, no lease released).
pub async fn kill_hard(mut child: Child) -> anyhow::Result<()> {
    child.start_kill()?;
    child.wait().await?;
    Ok(())
}
