//! Named points where a test can make this process die on the spot, as a
//! `kill -9` would, to prove that what it was doing leaves nothing broken
//! behind (a checkpoint half written, for one).
//!
//! `WEFT_FAULT_POINT=NAME` aborts the process the first time it reaches the
//! point `NAME`; `WEFT_FAULT_POINT=NAME@K`, the K-th time (1-based). Unset,
//! every point is a no-op: one environment read, once per process.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable that names the point to die at.
pub const FAULT_POINT_ENV: &str = "WEFT_FAULT_POINT";

fn armed() -> Option<&'static (String, u64)> {
    static POINT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let text = std::env::var(FAULT_POINT_ENV).ok()?;
            Some(match text.split_once('@') {
                Some((name, k)) => (name.to_string(), k.parse().unwrap_or(1)),
                None => (text, 1),
            })
        })
        .as_ref()
}

/// Marks the point `name`: aborts the process here when a test armed it.
pub fn reached(name: &str) {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    if let Some((point, at)) = armed()
        && point == name
        && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *at
    {
        eprintln!("weft: dying at fault point {name} ({FAULT_POINT_ENV})");
        std::process::abort();
    }
}
