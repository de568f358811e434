//! Logs and traces.
//!
//! Logs are structured (`tracing`): levelled by `RUST_LOG` (default `info`),
//! as text for a terminal or as one JSON object per line for a log pipeline.
//! Each reconcile runs in a `reconcile` span that names the job, so every line
//! it logs says which job it is about.
//!
//! Traces: when an OTLP endpoint is configured with the standard variables
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
//! with `/v1/traces` appended), the same spans are exported over OTLP/HTTP
//! (JSON encoding) in batches, from a thread of their own, so a slow or absent
//! collector never slows a reconcile. Without an endpoint nothing is exported.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the span fields (job, namespace).
    Json,
}

/// What can go wrong setting up logs and traces.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("RUST_LOG {value:?} is not a valid log filter: {reason}")]
    Filter { value: String, reason: String },
    #[error("could not set up the OTLP trace exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("logging was already set up: {0}")]
    AlreadySet(String),
}

impl TelemetryError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            TelemetryError::Filter { .. } => "log_filter",
            TelemetryError::Exporter { .. } => "trace_exporter",
            TelemetryError::AlreadySet(_) => "telemetry",
        }
    }
}

/// Keeps the trace exporter alive; dropping it flushes the spans not yet sent.
#[derive(Debug)]
#[must_use = "dropping the guard stops the trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Where traces go, when they go anywhere.
    pub traces_endpoint: Option<String>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("weft-operator: flushing traces failed: {e}");
        }
    }
}

/// The OTLP traces endpoint the standard environment variables name, if any.
pub fn traces_endpoint(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if let Some(endpoint) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return Some(endpoint);
    }
    set("OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
}

/// Sets up logs (and traces when an endpoint is configured) for this process.
/// Call it before the async runtime starts: the exporter's HTTP client blocks.
pub fn init(format: LogFormat, service: &str) -> Result<Telemetry, TelemetryError> {
    let value = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter {
        value: value.clone(),
        reason: e.to_string(),
    })?;
    let endpoint = traces_endpoint(|name| std::env::var(name).ok());
    let provider = match &endpoint {
        Some(endpoint) => Some(tracer_provider(endpoint, service)?),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_string())));
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            ),
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::AlreadySet(e.to_string()))?;
    Ok(Telemetry {
        provider,
        traces_endpoint: endpoint,
    })
}

fn tracer_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter_error = |reason: String| TelemetryError::Exporter {
        endpoint: endpoint.to_string(),
        reason,
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(exporter_error(
            "the endpoint must be an http:// or https:// URL".to_string(),
        ));
    }
    // reqwest speaks TLS through rustls with the process's crypto provider;
    // the operator uses ring (as kube does). Already installed is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| exporter_error(e.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_standard_variables_name_the_traces_endpoint() {
        assert_eq!(traces_endpoint(env(&[])), None);
        assert_eq!(
            traces_endpoint(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            None
        );
        assert_eq!(
            traces_endpoint(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")])),
            Some("http://otel:4318/v1/traces".to_string())
        );
        assert_eq!(
            traces_endpoint(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://tempo:4318/traces"
                ),
            ])),
            Some("http://tempo:4318/traces".to_string())
        );
    }

    #[test]
    fn an_endpoint_that_is_not_a_url_is_refused_by_name() {
        let err = tracer_provider("otel:4318", "weft-operator").err().unwrap();
        assert_eq!(err.category(), "trace_exporter");
        assert!(err.to_string().contains("otel:4318"), "{err}");
    }
}
