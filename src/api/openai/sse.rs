//! Server-Sent Events, framed in one place: `data: <payload>\n\n`, the OpenAI end marker `[DONE]`,
//! and the HTTP response (axum's [`Sse`]) that streams payloads. The queue's raw OpenAI output
//! (`RAW_OPENAI_OUTPUT=1`) is SSE text written by [`frame`]; [`payloads`] reads it back for HTTP.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

/// The payload of OpenAI's last event.
pub(crate) const DONE: &str = "[DONE]";

/// One event as SSE text.
pub(crate) fn frame(payload: &str) -> String {
    format!("data: {payload}\n\n")
}

/// The payloads of SSE text written by [`frame`].
pub(crate) fn payloads(text: &str) -> impl Iterator<Item = &str> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| event.strip_prefix("data: ").unwrap_or(event))
}

/// A `text/event-stream` response with one `data:` event per payload.
pub(crate) fn response(payloads: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = payloads.map(|payload| Ok::<_, Infallible>(Event::default().data(payload)));
    Sse::new(events).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back() {
        let text = format!("{}{}", frame("{\"a\":1}"), frame(DONE));
        assert_eq!(text, "data: {\"a\":1}\n\ndata: [DONE]\n\n");
        assert_eq!(payloads(&text).collect::<Vec<_>>(), ["{\"a\":1}", DONE]);
    }

    #[tokio::test]
    async fn responses_are_event_streams() {
        let r = response(futures::stream::iter(vec!["x".to_string(), DONE.into()]));
        assert_eq!(
            r.headers()[axum::http::header::CONTENT_TYPE],
            "text/event-stream"
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        assert_eq!(&body[..], b"data: x\n\ndata: [DONE]\n\n");
    }
}
