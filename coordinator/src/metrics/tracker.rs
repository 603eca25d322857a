//! The request-level metrics and the request span, recorded for both front ends: every
//! request goes through [`RequestTracker::submit`], and its events are observed as they are
//! read from the scheduler.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_stream::Stream;

use super::{global, record_error};
use crate::app::{App, RawRequest};
use crate::error::CoordinatorError;
use crate::scheduler::Event;
use crate::telemetry::{self, RequestOrigin};

/// A request's event stream that records the request-level metrics as events are read,
/// and holds the request's span (which ends when the tracker is dropped). Dropping it drops
/// the scheduler receiver, which cancels the sequence.
pub struct RequestTracker {
    rx: mpsc::UnboundedReceiver<Event>,
    submitted: Instant,
    last_token: Option<Instant>,
    prompt_len: usize,
    prompt_counted: bool,
    generated: usize,
    ended: bool,
    span: tracing::Span,
}

impl RequestTracker {
    /// Validates, tokenizes and submits `raw` in a request span continuing `origin`; a
    /// rejected request is counted as an error. Returns the prompt ids (the front ends echo
    /// and score them) and the tracked stream.
    pub async fn submit(
        app: &App,
        raw: RawRequest,
        origin: &RequestOrigin,
    ) -> Result<(Vec<u32>, RequestTracker), CoordinatorError> {
        let submitted = Instant::now();
        let span = telemetry::request_span(origin, &app.model_name);
        let res = async {
            let mut req = app.prepare(raw).await?;
            span.record("gen_ai.usage.input_tokens", req.prompt.len());
            // The stages' spans of this request's micro-batches descend from this one.
            req.trace = worker::telemetry::context_of(&span);
            let prompt = req.prompt.clone();
            let rx = app.scheduler.submit(req)?;
            Ok((prompt, rx))
        }
        .await;
        match res {
            Ok((prompt, rx)) => {
                let tracker = RequestTracker {
                    rx,
                    submitted,
                    last_token: None,
                    prompt_len: prompt.len(),
                    prompt_counted: false,
                    generated: 0,
                    ended: false,
                    span,
                };
                Ok((prompt, tracker))
            }
            Err(e) => {
                record_error(&e);
                telemetry::record_failure(&span, &e);
                Err(e)
            }
        }
    }

    /// The next event, recorded.
    pub async fn recv(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        let ev = std::task::ready!(self.rx.poll_recv(cx));
        match &ev {
            Some(e) => self.observe(e),
            None if !self.ended => {
                // The scheduler dropped the sender without a last event: it stopped.
                self.ended = true;
                let e = CoordinatorError::Internal("the scheduler dropped the request".into());
                record_error(&e);
                telemetry::record_failure(&self.span, &e);
            }
            None => {}
        }
        Poll::Ready(ev)
    }

    fn observe(&mut self, ev: &Event) {
        let m = global();
        let now = Instant::now();
        // Any event but a failure means the prefill completed (prompt logprobs and the
        // first token both come from the prefill's last chunk): count the prompt once.
        if !self.prompt_counted && !matches!(ev, Event::Failed(_)) {
            self.prompt_counted = true;
            m.prompt_tokens.fetch_add(self.prompt_len as u64, Ordering::Relaxed);
        }
        match ev {
            Event::PromptLogprobs(_) => {}
            Event::Token { .. } => {
                match self.last_token {
                    None => m.time_to_first_token.observe(now - self.submitted),
                    Some(t) => m.inter_token_latency.observe(now - t),
                }
                self.last_token = Some(now);
                self.generated += 1;
                m.generation_tokens.fetch_add(1, Ordering::Relaxed);
            }
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                m.request_duration.observe(now - self.submitted);
                self.ended = true;
                self.span.record("gen_ai.usage.output_tokens", *completion_tokens);
                self.span
                    .record("gen_ai.response.finish_reasons", format!("{reason:?}").to_lowercase());
            }
            Event::Failed(e) => {
                record_error(e);
                m.request_duration.observe(now - self.submitted);
                self.ended = true;
                self.span.record("gen_ai.usage.output_tokens", self.generated);
                telemetry::record_failure(&self.span, e);
            }
        }
    }
}

impl Stream for RequestTracker {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}
