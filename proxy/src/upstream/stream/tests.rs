use super::*;
use http_body_util::{BodyExt, StreamBody};
use std::sync::{Arc, Mutex};

type Tx = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

type ChannelBody = StreamBody<tokio_stream_shim::Rx<Result<Frame<Bytes>, std::io::Error>>>;

fn channel_body() -> (Tx, ChannelBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    (tx, StreamBody::new(tokio_stream_shim::Rx(rx)))
}

/// A tiny `Stream` over an mpsc receiver (tokio-stream is not a dependency).
mod tokio_stream_shim {
    pub(crate) struct Rx<T>(pub tokio::sync::mpsc::Receiver<T>);
    impl<T> futures::Stream for Rx<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

fn headers(ct: &str, ce: Option<&str>) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("content-type", ct.parse().unwrap());
    if let Some(ce) = ce {
        h.insert("content-encoding", ce.parse().unwrap());
    }
    h
}

fn recorder() -> (Arc<Mutex<Option<BodyEnd>>>, OnEnd) {
    let slot: Arc<Mutex<Option<BodyEnd>>> = Arc::default();
    let s2 = slot.clone();
    (slot, Box::new(move |e| *s2.lock().unwrap() = Some(e)))
}

const SHORT: BodyTimeouts = BodyTimeouts {
    total: Duration::from_secs(60),
    idle: Duration::from_millis(50),
};

#[tokio::test]
async fn an_idle_sse_stream_ends_with_an_error_event_and_reports_what_it_delivered() {
    let (tx, body) = channel_body();
    let (slot, done) = recorder();
    let mut s = std::pin::pin!(ResponseStream::new(
        body,
        &headers("text/event-stream", None),
        SHORT,
        true,
        done
    ));
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello, wor\"}}]}\n\n",
    ))))
    .await
    .unwrap();
    let first = s.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: "));
    // The upstream stays silent (the sender is kept alive): the idle timeout cuts.
    let last = s.frame().await.unwrap().unwrap().into_data().unwrap();
    let text = String::from_utf8(last.to_vec()).unwrap();
    assert!(text.starts_with("event: error\ndata: {"), "{text}");
    let data: serde_json::Value = serde_json::from_str(
        text.trim_end()
            .strip_prefix("event: error\ndata: ")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(data["error"]["code"], "idle_timeout");
    assert!(data["error"]["message"]
        .as_str()
        .unwrap()
        .contains("timeouts.idle"));
    assert!(
        s.frame().await.is_none(),
        "the stream ends after the error event"
    );
    let end = slot.lock().unwrap().clone().unwrap();
    assert_eq!(end.cut, Some(Cut::Idle(Duration::from_millis(50))));
    assert_eq!(end.scanned.delivered_chars, 10);
    drop(tx);
}

#[tokio::test]
async fn a_cut_json_or_encoded_body_is_aborted_and_a_full_one_ends_cleanly() {
    for h in [
        headers("application/json", None),
        headers("text/event-stream", Some("gzip")),
    ] {
        let (tx, body) = channel_body();
        let (slot, done) = recorder();
        let mut s = std::pin::pin!(ResponseStream::new(body, &h, SHORT, false, done));
        tx.send(Ok(Frame::data(Bytes::from_static(b"{\"partial\":"))))
            .await
            .unwrap();
        s.frame().await.unwrap().unwrap();
        let err = s.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("timeouts.idle"), "{err}");
        assert_eq!(
            slot.lock().unwrap().clone().unwrap().cut.unwrap().label(),
            "idle_timeout"
        );
        drop(tx);
    }
    let (tx, body) = channel_body();
    let (slot, done) = recorder();
    let s = ResponseStream::new(body, &headers("application/json", None), SHORT, true, done);
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"{\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}",
    ))))
    .await
    .unwrap();
    drop(tx);
    let all = s.collect().await.unwrap().to_bytes();
    assert!(all.ends_with(b"}}"));
    let end = slot.lock().unwrap().clone().unwrap();
    assert_eq!(end.cut, None);
    assert_eq!(
        end.scanned.reported,
        Some(crate::meter::Tokens {
            prompt: 3,
            completion: 4
        })
    );
}

#[tokio::test]
async fn a_dropped_body_is_reported_as_client_gone() {
    let (_tx, body) = channel_body();
    let (slot, done) = recorder();
    drop(ResponseStream::new(
        body,
        &headers("text/event-stream", None),
        SHORT,
        true,
        done,
    ));
    assert_eq!(
        slot.lock().unwrap().clone().unwrap().cut,
        Some(Cut::ClientGone)
    );
}

const LONG: BodyTimeouts = BodyTimeouts {
    total: Duration::from_secs(600),
    idle: Duration::from_secs(600),
};

fn stop() -> Killed {
    Killed {
        name: "stop-acme".into(),
        reason: "INC-7".into(),
    }
}

#[tokio::test]
async fn a_kill_cuts_an_sse_stream_with_the_envelope_given_and_reports_what_it_delivered() {
    let (tx, body) = channel_body();
    let (slot, done) = recorder();
    let signal = KillSignal::default();
    let event: KillEvent =
        Box::new(|k| serde_json::json!({"error": {"code": "killed", "message": k.name}}));
    let mut s = std::pin::pin!(ResponseStream::new(
        body,
        &headers("text/event-stream", None),
        LONG,
        true,
        done
    )
    .killed_by(signal.clone(), Some(event)));
    tx.send(Ok(Frame::data(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\n",
    ))))
    .await
    .unwrap();
    s.frame().await.unwrap().unwrap();
    signal.fire(stop());
    // Data still waiting upstream does not outrun the kill.
    tx.send(Ok(Frame::data(Bytes::from_static(b"data: {}\n\n"))))
        .await
        .unwrap();
    let last = s.frame().await.unwrap().unwrap().into_data().unwrap();
    let text = String::from_utf8(last.to_vec()).unwrap();
    assert_eq!(
        text,
        "event: error\ndata: {\"error\":{\"code\":\"killed\",\"message\":\"stop-acme\"}}\n\n"
    );
    assert!(s.frame().await.is_none());
    let end = slot.lock().unwrap().clone().unwrap();
    assert_eq!(end.cut, Some(Cut::Killed(stop())));
    assert_eq!(end.scanned.delivered_chars, 5);
}

#[tokio::test]
async fn a_killed_json_body_is_aborted() {
    let (_tx, body) = channel_body();
    let (slot, done) = recorder();
    let signal = KillSignal::default();
    let mut s = std::pin::pin!(ResponseStream::new(
        body,
        &headers("application/json", None),
        LONG,
        false,
        done
    )
    .killed_by(signal.clone(), None));
    signal.fire(stop());
    let err = s.frame().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("kill switch stop-acme"), "{err}");
    assert_eq!(
        slot.lock().unwrap().clone().unwrap().cut.unwrap().label(),
        "killed"
    );
}
