//! Helper for the e2e/cluster scripts.
//!
//! `weft-e2e nodes CLUSTER` prints the kwok GPU Node objects that a cluster
//! shorthand (see `weft_planner::cluster`) describes, as a `v1/List` for
//! `kubectl apply -f -`.

use anyhow::{Context, bail};

const USAGE: &str =
    "usage: weft-e2e nodes CLUSTER   (e.g. 16x8:nics=8 or 8x8+8x4:gpu=a100-80g,nics=2)";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, spec] if cmd == "nodes" => {
            let cluster = weft_planner::cluster::parse_cluster(spec)
                .with_context(|| format!("invalid cluster description {spec:?}"))?;
            println!("{}", weft_e2e::nodes::node_list_json(&cluster)?);
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}
