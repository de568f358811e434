//! Helper for the e2e/cluster scripts.
//!
//! `weft-e2e nodes CLUSTER` prints the kwok GPU Node objects that a cluster
//! shorthand (see `weft_planner::cluster`) describes, as a `v1/List` for
//! `kubectl apply -f -`.
//!
//! `weft-e2e connect-proxy SOCKET` serves the API server's HTTP CONNECT
//! tunnels to real nodes on a Unix socket (see `weft_e2e::egress`).
//!
//! `weft-e2e otlp-collector ADDRESS FILE` receives OTLP/HTTP exports on
//! `ADDRESS` (`host:port`) and keeps every trace export received in FILE,
//! one request body a line (rewritten whole, atomically, as they come): a
//! collector the pods of real nodes reach, for the test that reads it.

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: weft-e2e nodes CLUSTER   (e.g. 16x8:nics=8 or 8x8+8x4:gpu=a100-80g,nics=2)
       weft-e2e connect-proxy SOCKET
       weft-e2e otlp-collector ADDRESS FILE";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, spec] if cmd == "nodes" => {
            let cluster = weft_planner::cluster::parse_cluster(spec)
                .with_context(|| format!("invalid cluster description {spec:?}"))?;
            println!("{}", weft_e2e::nodes::node_list_json(&cluster)?);
            Ok(())
        }
        [cmd, socket] if cmd == "connect-proxy" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let path = std::path::PathBuf::from(socket);
            runtime
                .block_on(weft_e2e::egress::run(&path))
                .with_context(|| format!("serving CONNECT tunnels on {socket}"))
        }
        [cmd, address, file] if cmd == "otlp-collector" => {
            let collector = weft_telemetry::collector::Collector::start_on(address)
                .with_context(|| format!("listening on {address}"))?;
            let file = std::path::PathBuf::from(file);
            let staging = file.with_extension("writing");
            let mut kept = 0;
            loop {
                let traces: Vec<String> = collector
                    .requests()
                    .into_iter()
                    .filter(|(path, _)| path == "/v1/traces")
                    .map(|(_, body)| body.replace('\n', " "))
                    .collect();
                if traces.len() != kept || kept == 0 {
                    std::fs::write(&staging, traces.join("\n"))
                        .and_then(|()| std::fs::rename(&staging, &file))
                        .with_context(|| format!("writing {}", file.display()))?;
                    kept = traces.len();
                }
                std::thread::sleep(std::time::Duration::from_millis(250));
            }
        }
        _ => bail!("{USAGE}"),
    }
}
