//! The OpenAI-compatible HTTP front end against a real cluster: same answers as gRPC and the
//! single-process engine, OpenAI's echo/logprobs and streaming shapes, OpenAI-shaped errors,
//! metrics, health, and cancellation when a streaming client goes away.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_stream::StreamExt;
use worker::{Engine, EngineOptions, GenerationOutput, GenerationRequest, Model, SamplingParams};

use super::cluster::{fixture, prompt_cases, Cluster};

fn engine(dir: &Path, prompt: &[u32], n: usize, prompt_logprobs: bool) -> GenerationOutput {
    let mut e = Engine::new(Model::load(dir, None).unwrap(), EngineOptions::default()).unwrap();
    e.generate(vec![GenerationRequest {
        prompt: prompt.to_vec(),
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        prompt_logprobs,
        ignore_eos: true,
    }])
    .unwrap()
    .remove(0)
}

fn url(c: &Cluster, path: &str) -> String {
    format!("http://{}{path}", c.http)
}

/// POSTs JSON to the cluster's HTTP API: status and JSON body.
pub async fn post(c: &Cluster, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url(c, path))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

async fn get_text(c: &Cluster, path: &str) -> (u16, String) {
    let r = reqwest::get(url(c, path)).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The value of an unlabelled sample in a Prometheus exposition.
fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// Reads an SSE body to the end: the JSON events and whether `[DONE]` closed it.
async fn read_sse(resp: reqwest::Response) -> (Vec<Value>, bool) {
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let mut events = Vec::new();
    let mut done = false;
    for ev in body.split("\n\n").filter(|e| !e.is_empty()) {
        let data = ev
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("not an SSE data event: {ev:?}"));
        assert!(!done, "event after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).unwrap());
        }
    }
    (events, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_completions_equal_grpc_and_engine() {
    let dir = fixture("glm_pattern");
    let prompt = prompt_cases(&dir).remove(0);
    let n = 6;
    let want = engine(&dir, &prompt, n, true);
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let (_, before) = get_text(&c, "/metrics").await;

    // (f) health and the model list.
    let (status, body) = get_text(&c, "/health").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"status": "ok"}));
    let (status, body) = get_text(&c, "/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "glm_pattern");
    assert_eq!(models["data"][0]["max_model_len"], 512);

    // (a) token-id prompt, greedy: the same ids as gRPC and the engine.
    let req = json!({
        "model": "glm_pattern", "prompt": prompt, "max_tokens": n, "temperature": 0,
        "ignore_eos": true, "return_token_ids": true,
    });
    let (status, r) = post(&c, "/v1/completions", &req).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["object"], "text_completion");
    let choice = &r["choices"][0];
    let got = ids(&choice["token_ids"]);
    let grpc = c
        .generate(prompt.clone(), n, SamplingParams::default(), false)
        .await
        .unwrap();
    assert_eq!(got, grpc.tokens, "HTTP vs gRPC");
    assert_eq!(got, want.token_ids, "HTTP vs engine");
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["text"], "", "no tokenizer: no text");
    assert!(choice["logprobs"].is_null());
    assert_eq!(
        r["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": n, "total_tokens": prompt.len() + n})
    );

    // (b) echo + logprobs: prompt tokens first (the first without a logprob), then the
    // generated ones, all equal to the engine's.
    let req = json!({
        "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true,
        "echo": true, "logprobs": 1, "return_token_ids": true,
    });
    let (status, r) = post(&c, "/v1/completions", &req).await;
    assert_eq!(status, 200, "{r}");
    let choice = &r["choices"][0];
    assert_eq!(ids(&choice["prompt_token_ids"]), prompt);
    assert_eq!(ids(&choice["token_ids"]), want.token_ids);
    let lps = choice["logprobs"]["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), prompt.len() + n);
    assert_eq!(choice["logprobs"]["tokens"].as_array().unwrap().len(), prompt.len() + n);
    assert_eq!(
        choice["logprobs"]["text_offset"].as_array().unwrap().len(),
        prompt.len() + n
    );
    assert!(lps[0].is_null(), "first prompt token has no logprob");
    assert!(choice["logprobs"]["top_logprobs"][0].is_null());
    let engine_lps = want.prompt_logprobs.clone().unwrap();
    for (i, w) in engine_lps.iter().enumerate().skip(1) {
        let g = lps[i].as_f64().unwrap() as f32;
        let w = w.unwrap();
        assert!((g - w).abs() <= 1e-5, "prompt logprob {i}: {g} vs {w}");
    }
    for (i, w) in want.token_logprobs.iter().enumerate() {
        let g = lps[prompt.len() + i].as_f64().unwrap() as f32;
        assert!((g - w).abs() <= 1e-5, "token logprob {i}: {g} vs {w}");
    }
    // Pure scoring: echo with max_tokens 0.
    let req = json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 0});
    let (status, r) = post(&c, "/v1/completions", &req).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().len(),
        prompt.len()
    );
    assert_eq!(r["usage"]["completion_tokens"], 0);

    // (c) streaming: one chunk per token with the same ids, the finish reason last, [DONE].
    let req = json!({
        "prompt": [prompt.clone()], "max_tokens": n, "temperature": 0, "ignore_eos": true,
        "stream": true, "return_token_ids": true, "logprobs": 0,
        "stream_options": {"include_usage": true},
    });
    let resp = reqwest::Client::new()
        .post(url(&c, "/v1/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (events, done) = read_sse(resp).await;
    assert!(done, "stream must end with [DONE]");
    let chunks: Vec<&Value> = events
        .iter()
        .filter(|e| !e["choices"].as_array().unwrap().is_empty())
        .collect();
    let streamed: Vec<u32> = chunks.iter().flat_map(|e| ids(&e["choices"][0]["token_ids"])).collect();
    assert_eq!(streamed, want.token_ids);
    assert!(chunks.iter().all(|e| e["object"] == "text_completion"));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|e| e["choices"][0]["finish_reason"].is_null()));
    for (i, e) in chunks[..n].iter().enumerate() {
        let g = e["choices"][0]["logprobs"]["token_logprobs"][0].as_f64().unwrap() as f32;
        assert!((g - want.token_logprobs[i]).abs() <= 1e-5, "streamed logprob {i}");
    }
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], n);

    // (e) every metric is exported, and the token counters moved.
    let (status, after) = get_text(&c, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "indexrelay_time_to_first_token_seconds",
        "indexrelay_inter_token_latency_seconds",
        "indexrelay_request_duration_seconds",
        "indexrelay_request_queue_seconds",
    ] {
        assert!(after.contains(&format!("# TYPE {name} histogram")), "{name}");
        assert!(
            after.contains(&format!("{name}_bucket{{le=\"600\"}}")),
            "{name} buckets reach 600 s"
        );
        assert!(
            sample(&after, &format!("{name}_count")) > 0.0,
            "{name} observed nothing"
        );
    }
    for name in [
        "indexrelay_prompt_tokens_total",
        "indexrelay_generation_tokens_total",
        "indexrelay_request_errors_total",
        "indexrelay_relay_bytes_total",
    ] {
        assert!(after.contains(&format!("# TYPE {name} counter")), "{name}");
    }
    for name in ["indexrelay_requests_running", "indexrelay_requests_waiting"] {
        assert!(after.contains(&format!("# TYPE {name} gauge")), "{name}");
    }
    assert!(after.contains("indexrelay_request_errors_total{class=\"invalid_request\"} 0"));
    let grew = |name: &str| sample(&after, name) - sample(&before, name);
    // Four HTTP requests and one gRPC request with this prompt.
    assert!(grew("indexrelay_prompt_tokens_total") >= (5 * prompt.len()) as f64);
    assert!(grew("indexrelay_generation_tokens_total") >= (4 * n) as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_openai_json_naming_the_field() {
    let dir = fixture("glm_pattern");
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let long_prompt = vec![1u32; 500];
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"prompt": [], "max_tokens": 4}), "prompt", "at least one token"),
        (json!({"prompt": "", "max_tokens": 4}), "prompt", "empty"),
        (json!({"max_tokens": 4}), "prompt", "required"),
        (
            json!({"prompt": [[1, 2], [3]], "max_tokens": 4}),
            "prompt",
            "only one prompt",
        ),
        (json!({"prompt": "hello", "max_tokens": 4}), "prompt", "tokenizer"),
        (
            json!({"prompt": long_prompt, "max_tokens": 100}),
            "max_tokens",
            "maximum context length is 512",
        ),
        (json!({"prompt": [1], "max_tokens": 100000}), "max_tokens", "512"),
        (
            json!({"prompt": [1, 400], "max_tokens": 4}),
            "prompt",
            "vocab_size = 320",
        ),
        (json!({"prompt": [1], "temperature": -1}), "temperature", "≥ 0"),
        (json!({"prompt": [1], "top_p": 2}), "top_p", "(0, 1]"),
        (
            json!({"prompt": [1], "temperature": "hot"}),
            "temperature",
            "invalid type",
        ),
        (json!({"prompt": [1], "n": 2}), "n", "n = 1"),
        (json!({"prompt": [1], "stop": ["\n"]}), "stop", "not supported"),
        (
            json!({"messages": [{"role": "user", "content": "hi"}]}),
            "messages",
            "no chat template",
        ),
    ];
    let n_cases = cases.len();
    for (body, field, needle) in cases {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, r) = post(&c, path, &body).await;
        assert_eq!(status, 400, "{body}: {r}");
        let e = &r["error"];
        assert_eq!(e["type"], "invalid_request_error", "{r}");
        assert_eq!(e["param"], field, "{body}: {r}");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{body}: {needle} not in {r}"
        );
        assert_eq!(e["code"], 400);
    }
    // Malformed JSON: 400 in OpenAI's shape, not axum's plain text.
    let resp = reqwest::Client::new()
        .post(url(&c, "/v1/completions"))
        .header("content-type", "application/json")
        .body("{\"prompt\": [1, 2,")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let r: Value = resp.json().await.unwrap();
    assert_eq!(r["error"]["type"], "invalid_request_error");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("malformed JSON"),
        "{r}"
    );
    // Unknown model: 404, on both endpoints.
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"model": "no-such-model", "prompt": [1], "messages": [{"role": "user", "content": "x"}]});
        let (status, r) = post(&c, path, &body).await;
        assert_eq!(status, 404, "{path}: {r}");
        assert_eq!(r["error"]["param"], "model");
        assert!(r["error"]["message"].as_str().unwrap().contains("no-such-model"));
    }
    let (status, _) = get_text(&c, "/v1/no-such-route").await;
    assert_eq!(status, 404);
    // Every rejection was counted, and the cluster still serves.
    let (_, m) = get_text(&c, "/metrics").await;
    let invalid = m
        .lines()
        .find_map(|l| l.strip_prefix("indexrelay_request_errors_total{class=\"invalid_request\"} "))
        .unwrap();
    assert!(invalid.parse::<u64>().unwrap() > n_cases as u64, "{invalid}");
    let (status, r) = post(
        &c,
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 3, "return_token_ids": true}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["token_ids"].as_array().unwrap().len(), 3);

    // A stage dies mid-stream: the stream ends with an error event and [DONE]; then
    // /health and new requests answer 503.
    let req = json!({"prompt": [1, 2, 3, 4], "max_tokens": 480, "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new()
        .post(url(&c, "/v1/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut text = std::str::from_utf8(&body.next().await.unwrap().unwrap())
        .unwrap()
        .to_string();
    c.kill_worker(1);
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(15), body.next())
        .await
        .unwrap()
    {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let err: Value = serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["type"], "service_unavailable", "{err}");
    assert_eq!(err["error"]["code"], 503);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_text(&c, "/health").await.0 == 200 {
        assert!(Instant::now() < deadline, "/health still 200 with a stage down");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, r) = post(&c, "/v1/completions", &json!({"prompt": [1, 2], "max_tokens": 2})).await;
    assert_eq!(status, 503, "{r}");
    assert_eq!(r["error"]["type"], "service_unavailable");
}

/// Chat goes through the model's Jinja template; the embedded default model (which has a
/// byte-level tokenizer) gets a small one here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_render_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("chat-model");
    let mut spec = worker::embedded::SyntheticSpec::default_for(worker::Architecture::GlmMoeDsa);
    spec.max_positions = 512;
    worker::embedded::write_synthetic_model(&dir, &spec).unwrap();
    let template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'].strip() }}\n{% endfor %}\
                    {% if add_generation_prompt %}<assistant>{% endif %}";
    let cfg = json!({"chat_template": template, "bos_token": "<bos>", "eos_token": "<eos>"});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let messages = json!([{"role": "user", "content": [{"type": "text", "text": "  Hi there "}]}]);
    let req = json!({"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (status, chat) = post(&c, "/v1/chat/completions", &req).await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    // The same as a completion of the rendered text (the tokenizer adds BOS itself).
    let req = json!({"prompt": "<user>Hi there\n<assistant>", "max_tokens": 5, "temperature": 0, "ignore_eos": true});
    let (status, plain) = post(&c, "/v1/completions", &req).await;
    assert_eq!(status, 200, "{plain}");
    assert_eq!(chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
    assert_eq!(chat["usage"], plain["usage"]);
    // Streaming: role first, content deltas, finish reason, [DONE].
    let req = json!({"messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new()
        .post(url(&c, "/v1/chat/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (events, done) = read_sse(resp).await;
    assert!(done);
    assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk"));
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, chat["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["choices"][0]["finish_reason"], "length");
    // Bad messages are the client's problem: 400 naming `messages`.
    let (status, r) = post(&c, "/v1/chat/completions", &json!({"messages": []})).await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["error"]["param"], "messages");
}

/// A streaming client that goes away cancels its sequence: the scheduler stops running it
/// long before it could have finished on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_stream_disconnect_cancels_the_sequence() {
    // The embedded default shape (8192 positions), so a request can run for seconds.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("long-model");
    let spec = worker::embedded::SyntheticSpec::default_for(worker::Architecture::DeepseekV32);
    worker::embedded::write_synthetic_model(&dir, &spec).unwrap();
    let c = Cluster::start(&dir, 2, &[], &[]).await;
    let total = 8000;
    let req = json!({"prompt": [1, 2, 3], "max_tokens": total, "temperature": 0, "ignore_eos": true, "stream": true});
    let resp = reqwest::Client::new()
        .post(url(&c, "/v1/completions"))
        .json(&req)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    // Measure the decode rate for a moment, to know how long finishing would take.
    body.next().await.unwrap().unwrap();
    let t0 = Instant::now();
    let mut streamed = 0usize;
    while t0.elapsed() < Duration::from_millis(300) {
        let chunk = body.next().await.unwrap().unwrap();
        streamed += std::str::from_utf8(&chunk).unwrap().matches("data: ").count();
    }
    let per_token = t0.elapsed() / streamed.max(1) as u32;
    let remaining = per_token * (total - streamed - 1) as u32;
    assert!(
        remaining > Duration::from_secs(2),
        "decoding too fast for this test: {per_token:?} per token"
    );
    drop(body);
    let dropped = Instant::now();
    loop {
        let (_, m) = get_text(&c, "/metrics").await;
        if sample(&m, "indexrelay_requests_running") == 0.0 {
            break;
        }
        assert!(
            dropped.elapsed() < remaining / 2,
            "the sequence still runs {:?} after the client left (it would finish in {remaining:?})",
            dropped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The cluster serves the next request normally.
    let (status, r) = post(&c, "/v1/completions", &json!({"prompt": [1, 2], "max_tokens": 2})).await;
    assert_eq!(status, 200, "{r}");
}
