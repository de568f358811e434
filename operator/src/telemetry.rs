//! Logs and traces.
//!
//! Logs are structured (`tracing`): levelled by `RUST_LOG` (default `info`),
//! as text for a terminal or as one JSON object per line for a log pipeline.
//! Each reconcile runs in a `reconcile` span that names the job, so every line
//! it logs says which job it is about.
//!
//! Traces: when an OTLP endpoint is configured with the standard variables
//! (see [`weft_telemetry::traces_endpoint`]), the same spans are exported
//! over OTLP/HTTP from a thread of their own. Without an endpoint nothing is
//! exported.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
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
    #[error(transparent)]
    Exporter(#[from] weft_telemetry::ExportError),
    #[error("logging was already set up: {0}")]
    AlreadySet(String),
}

impl TelemetryError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        match self {
            TelemetryError::Filter { .. } => "log_filter",
            TelemetryError::Exporter(e) => e.category(),
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

/// Sets up logs (and traces when an endpoint is configured) for this process.
/// Call it before the async runtime starts: the exporter's HTTP client blocks.
pub fn init(format: LogFormat, service: &str) -> Result<Telemetry, TelemetryError> {
    let value = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string());
    let filter = EnvFilter::try_new(&value).map_err(|e| TelemetryError::Filter {
        value: value.clone(),
        reason: e.to_string(),
    })?;
    let endpoint = weft_telemetry::traces_endpoint(|name| std::env::var(name).ok());
    let provider = match &endpoint {
        Some(endpoint) => Some(weft_telemetry::tracer_provider(endpoint, service, vec![])?),
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
