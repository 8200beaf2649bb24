//! `bare-proxy`: the floor `load-bench` compares Tollgate with. A hyper 1 forward proxy and
//! nothing else: hyper-util's auto server (HTTP/1 and HTTP/2, as Tollgate's listener) and its
//! pooled legacy client, the request and response bodies streamed through untouched, on a
//! multi-threaded tokio runtime. No routing, no policy, no audit, no metrics.
//!
//! `bare-proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT`

use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;

#[derive(Parser, Debug)]
#[command(
    name = "bare-proxy",
    about = "a bare hyper forward proxy (benchmark floor)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Upstream `host:port`; every request goes there with its path and headers.
    #[arg(long)]
    upstream: SocketAddr,
}

type Body = BoxBody<bytes::Bytes, hyper::Error>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let authority = args.upstream.to_string();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<Incoming>| {
                let (client, authority) = (client.clone(), authority.clone());
                async move {
                    let (mut parts, body) = req.into_parts();
                    let path = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    parts.uri = format!("http://{authority}{path}").parse()?;
                    let res = client
                        .request(hyper::Request::from_parts(parts, body))
                        .await?;
                    Ok::<_, anyhow::Error>(res.map(|b| -> Body { b.boxed() }))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
