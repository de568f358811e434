//! What the trainer's multi-rank tests share: a free loopback port, and a
//! rank's store connection and Gloo group.

use std::time::Duration;

use weft_trainer::comm::{ProcessGroup, Store};

/// A loopback port free now, never handed out before in this process, and
/// below the kernel's ephemeral range (the launcher's choice: a test's
/// workers bind it only later).
pub fn free_port() -> u16 {
    weft_trainer::launch::free_port().expect("a free loopback port")
}

/// Rank `rank` of `world` joins the store at `port` (rank 0 serves it) and
/// builds its Gloo group with operations bounded by `timeout`. The store is
/// returned too: it must outlive the group's use.
pub fn join(rank: u32, world: u32, port: u16, timeout: Duration) -> (Store, ProcessGroup) {
    let store = Store::open("127.0.0.1", port, world, rank == 0, Duration::from_secs(20))
        .expect("open the store");
    let group =
        ProcessGroup::gloo(&store, rank, world, "127.0.0.1", timeout).expect("build the group");
    (store, group)
}
