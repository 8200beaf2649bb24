//! A slow upstream on loopback, as raw TCP so that it sees exactly when the proxy drops its
//! connection (a read returning EOF, or a write failing), and a client that reads its
//! response as it arrives. Used by the in-flight kill-switch test and the propagation bench.

use crate::harness::eventually;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One upstream request, by the tag its body carries.
#[derive(Clone, Debug, Default)]
pub struct Served {
    /// The `tag-…` marker in its body.
    pub tag: String,
    /// Request path.
    pub path: String,
    /// Data chunks written.
    pub chunks: usize,
    /// The proxy closed the connection before the response ended.
    pub dropped: bool,
    /// The response ended normally.
    pub completed: bool,
}

/// A slow upstream: `/v1/chat/completions` streams OpenAI chunks every 50 ms until
/// `release` is set (then usage, `[DONE]` and the end), `/slow` never answers, `/fast`
/// answers at once.
pub struct SlowUpstream {
    /// Address.
    pub addr: SocketAddr,
    /// Requests served.
    pub served: Arc<Mutex<Vec<Served>>>,
    /// Set to end every stream normally.
    pub release: Arc<AtomicBool>,
    _rt: tokio::runtime::Runtime,
}

impl SlowUpstream {
    /// Start on a free loopback port.
    pub fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let served: Arc<Mutex<Vec<Served>>> = Arc::default();
        let release = Arc::new(AtomicBool::new(false));
        let (s2, r2) = (served.clone(), release.clone());
        rt.spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(serve(sock, s2.clone(), r2.clone()));
            }
        });
        Self {
            addr,
            served,
            release,
            _rt: rt,
        }
    }

    /// The request tagged `tag`, if seen.
    pub fn get(&self, tag: &str) -> Option<Served> {
        self.served
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.tag == tag)
            .cloned()
    }
}

/// Read one request head and body (content-length framed, as the proxy sends JSON).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = sock.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let path = head.split_whitespace().nth(1)?.to_string();
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return Some((path, body));
        }
        let n = sock.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

async fn serve(
    mut sock: tokio::net::TcpStream,
    served: Arc<Mutex<Vec<Served>>>,
    release: Arc<AtomicBool>,
) {
    let Some((path, body)) = read_request(&mut sock).await else {
        return;
    };
    let tag = body
        .split("tag-")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .map(|t| format!("tag-{t}"))
        .unwrap_or_default();
    let i = {
        let mut s = served.lock().unwrap();
        s.push(Served {
            tag,
            path: path.clone(),
            ..Default::default()
        });
        s.len() - 1
    };
    let mark = |f: &dyn Fn(&mut Served)| f(&mut served.lock().unwrap()[i]);
    let mut eof = [0u8; 64];
    match path.as_str() {
        "/fast" => {
            let b = r#"{"ok":true}"#;
            let _ = sock
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}", b.len()).as_bytes())
                .await;
            mark(&|s| s.completed = true);
        }
        "/slow" => {
            // Never answers; the proxy dropping the request shows as EOF.
            while let Ok(n) = sock.read(&mut eof).await {
                if n == 0 {
                    break;
                }
            }
            mark(&|s| s.dropped = true);
        }
        _ => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                mark(&|s| s.dropped = true);
                return;
            }
            loop {
                if release.load(Ordering::SeqCst) {
                    let end = [
                        chunk(r#"data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}}"#),
                        chunk("\n\ndata: [DONE]\n\n"),
                        b"0\r\n\r\n".to_vec(),
                    ]
                    .concat();
                    let ok = sock.write_all(&end).await.is_ok();
                    mark(&|s| {
                        s.completed = ok;
                        s.dropped = !ok;
                    });
                    return;
                }
                tokio::select! {
                    r = sock.read(&mut eof) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            mark(&|s| s.dropped = true);
                            return;
                        }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {
                        let c = chunk("data: {\"choices\":[{\"delta\":{\"content\":\"more words \"}}]}\n\n");
                        if sock.write_all(&c).await.is_err() {
                            mark(&|s| s.dropped = true);
                            return;
                        }
                        mark(&|s| s.chunks += 1);
                    }
                }
            }
        }
    }
}

/// A client reading its response as it arrives (on its own thread).
pub struct Client {
    /// Bytes received so far.
    pub got: Arc<Mutex<Vec<u8>>>,
    /// The connection ended.
    pub done: Arc<AtomicBool>,
}

impl Client {
    /// POST `body` (JSON) to `url` through the proxy at `proxy`, in forward-proxy form.
    pub fn post(
        proxy: SocketAddr,
        url: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> Self {
        let authority = url.split('/').nth(2).unwrap_or("").to_string();
        let body = body.to_string();
        let mut req = format!(
            "POST {url} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(&body);
        let got: Arc<Mutex<Vec<u8>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(false));
        let (g, d) = (got.clone(), done.clone());
        std::thread::spawn(move || {
            // A proxy not listening (yet) is a response that ended with nothing.
            let sent = TcpStream::connect(proxy).and_then(|mut s| {
                s.write_all(req.as_bytes())?;
                Ok(s)
            });
            let Ok(mut s) = sent else {
                d.store(true, Ordering::SeqCst);
                return;
            };
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                g.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            d.store(true, Ordering::SeqCst);
        });
        Self { got, done }
    }

    /// What arrived so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.got.lock().unwrap()).into_owned()
    }

    /// Wait for the end of the response; all of it, as text.
    pub fn wait_done(&self) -> String {
        eventually("the response ended", || self.done.load(Ordering::SeqCst));
        self.text()
    }
}
