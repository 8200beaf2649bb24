//! The body of a forwarded response as the agent receives it: passed through chunk by chunk
//! (nothing held back), read for LLM usage on the side, and bounded by the tool's total and
//! idle timeouts.
//!
//! A stream never ends silently short. Cut by a timeout or an upstream error, an SSE stream
//! that is not content-encoded ends with an `event: error` whose data carries an `error`
//! object (the OpenAI and Anthropic SDKs both raise it with its message); any other body is
//! aborted, so the client's HTTP library sees an incomplete body rather than a complete one.
//! Either way the end is reported once, with what was delivered, to the pipeline's exit
//! (`pipeline::finish::body_ended`), for the outcome record and the budget settlement.
//!
//! A kill switch that engages while the body streams cuts it the same way ([`Cut::Killed`]);
//! the error event then carries the 503 `killed` refusal in the call's provider envelope
//! when the pipeline gave one ([`ResponseStream::killed_by`]), so the provider's SDK raises
//! its own error type with Tollgate's reason.

use crate::killswitch::inflight::{KillSignal, Killed};
use crate::meter::{Scanned, UsageScanner};
use crate::snapshot::Tool;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// How a response body was cut short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cut {
    /// `timeouts.total` passed.
    Total(Duration),
    /// No body data for `timeouts.idle`.
    Idle(Duration),
    /// The upstream connection failed mid-body.
    Upstream(String),
    /// The agent went away before the end.
    ClientGone,
    /// A kill switch covering the call engaged.
    Killed(Killed),
}

impl Cut {
    /// Label recorded in the audit record and metrics.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Cut::Total(_) => "total_timeout",
            Cut::Idle(_) => "idle_timeout",
            Cut::Upstream(_) => "upstream_error",
            Cut::ClientGone => "client_gone",
            Cut::Killed(_) => "killed",
        }
    }

    /// Human-readable reason, for the record and the client.
    pub(crate) fn reason(&self) -> String {
        match self {
            Cut::Total(d) => format!(
                "the response was cut after {}s: the tool's total timeout (timeouts.total) passed; the answer is incomplete",
                d.as_secs_f64()
            ),
            Cut::Idle(d) => format!(
                "the response was cut: the upstream sent nothing for {}s (timeouts.idle); the answer is incomplete",
                d.as_secs_f64()
            ),
            Cut::Upstream(e) => {
                format!("the upstream failed mid-response ({e}); the answer is incomplete")
            }
            Cut::ClientGone => "the client closed the response before its end".into(),
            Cut::Killed(k) => format!(
                "the response was cut: kill switch {} engaged ({}); the answer is incomplete",
                k.name, k.reason
            ),
        }
    }
}

/// How a response body ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BodyEnd {
    /// Usage reported and text delivered (when scanned).
    pub scanned: Scanned,
    /// Why it ended early, if it did.
    pub cut: Option<Cut>,
    /// Body bytes delivered.
    pub bytes: u64,
}

/// Called once when a response body ends, is cut, or is dropped.
pub(crate) type OnEnd = Box<dyn FnOnce(BodyEnd) + Send + Sync>;

/// Timeouts of a response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BodyTimeouts {
    /// From the start of the body to its end.
    pub total: Duration,
    /// Longest pause between two frames.
    pub idle: Duration,
}

impl BodyTimeouts {
    /// A tool's timeouts (the default total for both, for calls no tool decides).
    pub(crate) fn of(tool: Option<&Tool>) -> Self {
        match tool {
            Some(t) => Self {
                total: t.total_timeout,
                idle: t.idle_timeout,
            },
            None => Self {
                total: crate::snapshot::DEFAULT_TIMEOUTS.2,
                idle: crate::snapshot::DEFAULT_TIMEOUTS.2,
            },
        }
    }
}

/// A cut body that has no in-band way to say so.
#[derive(Debug, thiserror::Error)]
#[error("response aborted by Tollgate: {0}")]
pub(crate) struct Aborted(String);

/// Renders the `data` of the error event a killed SSE stream ends with (the refusal in the
/// call's provider envelope).
pub(crate) type KillEvent = Box<dyn Fn(&Killed) -> serde_json::Value + Send + Sync>;

use crate::body::BoxError;

pin_project_lite::pin_project! {
    /// A forwarded response body; see the module docs.
    pub struct ResponseStream<B> {
        #[pin]
        inner: B,
        #[pin]
        deadline: Sleep,
        #[pin]
        idle: Sleep,
        #[pin]
        kill: Option<tokio_util::sync::WaitForCancellationFutureOwned>,
        signal: Option<KillSignal>,
        kill_event: Option<KillEvent>,
        timeouts: BodyTimeouts,
        scanner: Option<UsageScanner>,
        // SSE not content-encoded: a cut can be told in band.
        sse_error: bool,
        // Last two bytes delivered, to end an SSE event before the error event.
        tail: [u8; 2],
        bytes: u64,
        // The last byte of a body of known length passed.
        whole: bool,
        done: Option<OnEnd>,
        ended: bool,
    }

    impl<B> PinnedDrop for ResponseStream<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                let scanned = this.scanner.take().map(UsageScanner::finish).unwrap_or_default();
                // hyper stops polling a body of known length at its last byte, and a client
                // may close once the terminal event passed: neither is a cut.
                let whole = *this.whole || scanned.complete;
                done(BodyEnd {
                    scanned,
                    cut: (!whole).then_some(Cut::ClientGone),
                    bytes: *this.bytes,
                });
            }
        }
    }
}

impl<B: Body> ResponseStream<B> {
    /// Wrap the body of a response with these headers. `scan` reads LLM usage from it.
    pub(crate) fn new(
        inner: B,
        headers: &http::HeaderMap,
        timeouts: BodyTimeouts,
        scan: bool,
        done: OnEnd,
    ) -> Self {
        let now = Instant::now();
        // A body known empty (HEAD, 204, 304) may be dropped unpolled: not a cut.
        let whole = inner.is_end_stream();
        let sse = crate::meter::is_sse(headers);
        let encoded = headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
        Self {
            inner,
            deadline: tokio::time::sleep_until(now + timeouts.total),
            idle: tokio::time::sleep_until(now + timeouts.idle),
            kill: None,
            signal: None,
            kill_event: None,
            timeouts,
            scanner: scan.then(|| UsageScanner::for_response(headers)),
            sse_error: sse && !encoded,
            tail: *b"\n\n",
            bytes: 0,
            whole,
            done: Some(done),
            ended: false,
        }
    }
}

impl<B> ResponseStream<B> {
    /// Whether a cut SSE stream may end with an in-band `event: error` (LLM and plain HTTP
    /// streams); MCP streams carry only JSON-RPC, so a cut one is aborted instead.
    pub(crate) fn in_band_errors(mut self, yes: bool) -> Self {
        self.sse_error &= yes;
        self
    }

    /// Cut the body when `signal` fires (a kill switch engaged). `event` renders the error
    /// event's data for an SSE body; without it the event has Tollgate's cut shape.
    pub(crate) fn killed_by(mut self, signal: KillSignal, event: Option<KillEvent>) -> Self {
        self.kill = Some(signal.fired_owned());
        self.signal = Some(signal);
        self.kill_event = event;
        self
    }
}

/// Count a cut in `tollgate_upstream_errors_total{kind="stream_*"}` (a client going away is
/// not an upstream failure and is not counted).
pub(crate) fn count_cut(metrics: &crate::metrics::Metrics, cut: &Cut) {
    let kind = match cut {
        Cut::Total(_) => "stream_total_timeout",
        Cut::Idle(_) => "stream_idle_timeout",
        Cut::Upstream(_) => "stream_upstream_error",
        Cut::ClientGone => return,
        Cut::Killed(_) => {
            metrics
                .calls_aborted
                .with_label_values(&["killed", "stream"])
                .inc();
            return;
        }
    };
    metrics.upstream_errors.with_label_values(&[kind]).inc();
}

/// The SSE event a cut stream ends with: `error.message` for the SDKs, Tollgate's fields
/// beside it (or `data` as given: a killed call's refusal in its provider envelope).
fn error_event(cut: &Cut, tail: [u8; 2], data: Option<serde_json::Value>) -> Bytes {
    let data = data.unwrap_or_else(|| {
        serde_json::json!({
            "type": "error",
            "error": {
                "type": "tollgate_stream_cut",
                "code": cut.label(),
                "message": format!("Tollgate: {}", cut.reason()),
                "tollgate": {"error": "stream_cut", "cut": cut.label(), "reason": cut.reason()},
            }
        })
    });
    let lead = match tail {
        [_, b'\n'] if tail[0] == b'\n' => "",
        [_, b'\n'] => "\n",
        _ => "\n\n",
    };
    Bytes::from(format!("{lead}event: error\ndata: {data}\n\n"))
}

impl<B> ResponseStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    fn end(self: Pin<&mut Self>, cut: Option<Cut>) -> Option<Result<Frame<Bytes>, BoxError>> {
        let this = self.project();
        *this.ended = true;
        let scanned = this
            .scanner
            .take()
            .map(UsageScanner::finish)
            .unwrap_or_default();
        if let Some(done) = this.done.take() {
            done(BodyEnd {
                scanned,
                cut: cut.clone(),
                bytes: *this.bytes,
            });
        }
        let cut = cut?;
        tracing::warn!(cut = cut.label(), reason = %cut.reason(), "response stream cut");
        if *this.sse_error {
            let data = match (&cut, this.kill_event.as_ref()) {
                (Cut::Killed(k), Some(render)) => Some(render(k)),
                _ => None,
            };
            Some(Ok(Frame::data(error_event(&cut, *this.tail, data))))
        } else {
            let e: BoxError = Box::new(Aborted(cut.reason()));
            Some(Err(e))
        }
    }
}

impl<B> Body for ResponseStream<B>
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let mut this = self.as_mut().project();
        // The kill switch first: a fast stream must not outrun it.
        if let Some(kill) = this.kill.as_mut().as_pin_mut() {
            if kill.poll(cx).is_ready() {
                let why = this
                    .signal
                    .as_ref()
                    .and_then(|s| s.killed().cloned())
                    .unwrap_or_else(|| Killed {
                        name: String::new(),
                        reason: String::new(),
                    });
                return Poll::Ready(self.end(Some(Cut::Killed(why))));
            }
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let idle = this.timeouts.idle;
                this.idle.as_mut().reset(Instant::now() + idle);
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                    if let Some(s) = this.scanner.as_mut() {
                        s.feed(d);
                    }
                    match d.len() {
                        0 => {}
                        1 => *this.tail = [this.tail[1], d[0]],
                        n => *this.tail = [d[n - 2], d[n - 1]],
                    }
                }
                *this.whole |= this.inner.is_end_stream();
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                let cut = Cut::Upstream(e.to_string());
                return Poll::Ready(self.end(Some(cut)));
            }
            Poll::Ready(None) => return Poll::Ready(self.end(None)),
            Poll::Pending => {}
        }
        let cut = if this.deadline.poll(cx).is_ready() {
            Cut::Total(this.timeouts.total)
        } else if this.idle.poll(cx).is_ready() {
            Cut::Idle(this.timeouts.idle)
        } else {
            return Poll::Pending;
        };
        Poll::Ready(self.end(Some(cut)))
    }

    fn is_end_stream(&self) -> bool {
        // Polled to its end even when empty, so the end is reported as such.
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        if !self.sse_error {
            return self.inner.size_hint();
        }
        // A cut may add an error event: promise no exact length.
        let mut h = SizeHint::new();
        h.set_lower(self.inner.size_hint().lower());
        h
    }
}

#[cfg(test)]
mod tests;
