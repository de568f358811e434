//! Each rank's steps as OpenTelemetry traces.
//!
//! A rank of a pod exports its spans over OTLP/HTTP when the job names a
//! collector with the standard variables (`OTEL_EXPORTER_OTLP_ENDPOINT`, in
//! the job's `env`): how it met its peers (`rendezvous`), resumed
//! (`resume`), and each `step` with its phases (`plan`, `forward_backward`
//! with every `ring_attention`, `ring_attention_backward` and `remap` in it,
//! `all_reduce`, `optimizer`, `checkpoint`). They are children of the span
//! the worker hands down in `TRACEPARENT` (W3C), the operator's reconcile
//! that published the rank's mesh epoch, so one trace goes from a change of
//! membership to the first steps of the new epoch.
//!
//! Spans are made once a step is over, from the times the step recorded
//! (nothing is traced inside the engine), and leave in batches from a thread
//! of their own: a slow or absent collector never slows a step.
//!
//! The training loop hands its times to a [`StepSink`]; the exporter,
//! `StepTrace`, comes with the pod agent (feature `agent`), so the engine
//! links no HTTP client.

use std::time::Instant;

use opentelemetry::KeyValue;

use crate::step::Interval;

/// The variable a pod's worker hands its ranks the epoch's trace context in
/// (the W3C `traceparent` of the reconcile that published the mesh).
pub const TRACE_PARENT_ENV: &str = "TRACEPARENT";

/// The most work intervals (ring attention, remap) one step exports; the
/// step span says how many more there were.
pub const MAX_INTERVALS: usize = 1024;

/// A phase of a step: its span name and when it ran.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub start: Instant,
    pub end: Instant,
}

impl Phase {
    pub fn new(name: &'static str, start: Instant, end: Instant) -> Phase {
        Phase { name, start, end }
    }
}

/// One step as the rank ran it.
#[derive(Clone, Debug)]
pub struct StepSpans<'a> {
    pub step: u64,
    pub start: Instant,
    pub end: Instant,
    pub attributes: Vec<KeyValue>,
    /// In the order they ran; `forward_backward` holds `work`.
    pub phases: Vec<Phase>,
    /// The ring attention and remap intervals of its forward and backward.
    pub work: &'a [Interval],
}

/// Where a rank's spans go.
pub trait StepSink: Send + Sync + std::fmt::Debug {
    /// A span of the rank's life outside its steps (`rendezvous`, `resume`).
    fn span(&self, name: &'static str, start: Instant, end: Instant, attributes: Vec<KeyValue>);
    /// A step's span and its phases'.
    fn step(&self, step: &StepSpans<'_>);
    /// Sends what is left (the rank is about to end).
    fn flush(&self) {}
}

#[cfg(feature = "agent")]
pub use exporter::StepTrace;

#[cfg(feature = "agent")]
mod exporter {
    use std::time::{Duration, Instant, SystemTime};

    use opentelemetry::trace::{Span as _, TraceContextExt, Tracer as _, TracerProvider as _};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

    use super::{MAX_INTERVALS, StepSink, StepSpans};

    /// A rank's exporter and the parent of its spans.
    pub struct StepTrace {
        provider: SdkTracerProvider,
        tracer: SdkTracer,
        parent: Context,
        /// One instant and the wall-clock time it was: spans are made from
        /// instants (monotonic) measured before.
        anchor: (Instant, SystemTime),
    }

    impl std::fmt::Debug for StepTrace {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("StepTrace")
                .field("parent", &weft_telemetry::trace_parent(&self.parent))
                .finish_non_exhaustive()
        }
    }

    impl StepTrace {
        /// The rank's trace when the environment names a collector (`var` reads
        /// it); `None` otherwise. Its spans are children of `trace_parent` when
        /// that is a valid W3C `traceparent`, roots otherwise. `resource` names
        /// the rank (job, worker, rank, mesh epoch).
        pub fn from_env(
            var: impl Fn(&str) -> Option<String>,
            trace_parent: Option<&str>,
            resource: Vec<KeyValue>,
        ) -> Result<Option<StepTrace>, weft_telemetry::ExportError> {
            let Some(endpoint) = weft_telemetry::traces_endpoint(var) else {
                return Ok(None);
            };
            let provider = weft_telemetry::tracer_provider(&endpoint, "weft-trainer", resource)?;
            let tracer = provider.tracer("weft-trainer");
            let parent = trace_parent
                .and_then(weft_telemetry::remote_parent)
                .unwrap_or_default();
            Ok(Some(StepTrace {
                provider,
                tracer,
                parent,
                anchor: (Instant::now(), SystemTime::now()),
            }))
        }

        /// The wall-clock time of `instant`.
        fn wall(&self, instant: Instant) -> SystemTime {
            let (at, wall) = self.anchor;
            match instant.checked_duration_since(at) {
                Some(after) => wall + after,
                None => wall - at.duration_since(instant),
            }
        }

        /// A span `name` from `start` to `end`, a child of `parent`; the context
        /// that holds it.
        fn span_in(
            &self,
            parent: &Context,
            name: &'static str,
            start: Instant,
            end: Instant,
            attributes: Vec<KeyValue>,
        ) -> Context {
            let mut span = self
                .tracer
                .span_builder(name)
                .with_start_time(self.wall(start))
                .with_attributes(attributes)
                .start_with_context(&self.tracer, parent);
            span.end_with_timestamp(self.wall(end.max(start)));
            parent.with_span(span)
        }
    }

    /// Spans of the rank's life and its steps are children of the epoch's parent.
    impl StepSink for StepTrace {
        fn span(
            &self,
            name: &'static str,
            start: Instant,
            end: Instant,
            attributes: Vec<KeyValue>,
        ) {
            self.span_in(&self.parent, name, start, end, attributes);
        }

        fn step(&self, step: &StepSpans<'_>) {
            let mut attributes = step.attributes.clone();
            attributes.push(KeyValue::new("weft.step", step.step as i64));
            let left_out = step.work.len().saturating_sub(MAX_INTERVALS);
            if left_out > 0 {
                attributes.push(KeyValue::new("weft.intervals_left_out", left_out as i64));
            }
            // Every span is made after the fact with its own times: the
            // step's is ended (at its end time) before its children are
            // made under its context.
            let in_step = self.span_in(&self.parent, "step", step.start, step.end, attributes);
            for phase in &step.phases {
                let in_phase = self.span_in(&in_step, phase.name, phase.start, phase.end, vec![]);
                if phase.name == "forward_backward" {
                    for interval in step.work.iter().take(MAX_INTERVALS) {
                        self.span_in(
                            &in_phase,
                            interval.kind.span_name(),
                            interval.start,
                            interval.end,
                            vec![KeyValue::new(
                                "weft.micro_batch",
                                i64::from(interval.micro_batch),
                            )],
                        );
                    }
                }
            }
        }

        fn flush(&self) {
            if let Err(e) = self.provider.force_flush() {
                eprintln!("weft-trainer: sending the last step traces failed: {e}");
            }
        }
    }

    impl Drop for StepTrace {
        fn drop(&mut self) {
            let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}
