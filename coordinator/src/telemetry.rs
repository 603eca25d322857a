//! The coordinator's spans (exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; see
//! [`worker::telemetry`]):
//! - `request`: one per request, from the front end to its last event, continuing the
//!   caller's `traceparent` and carrying the GenAI attributes;
//! - `dispatch`: one per micro-batch sent to stage 0, child of the request span of the
//!   batch's first sequence and linked to the others'. Its context travels to stage 0 in
//!   the gRPC metadata; every stage's `stage.forward` span continues the one before.

use tonic::metadata::MetadataMap;
use tracing::field::Empty;
use worker::telemetry::{self, TraceContext};

use crate::error::CoordinatorError;

/// The header / metadata key of a caller's request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest request id taken from a caller (longer ones are replaced).
const MAX_REQUEST_ID: usize = 128;

/// What the caller says about a request: its trace context and id.
#[derive(Clone, Debug)]
pub struct RequestOrigin {
    /// The caller's trace context (empty: the request starts a trace of its own).
    pub parent: TraceContext,
    /// The caller's `x-request-id`, or one made up here.
    pub request_id: String,
    /// The OpenTelemetry GenAI operation (`text_completion`, `chat`).
    pub operation: &'static str,
}

impl RequestOrigin {
    /// Reads `traceparent` and `x-request-id` from gRPC metadata (HTTP headers convert with
    /// [`MetadataMap::from_headers`]); `explicit_id` (a request id given in the message
    /// itself) wins over the header.
    pub fn from_metadata(md: &MetadataMap, operation: &'static str, explicit_id: Option<&str>) -> Self {
        let header = md.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok());
        let request_id = explicit_id
            .into_iter()
            .chain(header)
            .map(str::trim)
            .find(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID)
            .map_or_else(|| format!("req-{:016x}", crate::grpc_api::rand_id()), str::to_string);
        RequestOrigin {
            parent: telemetry::extract(md),
            request_id,
            operation,
        }
    }
}

/// The span of one request. `gen_ai.usage.*` are recorded as they become known.
pub fn request_span(origin: &RequestOrigin, model: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "request",
        otel.name = %format!("{} {model}", origin.operation),
        otel.kind = "server",
        gen_ai.operation.name = origin.operation,
        gen_ai.request.model = %model,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        indexrelay.request_id = %origin.request_id,
        error.type = Empty,
    );
    telemetry::set_parent(&span, origin.parent.clone());
    span
}

/// Marks a request span as failed with `e`.
pub fn record_failure(span: &tracing::Span, e: &CoordinatorError) {
    span.record("error.type", e.class());
    telemetry::set_error(span, &e.to_string());
}

/// The span of one micro-batch's dispatch to stage 0: a child of the first request's span,
/// linked to the other requests' (a batch serves several requests, a span has one parent).
pub fn dispatch_span<'a>(
    batch_id: u64,
    segments: usize,
    requests: impl IntoIterator<Item = &'a TraceContext>,
) -> tracing::Span {
    let span = tracing::info_span!(
        "dispatch",
        otel.name = "dispatch micro-batch",
        otel.kind = "client",
        indexrelay.batch_id = batch_id,
        indexrelay.segments = segments,
    );
    let mut requests = requests.into_iter();
    if let Some(first) = requests.next() {
        telemetry::set_parent(&span, first.clone());
    }
    for other in requests {
        telemetry::add_link(&span, other);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut md = MetadataMap::new();
        for (k, v) in pairs {
            md.insert(*k, v.parse().unwrap());
        }
        md
    }

    #[test]
    fn request_id_comes_from_the_message_then_the_header_then_is_made_up() {
        let h = md(&[(REQUEST_ID_HEADER, "from-header")]);
        assert_eq!(RequestOrigin::from_metadata(&h, "chat", Some("own")).request_id, "own");
        assert_eq!(
            RequestOrigin::from_metadata(&h, "chat", Some("")).request_id,
            "from-header"
        );
        assert_eq!(RequestOrigin::from_metadata(&h, "chat", None).request_id, "from-header");
        let made = RequestOrigin::from_metadata(&md(&[]), "chat", None).request_id;
        assert!(made.starts_with("req-") && made.len() == 20, "{made}");
        let long = "x".repeat(MAX_REQUEST_ID + 1);
        let h = md(&[(REQUEST_ID_HEADER, long.as_str())]);
        assert!(RequestOrigin::from_metadata(&h, "chat", None)
            .request_id
            .starts_with("req-"));
    }
}
