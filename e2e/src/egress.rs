//! The API server's way to the real nodes' kubelets (`kubectl logs`, `exec`).
//!
//! Real nodes live in a network namespace of their own, which the API server
//! (on the machine's loopback) cannot reach. The API server's egress selector
//! sends every connection to a node through an HTTP `CONNECT` tunnel over a
//! Unix socket; `weft-e2e connect-proxy SOCKET`, started inside the nodes'
//! namespace, serves that socket: it reads `CONNECT host:port`, dials the
//! address from inside the namespace, answers `200`, and copies bytes both ways.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The longest request head a client may send before its blank line.
const MAX_HEAD: usize = 8 * 1024;
/// How long the dial to a node may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnectError {
    #[error("the request head is longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    #[error("the client closed the connection before its request ended")]
    Truncated,
    #[error("not a CONNECT request: {0:?}")]
    NotConnect(String),
    #[error("CONNECT names no host:port: {0:?}")]
    BadTarget(String),
}

/// The `host:port` of a `CONNECT host:port HTTP/1.x` request head (the bytes
/// up to and including its blank line).
pub fn connect_target(head: &[u8]) -> Result<String, ConnectError> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
            match target.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(target.to_string())
                }
                _ => Err(ConnectError::BadTarget(target.to_string())),
            }
        }
        _ => Err(ConnectError::NotConnect(line.to_string())),
    }
}

/// Reads a request head up to its blank line; returns it and any bytes after it.
async fn read_head(stream: &mut UnixStream) -> Result<(Vec<u8>, Vec<u8>), ConnectError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(ConnectError::HeadTooLong);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(ConnectError::Truncated),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn serve(mut client: UnixStream) {
    let (head, early) = match read_head(&mut client).await {
        Ok(parts) => parts,
        Err(e) => {
            let _ = reply(&mut client, "400 Bad Request", &e.to_string()).await;
            return;
        }
    };
    let target = match connect_target(&head) {
        Ok(target) => target,
        Err(e) => {
            let _ = reply(&mut client, "400 Bad Request", &e.to_string()).await;
            return;
        }
    };
    let mut upstream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&target)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            let _ = reply(&mut client, "502 Bad Gateway", &format!("{target}: {e}")).await;
            return;
        }
        Err(_) => {
            let why = format!("{target}: no answer within {} s", DIAL_TIMEOUT.as_secs());
            let _ = reply(&mut client, "504 Gateway Timeout", &why).await;
            return;
        }
    };
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
        || (!early.is_empty() && upstream.write_all(&early).await.is_err())
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

async fn reply(client: &mut UnixStream, status: &str, why: &str) -> std::io::Result<()> {
    eprintln!("connect-proxy: {status}: {why}");
    let body = format!("{why}\n");
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(body.as_bytes()).await
}

/// Serves CONNECT tunnels on a Unix socket at `path` until the process ends
/// (a stale socket file there is replaced).
pub async fn run(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(serve(client));
            }
            // Out of descriptors, a client gone before it was accepted: the
            // proxy goes on (nothing would start it again).
            Err(e) => {
                eprintln!("connect-proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_target_of_a_connect_request() {
        let head = b"CONNECT 10.244.0.11:10250 HTTP/1.1\r\nHost: 10.244.0.11:10250\r\n\r\n";
        assert_eq!(connect_target(head).unwrap(), "10.244.0.11:10250");
        assert_eq!(
            connect_target(b"CONNECT [::1]:443 HTTP/1.0\r\n\r\n").unwrap(),
            "[::1]:443"
        );
    }

    #[test]
    fn refuses_what_is_not_a_tunnel_to_host_and_port() {
        assert!(matches!(
            connect_target(b"GET / HTTP/1.1\r\n\r\n"),
            Err(ConnectError::NotConnect(_))
        ));
        assert!(matches!(
            connect_target(b"CONNECT 10.0.0.1 HTTP/1.1\r\n\r\n"),
            Err(ConnectError::BadTarget(_))
        ));
        assert!(matches!(
            connect_target(b"CONNECT 10.0.0.1:99999 HTTP/1.1\r\n\r\n"),
            Err(ConnectError::BadTarget(_))
        ));
        assert!(matches!(
            connect_target(b"CONNECT 10.0.0.1:80 SPDY\r\n\r\n"),
            Err(ConnectError::NotConnect(_))
        ));
    }

    #[tokio::test]
    async fn tunnels_bytes_both_ways_and_refuses_a_closed_port() {
        let dir = std::env::temp_dir().join(format!("weft-connect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("egress.sock");
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let proxy_socket = socket.clone();
        tokio::spawn(async move { run(&proxy_socket).await });
        let mut client = loop {
            match UnixStream::connect(&socket).await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let request = format!("CONNECT {echo_addr} HTTP/1.1\r\nHost: {echo_addr}\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = [0u8; 39];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 200 Connection established\r\n\r\n");
        client.write_all(b"hello").await.unwrap();
        let mut echoed = [0u8; 5];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"hello");

        // A port nobody listens on: 502, naming the address.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let mut client = UnixStream::connect(&socket).await.unwrap();
        let request = format!("CONNECT {closed_addr} HTTP/1.1\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(answer.contains(&closed_addr.to_string()), "{answer}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
