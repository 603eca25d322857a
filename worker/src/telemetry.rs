//! Logs and OpenTelemetry traces for every IndexRelay process (the `worker` binary and the
//! `coordinator` binary, which also runs stages): one [`init`] for all of them.
//!
//! Logs go to stderr, filtered by `RUST_LOG`. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! spans are also exported over OTLP/gRPC under the service name `OTEL_SERVICE_NAME` (or the
//! binary's default). Only IndexRelay's own spans are exported — whatever `RUST_LOG` says —
//! so the exporter's gRPC client (tonic, hyper, h2) never traces its own traffic; the
//! exporter also runs on a runtime of its own, apart from the served traffic.
//!
//! Traces cross processes as W3C `traceparent` in gRPC metadata (and HTTP headers):
//! [`extract`] reads a caller's context, [`inject`] writes a span's context for the next hop.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// An OpenTelemetry context: what a span continues from, or what travels to the next hop.
pub use opentelemetry::Context as TraceContext;

/// Default service name of the coordinator process.
pub const COORDINATOR_SERVICE: &str = "indexrelay-coordinator";
/// Default service name of a worker (stage) process.
pub const WORKER_SERVICE: &str = "indexrelay-worker";

/// The crates whose spans are exported (targets are module paths).
const EXPORTED_TARGETS: [&str; 2] = ["coordinator", "worker"];

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
#[must_use = "dropping the guard stops the exporter"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The exporter's own runtime (tonic needs one; kept apart from served traffic).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("telemetry: flushing spans failed: {e}");
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The service name: `OTEL_SERVICE_NAME` when set and not blank, else `default`.
pub fn service_name(env_value: Option<String>, default: &str) -> String {
    env_value
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// Installs logging (stderr; `RUST_LOG`, else `default_log`) and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the OTLP/gRPC span exporter for `default_service`.
/// A broken exporter configuration is reported and tracing stays off: serving matters more.
pub fn init(default_service: &str, default_log: &str) -> Telemetry {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_log)));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.trim().is_empty());
    let (otel, guard, problem) = match endpoint.map(|e| exporter(&e, default_service)) {
        None => (
            None,
            Telemetry {
                provider: None,
                runtime: None,
            },
            None,
        ),
        Some(Ok((provider, runtime))) => {
            let targets = EXPORTED_TARGETS
                .iter()
                .fold(Targets::new(), |t, name| t.with_target(*name, LevelFilter::INFO));
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("indexrelay"))
                .with_filter(targets);
            let guard = Telemetry {
                provider: Some(provider),
                runtime: Some(runtime),
            };
            (Some(layer), guard, None)
        }
        Some(Err(e)) => (
            None,
            Telemetry {
                provider: None,
                runtime: None,
            },
            Some(e),
        ),
    };
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(logs).with(otel).try_init();
    if let Some(e) = problem {
        tracing::error!(error = %e, "OpenTelemetry export is off");
    }
    guard
}

/// The provider exporting to `endpoint`, and the runtime its gRPC client lives on.
fn exporter(endpoint: &str, default_service: &str) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the exporter runtime: {e}"))?;
    // The tonic channel is created on (and driven by) the exporter's runtime.
    let exporter = {
        let _rt = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}: {e}"))?
    };
    let name = service_name(std::env::var("OTEL_SERVICE_NAME").ok(), default_service);
    let provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(name).build())
        .with_batch_exporter(exporter)
        .build();
    Ok((provider, runtime))
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

/// The caller's trace context from W3C `traceparent` / `tracestate` (empty when absent or
/// malformed: the span then starts a trace of its own).
pub fn extract(md: &MetadataMap) -> TraceContext {
    TraceContextPropagator::new().extract(&MetadataExtractor(md))
}

/// Writes `cx` as W3C `traceparent` / `tracestate` (nothing when `cx` holds no span).
pub fn inject(cx: &TraceContext, md: &mut MetadataMap) {
    TraceContextPropagator::new().inject_context(cx, &mut MetadataInjector(md));
}

/// A gRPC request carrying `cx` as its caller's trace context.
pub fn request_with<T>(msg: T, cx: &TraceContext) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    inject(cx, req.metadata_mut());
    req
}

/// The context of `span` (for [`inject`], or to parent spans made elsewhere).
pub fn context_of(span: &tracing::Span) -> TraceContext {
    span.context()
}

/// Makes `span` a child of `parent` (a no-op when `parent` holds no span, or when spans are
/// not exported).
pub fn set_parent(span: &tracing::Span, parent: TraceContext) {
    if parent.has_active_span() {
        let _ = span.set_parent(parent);
    }
}

/// Links `span` to the span in `cx` (a batch span to the other requests it serves).
pub fn add_link(span: &tracing::Span, cx: &TraceContext) {
    if cx.has_active_span() {
        span.add_link(cx.span().span_context().clone());
    }
}

/// Marks `span` as failed with `message` (OpenTelemetry status ERROR).
pub fn set_error(span: &tracing::Span, message: &str) {
    span.set_status(opentelemetry::trace::Status::error(message.to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_prefers_a_non_blank_override() {
        assert_eq!(service_name(None, WORKER_SERVICE), "indexrelay-worker");
        assert_eq!(service_name(Some("  ".into()), WORKER_SERVICE), "indexrelay-worker");
        assert_eq!(service_name(Some("edge-7".into()), WORKER_SERVICE), "edge-7");
    }

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let mut md = MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = extract(&md);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        let mut out = MetadataMap::new();
        inject(&cx, &mut out);
        assert_eq!(
            out.get("traceparent").unwrap().to_str().unwrap(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        // Garbage is no parent.
        let mut bad = MetadataMap::new();
        bad.insert("traceparent", "00-zz-11-01".parse().unwrap());
        assert!(!extract(&bad).span().span_context().is_valid());
    }
}
