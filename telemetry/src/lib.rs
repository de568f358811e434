//! weft's traces, shared by the operator and the trainer.
//!
//! - Export: when an OTLP endpoint is configured with the standard variables
//!   (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   with `/v1/traces` appended), spans go over OTLP/HTTP (JSON encoding) in
//!   batches, from a thread of their own, so a slow or absent collector never
//!   slows a reconcile or a step. Without an endpoint nothing is exported.
//! - Context: the operator writes the W3C `traceparent` of the reconcile that
//!   published a mesh epoch into the mesh; the workers of that epoch make
//!   their spans its children, so one trace goes from the change (a node
//!   lost) to the first steps of the new epoch.
//! - The exporter is the `export` feature (the default): without it, the
//!   context alone, with no HTTP client.
//! - With the `collector` feature, [`collector::Collector`]: an OTLP/HTTP
//!   receiver that keeps what it is sent, for tests.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
#[cfg(feature = "export")]
use {
    opentelemetry::KeyValue,
    opentelemetry_otlp::{Protocol, WithExportConfig},
    opentelemetry_sdk::Resource,
    opentelemetry_sdk::trace::SdkTracerProvider,
};

#[cfg(feature = "collector")]
pub mod collector;

/// The W3C header (and mesh field) that carries a span's context.
pub const TRACE_PARENT: &str = "traceparent";

/// The exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("could not set up the OTLP trace exporter for {endpoint}: {reason}")]
pub struct ExportError {
    pub endpoint: String,
    pub reason: String,
}

impl ExportError {
    /// A stable, machine-readable name for the kind of failure.
    pub fn category(&self) -> &'static str {
        "trace_exporter"
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

/// Whether `endpoint` can be exported to: an http:// or https:// URL.
pub fn check_endpoint(endpoint: &str) -> Result<(), ExportError> {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        Ok(())
    } else {
        Err(ExportError {
            endpoint: endpoint.to_string(),
            reason: "the endpoint must be an http:// or https:// URL".to_string(),
        })
    }
}

/// A provider exporting to `endpoint` in batches (feature `export`), its resource named
/// `service` with `attributes`. Its batches leave from a thread of its own;
/// shut it down (or drop it) to send what is left. Make it outside an async
/// runtime: the exporter's HTTP client blocks.
#[cfg(feature = "export")]
pub fn tracer_provider(
    endpoint: &str,
    service: &str,
    attributes: Vec<KeyValue>,
) -> Result<SdkTracerProvider, ExportError> {
    let exporter_error = |reason: String| ExportError {
        endpoint: endpoint.to_string(),
        reason,
    };
    check_endpoint(endpoint)?;
    // reqwest speaks TLS through rustls with the process's crypto provider;
    // weft uses ring (as kube does). Already installed is fine.
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
                .with_attributes(attributes)
                .build(),
        )
        .build())
}

/// The W3C `traceparent` of the span `cx` holds; `None` when it holds no
/// valid, sampled one (no tracing, or a span not recorded: its children
/// would not be either).
pub fn trace_parent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let context = span.span_context();
    if !(context.is_valid() && context.is_sampled()) {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove(TRACE_PARENT)
}

/// The context whose remote parent is the span `traceparent` names; `None`
/// for a value that is not a valid W3C `traceparent`.
pub fn remote_parent(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([(TRACE_PARENT.to_string(), traceparent.trim().to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

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

    #[cfg(feature = "export")]
    #[test]
    fn an_endpoint_that_is_not_a_url_is_refused_by_name() {
        let err = tracer_provider("otel:4318", "weft", vec![]).err().unwrap();
        assert_eq!(err.category(), "trace_exporter");
        assert!(err.to_string().contains("otel:4318"), "{err}");
    }

    #[test]
    fn a_span_context_goes_through_its_traceparent_and_back() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(span.clone());
        let written = trace_parent(&cx).unwrap();
        assert_eq!(
            written,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let read = remote_parent(&written).unwrap();
        assert_eq!(read.span().span_context().trace_id(), span.trace_id());
        assert_eq!(read.span().span_context().span_id(), span.span_id());
        assert!(read.span().span_context().is_remote());
        // Nothing to carry (no span, or one not sampled), and nothing
        // carried by a bad value.
        assert_eq!(trace_parent(&Context::new()), None);
        let unsampled = SpanContext::new(
            span.trace_id(),
            span.span_id(),
            TraceFlags::default(),
            false,
            TraceState::default(),
        );
        assert_eq!(
            trace_parent(&Context::new().with_remote_span_context(unsampled)),
            None
        );
        for bad in [
            "",
            "00-zz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            assert!(remote_parent(bad).is_none(), "{bad:?}");
        }
    }
}
