//! The public gRPC `Generation` service and the internal `Collector` service.

use std::pin::Pin;
use std::sync::Arc;

use proto::v1::collector_server::Collector;
use proto::v1::generation_server::Generation;
use proto::v1::{self as pb, generate_request::Input};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::app::{App, Detokenizer, RawRequest};
use crate::metrics::RequestTracker;
use crate::scheduler::{Event, FinishReason, SchedulerHandle};
use crate::telemetry::RequestOrigin;

/// `Generation` over the shared [`App`].
pub struct GenerationApi {
    /// The app.
    pub app: Arc<App>,
}

type GenStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

fn raw(r: pb::GenerateRequest) -> RawRequest {
    let s = r.sampling.unwrap_or_default();
    let (text, token_ids) = match r.input {
        Some(Input::Text(t)) => (Some(t), None),
        Some(Input::TokenIds(t)) => (None, Some(t.ids)),
        None => (None, None),
    };
    RawRequest {
        model: r.model,
        text,
        token_ids,
        max_new_tokens: r.max_new_tokens as usize,
        temperature: s.temperature,
        top_p: if s.top_p == 0.0 { 1.0 } else { s.top_p },
        top_k: s.top_k as i64,
        seed: s.seed,
        prompt_logprobs: r.prompt_logprobs,
        ignore_eos: r.ignore_eos,
    }
}

#[tonic::async_trait]
impl Generation for GenerationApi {
    type GenerateStream = GenStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<GenStream>, Status> {
        let (metadata, _, req) = req.into_parts();
        // The message's request id, else `x-request-id`; `traceparent` continues the caller's trace.
        let origin = RequestOrigin::from_metadata(&metadata, "text_completion", Some(&req.request_id));
        let request_id = origin.request_id.clone();
        // The tracker records the request metrics; dropping the stream (client gone) drops
        // the scheduler receiver, which cancels the sequence.
        let (prompt, events) = RequestTracker::submit(&self.app, raw(req), &origin)
            .await
            .map_err(|e| e.to_status())?;
        let mut detok = Detokenizer::new(self.app.tokenizer.clone());
        let stream = events.map(move |ev| {
            let mut msg = pb::GenerateResponse {
                request_id: request_id.clone(),
                ..Default::default()
            };
            match ev {
                Event::PromptLogprobs(lps) => {
                    msg.prompt_logprobs = prompt
                        .iter()
                        .zip(lps)
                        .map(|(t, lp)| pb::PromptLogprob {
                            token_id: *t,
                            logprob: lp,
                        })
                        .collect();
                }
                Event::Token { id, logprob } => {
                    msg.token_ids = vec![id];
                    msg.logprobs = vec![logprob];
                    msg.text_delta = detok.push(&[id]);
                }
                Event::Finished {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    msg.finish_reason = match reason {
                        FinishReason::Length => pb::FinishReason::Length,
                        FinishReason::Stop => pb::FinishReason::Stop,
                    } as i32;
                    msg.usage = Some(pb::Usage {
                        prompt_tokens: prompt_tokens as u32,
                        completion_tokens: completion_tokens as u32,
                    });
                }
                Event::Failed(e) => return Err(e.to_status()),
            }
            Ok(msg)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _req: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Ok(Response::new(pb::ListModelsResponse {
            models: vec![pb::ModelInfo {
                id: self.app.model_name.clone(),
                max_context: self.app.max_context as u32,
                index_pattern: self.app.pattern(),
            }],
        }))
    }
}

/// Receives the last stage's reports.
pub struct CollectorApi {
    /// Where reports go.
    pub scheduler: SchedulerHandle,
}

#[tonic::async_trait]
impl Collector for CollectorApi {
    async fn report(&self, req: Request<pb::TokenReport>) -> Result<Response<pb::ReportAck>, Status> {
        self.scheduler.report(req.into_inner());
        Ok(Response::new(pb::ReportAck {}))
    }
}

/// A process-unique id for requests that came without one.
pub fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ NEXT.fetch_add(0x9e37_79b9, Ordering::Relaxed)
}
