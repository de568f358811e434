//! A small OTLP/HTTP collector for tests: it answers every POST with 200 and
//! keeps the body, and reads the spans of the OTLP/JSON trace exports it got.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// One span as the collector received it.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectedSpan {
    pub name: String,
    /// Hex, as OTLP/JSON writes them.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The span's attributes: strings, numbers (integers are read from the
    /// strings OTLP/JSON writes them as) and booleans.
    pub attributes: BTreeMap<String, Value>,
    /// Its resource's attributes (`service.name` among them).
    pub resource: BTreeMap<String, Value>,
}

impl CollectedSpan {
    /// A string attribute.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.attributes.get(key)?.as_str()
    }

    /// An integer attribute.
    pub fn int(&self, key: &str) -> Option<i64> {
        self.attributes.get(key)?.as_i64()
    }
}

/// The requests received: (path, body).
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A collector listening on a free port of 127.0.0.1, for the life of the
/// test process.
#[derive(Debug, Clone)]
pub struct Collector {
    port: u16,
    received: Received,
}

impl Collector {
    /// On a free port of 127.0.0.1.
    pub fn start() -> std::io::Result<Collector> {
        Collector::start_on("127.0.0.1:0")
    }

    /// On `address` (`host:port`).
    pub fn start_on(address: &str) -> std::io::Result<Collector> {
        let listener = TcpListener::bind(address)?;
        let port = listener.local_addr()?.port();
        let received: Received = Arc::default();
        let keep = Arc::clone(&received);
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let keep = Arc::clone(&keep);
                std::thread::spawn(move || serve(stream, &keep));
            }
        });
        Ok(Collector { port, received })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// What `OTEL_EXPORTER_OTLP_ENDPOINT` is set to for it.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request received so far: (path, body).
    pub fn requests(&self) -> Vec<(String, String)> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every span of the trace exports (`/v1/traces`) received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.requests()
            .iter()
            .filter(|(path, _)| path == "/v1/traces")
            .flat_map(|(_, body)| spans_of_export(body))
            .collect()
    }
}

/// The spans of one OTLP/JSON trace export (a request's body); none when it
/// is not one.
pub fn spans_of_export(body: &str) -> Vec<CollectedSpan> {
    serde_json::from_str::<Value>(body)
        .map(|doc| spans_of(&doc))
        .unwrap_or_default()
}

/// Keep-alive HTTP/1.1: requests with a content length, one after another.
fn serve(stream: TcpStream, keep: &Mutex<Vec<(String, String)>>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(mut all) = keep.lock() {
            all.push((path, String::from_utf8_lossy(&body).into_owned()));
        }
        let reply =
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

/// An attribute's value: OTLP/JSON writes integers as strings.
fn value_of(any: &Value) -> Value {
    if let Some(text) = any.get("stringValue") {
        return text.clone();
    }
    if let Some(int) = any.get("intValue") {
        return match int {
            Value::String(s) => s.parse::<i64>().map_or(Value::Null, Value::from),
            other => other.clone(),
        };
    }
    any.get("doubleValue")
        .or_else(|| any.get("boolValue"))
        .cloned()
        .unwrap_or(Value::Null)
}

fn attributes(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_string(), value_of(&kv["value"]))))
        .collect()
}

fn nanos(value: &Value) -> u64 {
    match value {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

fn spans_of(doc: &Value) -> Vec<CollectedSpan> {
    let mut out = Vec::new();
    for rs in doc["resourceSpans"].as_array().into_iter().flatten() {
        let resource = attributes(&rs["resource"]["attributes"]);
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for span in ss["spans"].as_array().into_iter().flatten() {
                let text = |key: &str| span[key].as_str().unwrap_or_default().to_string();
                out.push(CollectedSpan {
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_span_id: text("parentSpanId"),
                    start_unix_nano: nanos(&span["startTimeUnixNano"]),
                    end_unix_nano: nanos(&span["endTimeUnixNano"]),
                    attributes: attributes(&span["attributes"]),
                    resource: resource.clone(),
                });
            }
        }
    }
    out
}
