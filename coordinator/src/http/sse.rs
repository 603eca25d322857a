//! Server-sent events: the body stream both streaming endpoints use, and the pieces of
//! text they share.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio_stream::Stream;
use worker::tokenizer::TextTokenizer;

use super::errors::{dropped, ApiError};
use super::request::{decode, Envelope};
use crate::app::Detokenizer;
use crate::metrics::RequestTracker;
use crate::scheduler::{Event, FinishReason};

/// The stream's last event.
const SSE_DONE: &str = "data: [DONE]\n\n";

/// One `data:` event.
pub(super) fn sse_data(v: &Value) -> String {
    format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default())
}

/// An error after the stream started: the status line is gone, so it is an event.
fn sse_error(e: ApiError) -> String {
    format!("{}{SSE_DONE}", sse_data(&e.body()))
}

/// The generated text of a stream, delta by delta.
pub(super) struct StreamText {
    tok: Option<Arc<TextTokenizer>>,
    detok: Detokenizer,
    generated: Vec<u32>,
}

impl StreamText {
    /// Text of a stream decoded with `tok`.
    pub(super) fn new(tok: Option<Arc<TextTokenizer>>) -> Self {
        StreamText {
            detok: Detokenizer::new(tok.clone()),
            tok,
            generated: Vec::new(),
        }
    }

    /// The tokenizer.
    pub(super) fn tokenizer(&self) -> Option<&TextTokenizer> {
        self.tok.as_deref()
    }

    /// Adds a generated token; returns the new text (possibly none yet).
    pub(super) fn push(&mut self, id: u32) -> String {
        self.generated.push(id);
        self.detok.push(&[id])
    }

    /// Text the detokenizer held back (an incomplete character at the very end).
    pub(super) fn rest(&self) -> String {
        let full = decode(self.tok.as_deref(), &self.generated);
        full.strip_prefix(self.detok.text()).unwrap_or_default().to_string()
    }
}

/// One endpoint's chunks; the framing every stream shares (usage chunk, `[DONE]`, errors)
/// is written by [`SseStream`].
pub(super) trait SseSource: Send + Unpin + 'static {
    /// The envelope of every chunk.
    fn envelope(&self) -> &Envelope;
    /// Text sent before the first event.
    fn start(&mut self) -> String;
    /// Text for the prompt's logprobs.
    fn prompt_logprobs(&mut self, lps: Vec<Option<f32>>) -> String;
    /// Text for one generated token.
    fn token(&mut self, id: u32, logprob: f32) -> String;
    /// The last chunk, carrying the finish reason.
    fn finish(&mut self, reason: FinishReason) -> String;
}

/// The body stream. Owning the [`RequestTracker`] is what makes disconnects cancel: hyper
/// drops the body when the client goes away, and with it the scheduler receiver.
struct SseStream<S> {
    src: S,
    events: RequestTracker,
    include_usage: bool,
    started: bool,
    done: bool,
}

impl<S: SseSource> SseStream<S> {
    /// Text for one event, and whether it ended the stream.
    fn on_event(&mut self, ev: Event) -> (String, bool) {
        match ev {
            Event::PromptLogprobs(l) => (self.src.prompt_logprobs(l), false),
            Event::Token { id, logprob } => (self.src.token(id, logprob), false),
            Event::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut out = self.src.finish(reason);
                if self.include_usage {
                    let usage = self
                        .src
                        .envelope()
                        .with_usage(json!([]), prompt_tokens, completion_tokens);
                    out.push_str(&sse_data(&usage));
                }
                out.push_str(SSE_DONE);
                (out, true)
            }
            Event::Failed(e) => (sse_error(e.into()), true),
        }
    }
}

impl<S: SseSource> Stream for SseStream<S> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.started {
            this.started = true;
            let s = this.src.start();
            if !s.is_empty() {
                return Poll::Ready(Some(Ok(Bytes::from(s))));
            }
        }
        loop {
            match std::task::ready!(Pin::new(&mut this.events).poll_next(cx)) {
                Some(ev) => {
                    let (s, end) = this.on_event(ev);
                    this.done = end;
                    if !s.is_empty() {
                        return Poll::Ready(Some(Ok(Bytes::from(s))));
                    }
                    if end {
                        return Poll::Ready(None);
                    }
                }
                None => {
                    this.done = true;
                    return Poll::Ready(Some(Ok(Bytes::from(sse_error(dropped())))));
                }
            }
        }
    }
}

/// The streaming response for `events`, written by `src`, ending with a usage chunk when
/// the client asked for it (`stream_options.include_usage`).
pub(super) fn sse<S: SseSource>(src: S, events: RequestTracker, include_usage: bool) -> Response {
    let stream = SseStream {
        src,
        events,
        include_usage,
        started: false,
        done: false,
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}
