//! OpenTelemetry over OTLP/gRPC: an in-process collector receives, for one request through
//! a 3-stage cluster, one trace holding the coordinator's request span and every stage's
//! forward spans, parented along the pipeline, with the GenAI and IndexRelay attributes —
//! and nothing of the exporter's own gRPC traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::{json, Value};
use tonic::{Request, Response, Status};
use worker::SamplingParams;

use super::cluster::{self, fixture, Cluster};

/// A received span and the service that sent it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<String> {
        attr(&self.span.attributes, key)
    }

    fn need(&self, key: &str) -> String {
        self.attr(key)
            .unwrap_or_else(|| panic!("span {:?} has no {key}: {:?}", self.span.name, self.span.attributes))
    }
}

fn attr(kvs: &[KeyValue], key: &str) -> Option<String> {
    let v = kvs.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match v {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(i) => i.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        AnyValue::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

/// The collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Got>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|span| Got {
                    service: service.clone(),
                    span,
                }));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Collector {
    /// Serves on a free loopback port; returns the endpoint URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn trace(&self, trace_id: &[u8]) -> Vec<Got> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|g| g.span.trace_id == trace_id).cloned().collect()
    }

    /// Waits until trace `trace_id` holds at least `n` spans.
    async fn wait_for(&self, trace_id: &[u8], n: usize) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.trace(trace_id);
            if got.len() >= n {
                // Give stragglers (more than expected would be a bug) a moment to arrive.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return self.trace(trace_id);
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} spans of the trace arrived: {:#?}",
                got.len(),
                got.iter().map(|g| &g.span.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// Checks the spans of one request of `tokens` generated tokens (one micro-batch per token:
/// the prompts are shorter than a prefill chunk) and returns the request span.
fn check_request_trace(spans: &[Got], parent: &str, request_id: &str, prompt_len: usize, tokens: usize) -> Got {
    let request: Vec<&Got> = spans
        .iter()
        .filter(|g| g.attr("gen_ai.request.model").is_some())
        .collect();
    assert_eq!(request.len(), 1, "one request span: {spans:#?}");
    let request = request[0].clone();
    assert_eq!(request.service, "indexrelay-coordinator");
    assert_eq!(
        hex(&request.span.parent_span_id),
        parent,
        "the request continues the caller's span"
    );
    assert_eq!(request.need("gen_ai.request.model"), "glm_pattern");
    assert_eq!(request.need("gen_ai.operation.name"), "text_completion");
    assert_eq!(request.need("gen_ai.usage.input_tokens"), prompt_len.to_string());
    assert_eq!(request.need("gen_ai.usage.output_tokens"), tokens.to_string());
    assert_eq!(request.need("indexrelay.request_id"), request_id);

    let dispatches: Vec<&Got> = spans.iter().filter(|g| g.span.name == "dispatch micro-batch").collect();
    assert_eq!(dispatches.len(), tokens, "one micro-batch per generated token");
    let mut by_batch: BTreeMap<String, Vec<&Got>> = BTreeMap::new();
    for d in &dispatches {
        assert_eq!(d.service, "indexrelay-coordinator");
        assert_eq!(
            d.span.parent_span_id, request.span.span_id,
            "dispatch under the request"
        );
        by_batch.entry(d.need("indexrelay.batch_id")).or_default().push(d);
    }
    let stage_spans: Vec<&Got> = spans.iter().filter(|g| g.attr("indexrelay.stage").is_some()).collect();
    assert_eq!(stage_spans.len(), 3 * tokens, "every stage forwards every micro-batch");
    // FFSFSF over [0,2) [2,4) [4,6): stages 1 and 2 start on a Shared layer, so stages 0
    // and 1 relay indices and stage 2 (the last) relays nothing.
    let expect = [("0..2", 2, 0, true), ("2..4", 1, 1, true), ("4..6", 1, 1, false)];
    let mut workers = BTreeSet::new();
    for (batch, d) in &by_batch {
        let mut parent = d[0].span.span_id.clone();
        let mut parent_start = d[0].span.start_time_unix_nano;
        for (stage, (layers, full, shared, relays)) in expect.iter().enumerate() {
            let s: Vec<&&Got> = stage_spans
                .iter()
                .filter(|g| g.need("indexrelay.batch_id") == *batch && g.need("indexrelay.stage") == stage.to_string())
                .collect();
            assert_eq!(s.len(), 1, "batch {batch} stage {stage}: {s:#?}");
            let s = s[0];
            assert_eq!(s.service, "indexrelay-worker");
            assert_eq!(
                s.span.parent_span_id, parent,
                "batch {batch}: stage {stage} continues the hop before"
            );
            assert!(
                s.span.start_time_unix_nano >= parent_start,
                "stage {stage} starts before its parent"
            );
            assert_eq!(s.need("indexrelay.layers"), *layers);
            assert_eq!(s.need("indexrelay.full_layers"), full.to_string());
            assert_eq!(s.need("indexrelay.shared_layers"), shared.to_string());
            let relay: u64 = s.need("indexrelay.relay_bytes").parse().unwrap();
            assert_eq!(relay > 0, *relays, "stage {stage} relay bytes {relay}");
            workers.insert(s.need("indexrelay.worker"));
            parent = s.span.span_id.clone();
            parent_start = s.span.start_time_unix_nano;
        }
    }
    assert_eq!(
        workers,
        ["stage-0", "stage-1", "stage-2"].map(String::from).into(),
        "spans from all three workers"
    );
    assert_eq!(spans.len(), 1 + tokens + 3 * tokens, "no other spans in the trace");
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_pipeline() {
    let collector = Collector::default();
    let endpoint = collector.start().await;
    let dir = fixture("glm_pattern");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Export every 100 ms instead of every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let c = Cluster::start_with_env(&dir, 3, &[2, 4], &[], &env).await;

    // Over HTTP, with the caller's traceparent and request id.
    let prompt: Vec<u32> = (0..7).map(|i| (i * 13 + 5) % 320).collect();
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", c.http))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("x-request-id", "trace-test-1")
        .json(&json!({"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "trace-test-1");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let spans = collector.wait_for(&unhex(CLIENT_TRACE), 1 + 3 + 9).await;
    check_request_trace(&spans, CLIENT_SPAN, "trace-test-1", prompt.len(), 3);

    // Over gRPC, with traceparent in the metadata and the request id in the message.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let span2 = "b7ad6b7169203331";
    let mut req = tonic::Request::new(cluster::request(prompt.clone(), 2, SamplingParams::default(), false));
    req.get_mut().request_id = "grpc-1".into();
    req.metadata_mut()
        .insert("traceparent", format!("00-{trace2}-{span2}-01").parse().unwrap());
    let mut stream = c.client().generate(req).await.unwrap().into_inner();
    while let Some(msg) = stream.message().await.unwrap() {
        assert_eq!(msg.request_id, "grpc-1");
    }
    let spans = collector.wait_for(&unhex(trace2), 1 + 2 + 6).await;
    check_request_trace(&spans, span2, "grpc-1", prompt.len(), 2);

    // A request without a traceparent starts its own trace.
    c.generate(prompt.clone(), 1, SamplingParams::default(), false)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let own = loop {
        let all = collector.spans.lock().unwrap().clone();
        let roots: Vec<Got> = all
            .into_iter()
            .filter(|g| g.attr("gen_ai.request.model").is_some() && g.span.parent_span_id.is_empty())
            .collect();
        if let Some(r) = roots.first() {
            break r.clone();
        }
        assert!(Instant::now() < deadline, "the untraced request's span never arrived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let spans = collector.wait_for(&own.span.trace_id, 1 + 1 + 3).await;
    assert_eq!(spans.len(), 5);

    // Only IndexRelay's spans: the exporter's gRPC client (tonic, h2, hyper) is not traced.
    let names: BTreeSet<String> = collector
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|g| g.span.name.clone())
        .collect();
    let ours: BTreeSet<String> = [
        "text_completion glm_pattern",
        "dispatch micro-batch",
        "stage 0 forward",
        "stage 1 forward",
        "stage 2 forward",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, ours);
}
