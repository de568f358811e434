//! Local multi-process launch: N worker processes of this same binary on one
//! machine, meeting at a rendezvous store on 127.0.0.1, the same code path a
//! pod runs. If any worker fails, the others are stopped, so a launch never
//! hangs on a dead peer.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What went wrong launching or running local workers.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("could not start worker {rank}: {source}")]
    Spawn {
        rank: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("could not find a free port for the rendezvous store: {0}")]
    Port(std::io::Error),
    #[error("could not locate this program to start its workers: {0}")]
    Exe(std::io::Error),
    #[error("worker {rank} failed ({status}); its last output: {tail}")]
    Worker {
        rank: u32,
        status: String,
        tail: String,
    },
    #[error("workers did not finish within {0} s; they were stopped")]
    Timeout(u64),
}

impl LaunchError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            LaunchError::Spawn { .. } | LaunchError::Port(_) | LaunchError::Exe(_) => "launch",
            LaunchError::Worker { .. } => "worker_failed",
            LaunchError::Timeout(_) => "timeout",
        }
    }
}

/// A free loopback port for the rendezvous store.
pub fn free_port() -> Result<u16, LaunchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(LaunchError::Port)
}

/// Runs `ranks` copies of this program with `args(rank, port)` and returns
/// each worker's standard output lines, by rank.
pub fn run_local(
    ranks: u32,
    timeout: Duration,
    args: impl Fn(u32, u16) -> Vec<String>,
) -> Result<Vec<Vec<String>>, LaunchError> {
    let exe = std::env::current_exe().map_err(LaunchError::Exe)?;
    let port = free_port()?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..ranks {
        let child = Command::new(&exe)
            .args(args(rank, port))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(source) => {
                stop(&mut children);
                return Err(LaunchError::Spawn { rank, source });
            }
        }
    }
    // Read every worker's output on its own thread, so no pipe fills up.
    let readers: Vec<_> = children
        .iter_mut()
        .map(|c| {
            let out = c.stdout.take();
            let err = c.stderr.take();
            std::thread::spawn(move || {
                let lines = |r: Option<Box<dyn std::io::Read + Send>>| -> Vec<String> {
                    r.map(|r| BufReader::new(r).lines().map_while(Result::ok).collect())
                        .unwrap_or_default()
                };
                (
                    lines(out.map(|o| Box::new(o) as Box<dyn std::io::Read + Send>)),
                    lines(err.map(|e| Box::new(e) as Box<dyn std::io::Read + Send>)),
                )
            })
        })
        .collect();
    let deadline = Instant::now() + timeout;
    let mut failure: Option<(u32, String)> = None;
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[rank] = true;
                if !status.success() && failure.is_none() {
                    failure = Some((rank as u32, status.to_string()));
                }
            }
        }
        if failure.is_some() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let timed_out = failure.is_none() && done.iter().any(|d| !d);
    stop(&mut children);
    let outputs: Vec<(Vec<String>, Vec<String>)> = readers
        .into_iter()
        .map(|r| r.join().unwrap_or_default())
        .collect();
    if let Some((rank, status)) = failure {
        let tail = outputs
            .get(rank as usize)
            .map(|(_, err)| {
                err.iter()
                    .rev()
                    .take(5)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default();
        return Err(LaunchError::Worker { rank, status, tail });
    }
    if timed_out {
        return Err(LaunchError::Timeout(timeout.as_secs()));
    }
    Ok(outputs.into_iter().map(|(out, _)| out).collect())
}

fn stop(children: &mut [Child]) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}
