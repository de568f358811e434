//! Local multi-process launch: N worker processes of this same binary on one
//! machine, meeting at a rendezvous store on 127.0.0.1, the same code path a
//! pod runs. If any worker fails, the others are stopped, so a launch never
//! hangs on a dead peer.
//!
//! When one worker dies, its peers fail too, a moment later, with a collective
//! error ("connection closed by peer"). Those are symptoms: a worker whose
//! collective failed exits with [`PEER_LOST_EXIT`], and the launcher waits a
//! short while after the first failure so that it reports the worker that
//! failed for a reason of its own, whichever exited first.

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
    #[error("worker {rank} failed ({status}); its last output: {tail}{stopped}")]
    Worker {
        rank: u32,
        status: String,
        tail: String,
        /// The workers still running when the others' failures had been
        /// waited for, which the launcher stopped (empty: every worker
        /// ended on its own).
        stopped: StoppedWorkers,
    },
    #[error(
        "worker(s) {ranks:?} stopped responding: their peers' collectives timed out waiting for them ({status}) while they were still running; they were stopped. Their last output: {tail}"
    )]
    Stalled {
        ranks: Vec<u32>,
        status: String,
        tail: String,
    },
    #[error("workers did not finish within {0} s; they were stopped")]
    Timeout(u64),
}

/// The workers the launcher had to stop after a failure.
#[derive(Debug, Default)]
pub struct StoppedWorkers(pub Vec<u32>);

impl std::fmt::Display for StoppedWorkers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        write!(
            f,
            "; worker(s) {:?} were still running after it and were stopped",
            self.0
        )
    }
}

impl LaunchError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            LaunchError::Spawn { .. } | LaunchError::Port(_) | LaunchError::Exe(_) => "launch",
            LaunchError::Worker { .. } => "worker_failed",
            LaunchError::Stalled { .. } => "worker_stalled",
            LaunchError::Timeout(_) => "timeout",
        }
    }
}

/// The exit status of a worker whose collective operation failed: most often
/// the sign that another worker died, not a fault of its own.
pub const PEER_LOST_EXIT: i32 = 3;

/// How long, after the first worker fails, the launcher waits for the others
/// to exit before it names the cause.
const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// A free loopback port for the rendezvous store, which rank 0 binds only
/// once it has started. Taken below the kernel's ephemeral range (from
/// 32768), from a start of this process's own and never twice in it, so
/// that in the meantime neither an outgoing connection (Gloo's, another
/// run's) nor another run started beside this one takes it; any port the
/// kernel gives when none is free there.
pub fn free_port() -> Result<u16, LaunchError> {
    static NEXT: std::sync::Mutex<Option<u16>> = std::sync::Mutex::new(None);
    const LOW: u16 = 20_000;
    const SPAN: u16 = 12_000;
    let mut next = NEXT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut port = next.unwrap_or(LOW + (std::process::id() % u32::from(SPAN)) as u16);
    for _ in 0..SPAN {
        let candidate = port;
        port = if port + 1 >= LOW + SPAN {
            LOW
        } else {
            port + 1
        };
        if std::net::TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            *next = Some(port);
            return Ok(candidate);
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(LaunchError::Port)
}

/// Runs `ranks` copies of this program with `args(rank, port)` and returns
/// each worker's standard output lines, by rank. `on_line(rank, line)` sees
/// every standard output line as it arrives (for progress).
pub fn run_local(
    ranks: u32,
    timeout: Duration,
    args: impl Fn(u32, u16) -> Vec<String>,
    mut on_line: impl FnMut(u32, &str),
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
    // Read every worker's output on threads of its own, so no pipe fills up;
    // standard output lines come here as they are written.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<(u32, String)>();
    let mut out_readers = Vec::new();
    let mut err_readers = Vec::new();
    for (rank, child) in children.iter_mut().enumerate() {
        let out = child.stdout.take();
        let err = child.stderr.take();
        let tx = lines_tx.clone();
        out_readers.push(std::thread::spawn(move || {
            if let Some(out) = out {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send((rank as u32, line)).is_err() {
                        break;
                    }
                }
            }
        }));
        err_readers.push(std::thread::spawn(move || {
            err.map(|e| {
                BufReader::new(e)
                    .lines()
                    .map_while(Result::ok)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        }));
    }
    drop(lines_tx);
    let mut outputs: Vec<Vec<String>> = vec![Vec::new(); children.len()];
    let mut take = |rank: u32, line: String, outputs: &mut Vec<Vec<String>>| {
        on_line(rank, &line);
        outputs[rank as usize].push(line);
    };
    let deadline = Instant::now() + timeout;
    let mut failures: Vec<(u32, std::process::ExitStatus)> = Vec::new();
    let mut grace_until: Option<Instant> = None;
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        while let Ok((rank, line)) = lines_rx.recv_timeout(Duration::from_millis(20)) {
            take(rank, line, &mut outputs);
        }
        for (rank, child) in children.iter_mut().enumerate() {
            if done[rank] {
                continue;
            }
            if let Ok(Some(status)) = child.try_wait() {
                done[rank] = true;
                if !status.success() {
                    failures.push((rank as u32, status));
                    grace_until.get_or_insert_with(|| Instant::now() + FAILURE_GRACE);
                }
            }
        }
        let now = Instant::now();
        if grace_until.is_some_and(|until| now > until) || now > deadline {
            break;
        }
    }
    // The cause is the first worker that failed for a reason of its own. If
    // every failure was a lost peer and some workers are still running past
    // the grace, those stalled (stopped, or stuck): they are the cause. Only
    // otherwise is the first lost peer reported.
    let own = failures
        .iter()
        .find(|(_, status)| status.code() != Some(PEER_LOST_EXIT));
    // The workers still running when the waiting ended.
    let still_running: Vec<u32> = (0..children.len() as u32)
        .filter(|r| !done[*r as usize])
        .collect();
    let stalled: Vec<u32> = if own.is_none() && !failures.is_empty() {
        still_running.clone()
    } else {
        Vec::new()
    };
    let failure = own
        .or(failures.first())
        .map(|(rank, status)| (*rank, status.to_string()));
    let timed_out = failure.is_none() && !still_running.is_empty();
    stop(&mut children);
    for reader in out_readers {
        let _ = reader.join();
    }
    while let Ok((rank, line)) = lines_rx.try_recv() {
        take(rank, line, &mut outputs);
    }
    let errors: Vec<Vec<String>> = err_readers
        .into_iter()
        .map(|r| r.join().unwrap_or_default())
        .collect();
    let tail_of = |rank: u32| {
        errors
            .get(rank as usize)
            .map(|err| {
                err.iter()
                    .rev()
                    .take(5)
                    .rev()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
            .unwrap_or_default()
    };
    if let (Some(first), Some((_, status))) = (stalled.first(), &failure) {
        return Err(LaunchError::Stalled {
            tail: tail_of(*first),
            ranks: stalled,
            status: format!("worker {} {status}", failures[0].0),
        });
    }
    if let Some((rank, status)) = failure {
        return Err(LaunchError::Worker {
            rank,
            tail: tail_of(rank),
            status,
            stopped: StoppedWorkers(still_running),
        });
    }
    if timed_out {
        return Err(LaunchError::Timeout(timeout.as_secs()));
    }
    Ok(outputs)
}

fn stop(children: &mut [Child]) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Everything `pipe` gives, read on a thread of its own.
fn read_to_end<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// What [`output_within`] got from a process.
#[derive(Debug)]
pub struct Finished {
    pub output: std::process::Output,
    /// The process outlived the time it had and was stopped.
    pub timed_out: bool,
}

/// Runs `command` to its end, or stops it after `timeout`; its standard
/// output and error are read meanwhile (so neither pipe fills up).
pub fn output_within(mut command: Command, timeout: Duration) -> std::io::Result<Finished> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = read_to_end(child.stdout.take());
    let stderr = read_to_end(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Finished {
        output: std::process::Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        },
        timed_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that ends is read whole; one that outlives its time is
    /// stopped and says so.
    #[test]
    fn a_process_runs_to_its_end_or_is_stopped_in_time() {
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo out; echo err >&2; exit 3"]);
        let done = output_within(echo, Duration::from_secs(30)).unwrap();
        assert!(!done.timed_out);
        assert_eq!(done.output.status.code(), Some(3));
        assert_eq!(done.output.stdout, b"out\n");
        assert_eq!(done.output.stderr, b"err\n");
        let mut sleep = Command::new("sleep");
        sleep.arg("30");
        let started = Instant::now();
        let stopped = output_within(sleep, Duration::from_millis(200)).unwrap();
        assert!(stopped.timed_out && !stopped.output.status.success());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
