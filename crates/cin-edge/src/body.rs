//! Request bodies as the upload engine reads them: every read has a deadline
//! (a peer that stops sending without closing must not hold a request, or the
//! locks it took, for ever), and every way a body can fail is named.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use bytes::Bytes;
use cin_storage::BodyError;
use futures_util::{Stream, TryStreamExt};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::Sleep;

/// A body that fails when no frame arrives for `idle`. The clock runs only while
/// the body is being read, so a handler that waits (for a lock, say) before
/// reading is not charged for it.
pub struct IdleBody<B> {
    inner: B,
    idle: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<B> IdleBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleBody {
            inner,
            idle,
            deadline: None,
        }
    }
}

/// The error an [`IdleBody`] ends with.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes arrived for {} s", .0.as_secs())]
pub struct BodyStalled(pub Duration);

impl<B> HttpBody for IdleBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.deadline = None;
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(idle))))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body's bytes, with its failures classified.
pub fn data_stream(body: Body) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    body.into_data_stream().map_err(classify)
}

/// The trailer fields a body ended with (after a chunked HTTP/1.1 body, or an
/// HTTP/2 one), once it has ended.
#[derive(Clone, Default)]
pub struct Trailers(Arc<Mutex<Option<HeaderMap>>>);

impl Trailers {
    pub fn take(&self) -> Option<HeaderMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn keep(&self, fields: HeaderMap) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(fields);
    }
}

/// [`data_stream`] that puts the body's trailer fields in `trailers` instead of
/// dropping them.
pub fn data_stream_keeping_trailers(
    body: Body,
    trailers: Trailers,
) -> impl Stream<Item = Result<Bytes, BodyError>> + Send {
    http_body_util::BodyStream::new(body)
        .map_err(classify)
        .try_filter_map(move |frame| {
            let data = match frame.into_data() {
                Ok(data) => Some(data),
                Err(frame) => {
                    if let Ok(fields) = frame.into_trailers() {
                        trailers.keep(fields);
                    }
                    None
                }
            };
            std::future::ready(Ok(data))
        })
}

/// Names what went wrong with a request body.
pub fn classify(error: axum::Error) -> BodyError {
    classify_error(&*error.into_inner())
}

/// Names what went wrong with a request body, from any error that has the
/// body's failure in its chain (a multipart field's, say).
pub fn classify_error(inner: &(dyn std::error::Error + 'static)) -> BodyError {
    if let Some(stalled) = find::<BodyStalled>(inner) {
        return BodyError::Stalled {
            idle_secs: stalled.0.as_secs(),
        };
    }
    // hyper reports broken framing (a bad chunk-size line, say) as an I/O error
    // of kind InvalidInput or InvalidData under its body error.
    let malformed = find::<hyper::Error>(inner).is_some_and(hyper::Error::is_parse)
        || find::<std::io::Error>(inner).is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        });
    if malformed {
        BodyError::Malformed(error_chain(inner))
    } else {
        BodyError::Interrupted(error_chain(inner))
    }
}

/// An error with its sources, e.g. "error reading a body from connection: invalid chunk size line".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut current = error.source();
    while let Some(e) = current {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        current = e.source();
    }
    text
}

/// The first error of type `T` in `error`'s chain.
fn find<'a, T: std::error::Error + 'static>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// When a body last moved, shared between the body and whoever waits on the
/// peer it flows to: a forwarded request's answer may take as long as its body
/// keeps flowing, but no longer than the idle time once it stops.
#[derive(Clone)]
pub struct Progress {
    started: tokio::time::Instant,
    /// Milliseconds after `started` of the last movement.
    last_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            started: tokio::time::Instant::now(),
            last_ms: Default::default(),
        }
    }
}

impl Progress {
    fn mark(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        let ms = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.started + Duration::from_millis(ms)
    }

    /// `stream`, marking progress at each item it yields.
    pub fn track<S: Stream + Send + 'static>(
        &self,
        stream: S,
    ) -> impl Stream<Item = S::Item> + Send + 'static {
        let progress = self.clone();
        futures_util::StreamExt::inspect(stream, move |_| progress.mark())
    }

    /// Resolves once nothing has moved for `idle`.
    pub async fn stalled(&self, idle: Duration) {
        loop {
            let due = self.last() + idle;
            if tokio::time::Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due).await;
        }
    }
}
