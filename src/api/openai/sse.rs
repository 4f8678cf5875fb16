//! Server-Sent Events, framed in one place: `data: <payload>\n\n`, the OpenAI end marker `[DONE]`,
//! and the HTTP response (axum's [`Sse`]) that streams payloads. The queue's raw OpenAI output
//! (`RAW_OPENAI_OUTPUT=1`) is SSE text written by [`frame`]; [`payloads`] reads it back for HTTP.

use std::convert::Infallible;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};

/// The payload of OpenAI's last event.
pub(crate) const DONE: &str = "[DONE]";

/// The event name of a payload: the Responses and Anthropic Messages streams name each event after
/// its `type`, which their payloads carry as their first field (`{"type":"message_start",...}`);
/// OpenAI's chunks open with another field and go unnamed.
pub(crate) fn event_name(payload: &str) -> Option<&str> {
    let rest = payload.strip_prefix("{\"type\":\"")?;
    let name = &rest[..rest.find('"')?];
    (!name.is_empty() && !name.contains('\\')).then_some(name)
}

/// One event as SSE text (with an `event:` line when the payload names one).
pub(crate) fn frame(payload: &str) -> String {
    match event_name(payload) {
        Some(name) => format!("event: {name}\ndata: {payload}\n\n"),
        None => format!("data: {payload}\n\n"),
    }
}

/// The payloads of SSE text written by [`frame`].
pub(crate) fn payloads(text: &str) -> impl Iterator<Item = &str> {
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            let event = match event.strip_prefix("event: ") {
                Some(named) => named.split_once('\n').map_or("", |(_, rest)| rest),
                None => event,
            };
            event.strip_prefix("data: ").unwrap_or(event)
        })
}

/// A `text/event-stream` response with one `data:` event per payload (named as [`frame`] names it).
pub(crate) fn response(payloads: impl Stream<Item = String> + Send + 'static) -> Response {
    let events = payloads.map(|payload| {
        let event = match event_name(&payload) {
            Some(name) => Event::default().event(name),
            None => Event::default(),
        };
        Ok::<_, Infallible>(event.data(payload))
    });
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

    #[test]
    fn typed_payloads_are_named_events() {
        let start = r#"{"type":"message_start","message":{}}"#;
        let text = format!("{}{}", frame(start), frame(DONE));
        assert_eq!(
            text,
            format!("event: message_start\ndata: {start}\n\ndata: [DONE]\n\n")
        );
        assert_eq!(payloads(&text).collect::<Vec<_>>(), [start, DONE]);
        assert_eq!(event_name(r#"{"id":"x","type":"y"}"#), None);
        assert_eq!(event_name(r#"{"type":"error","error":{}}"#), Some("error"));
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
