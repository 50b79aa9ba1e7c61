//! Logs and traces: `tracing` to stderr (human-readable or JSON), and OpenTelemetry spans over
//! OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (with the other standard `OTEL_*`
//! variables). A message's trace context travels in the broker envelope (`traceparent`), so
//! one trace covers the publishing node and every receiving node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether spans are exported: when off, no trace context is computed or carried.
static TRACING_ON: AtomicBool = AtomicBool::new(false);

/// Flushes and stops the exporter when dropped (at the end of `main`).
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber. Must run inside the tokio runtime (the gRPC exporter
/// needs it). `json` selects JSON log lines.
pub fn init(json: bool, node_id: &str) -> TelemetryGuard {
    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed()
    };
    let provider = otlp_provider(node_id);
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("gateway"))
            .with_filter(LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(fmt.with_filter(log_filter))
        .with(otel)
        .init();
    TelemetryGuard { provider }
}

fn otlp_provider(node_id: &str) -> Option<SdkTracerProvider> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let traces_endpoint = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").unwrap_or_default();
    if endpoint.is_empty() && traces_endpoint.is_empty() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("OpenTelemetry exporter not started: {e}");
            return None;
        }
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "gateway".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_string()))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    TRACING_ON.store(true, Ordering::Relaxed);
    Some(provider)
}

/// The W3C traceparent of the current span, or "" when tracing is off.
pub fn current_traceparent() -> String {
    if !TRACING_ON.load(Ordering::Relaxed) {
        return String::new();
    }
    let context = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&context, &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// The span of one broker message's fan-out on this node, a child of the publishing span
/// when the envelope carried one (a disabled span otherwise).
pub fn delivery_span(
    traceparent: &str,
    channel: &crate::broker::Topic,
    recipients: usize,
) -> tracing::Span {
    if !TRACING_ON.load(Ordering::Relaxed) || traceparent.is_empty() {
        return tracing::Span::none();
    }
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let span = tracing::info_span!("deliver", channel = %channel, recipients);
    let _ = span.set_parent(parent);
    span
}
