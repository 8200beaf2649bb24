//! `tollgate-proxy demo`: a newcomer's tour with nothing else installed. It starts stand-in
//! payments and support APIs on loopback, a proxy on the embedded demo config, and drives a
//! scripted agent through allowed and refused calls, printing each decision.

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};

/// The embedded demo config (with `{payments}`/`{support}` placeholders).
pub const DEMO_CONFIG: &str = include_str!("demo/config.yaml");

/// Start a stand-in API that echoes what it received, like a permissive upstream would.
pub async fn start_stand_in(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let auth = parts
                            .headers
                            .get("authorization")
                            .map(|v| v.to_str().unwrap_or("").to_string());
                        let reply = serde_json::json!({
                            "service": name,
                            "method": parts.method.as_str(),
                            "path": parts.uri.path(),
                            "received_authorization": auth.map(|a| if a.len() > 12 { format!("{}…", &a[..12]) } else { a }),
                            "body": String::from_utf8_lossy(&body),
                        });
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(
                            reply.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One scripted call through the proxy (absolute-form, as `HTTP_PROXY` clients send).
pub async fn call(
    proxy: SocketAddr,
    method: &str,
    url: &str,
    tenant: &str,
    run: &str,
    body: Option<(&str, &str)>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let stream = TcpStream::connect(proxy).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("x-tollgate-tenant", tenant)
        .header("x-tollgate-run", run);
    let host = url.split('/').nth(2).unwrap_or("");
    b = b
        .header("host", host)
        .header("authorization", "Bearer agent-has-no-real-key");
    let payload = match body {
        Some((ct, text)) => {
            b = b.header("content-type", ct);
            Bytes::from(text.to_string())
        }
        None => Bytes::new(),
    };
    let res = sender.send_request(b.body(Full::new(payload))?).await?;
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await?.to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into()));
    Ok((status, json))
}

/// Run the demo.
pub async fn run() -> anyhow::Result<()> {
    let payments = start_stand_in("payments").await?;
    let support = start_stand_in("support").await?;
    let dir = std::env::temp_dir().join(format!("tollgate-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = DEMO_CONFIG
        .replace("{payments}", &payments.to_string())
        .replace("{support}", &support.to_string());
    let path = dir.join("tollgate.yaml");
    std::fs::write(&path, &config)?;
    // The demo's stand-in secret: the proxy injects it; the agent never sees it.
    if std::env::var_os("TOLLGATE_DEMO_STRIPE_KEY").is_none() {
        std::env::set_var(
            "TOLLGATE_DEMO_STRIPE_KEY",
            "sk_test_demo_injected_by_tollgate",
        );
    }
    let admin_token = format!("demo-admin-{:016x}", rand::random::<u64>());
    std::env::set_var("TOLLGATE_DEMO_ADMIN_TOKEN", &admin_token);
    let proxy_l = TcpListener::bind("127.0.0.1:0").await?;
    let admin_l = TcpListener::bind("127.0.0.1:0").await?;
    let running = crate::runtime::start_from_file(&path, Some(proxy_l), Some(admin_l))
        .await
        .context("starting the proxy")?;
    let proxy = running.proxy_addr;
    println!("Tollgate demo");
    println!("  proxy   http://{proxy}   (agents set HTTP_PROXY to this)");
    println!("  admin   http://{}/metrics", running.admin_addr);
    println!("  config  {}", path.display());
    println!("  audit   {}\n", dir.join("audit.jsonl").display());
    let p = format!("http://{payments}");
    let s = format!("http://{support}");
    let form = "application/x-www-form-urlencoded";
    type Step<'a> = (
        &'a str,
        &'a str,
        String,
        &'a str,
        Option<(&'a str, &'a str)>,
    );
    let steps: Vec<Step<'_>> = vec![
        (
            "Look up a charge (allowed)",
            "GET",
            format!("{p}/v1/charges/ch_123"),
            "acme_co",
            None,
        ),
        (
            "Refund $200 (allowed; the proxy injects the Stripe key)",
            "POST",
            format!("{p}/v1/refunds"),
            "acme_co",
            Some((form, "charge=ch_123&amount=200")),
        ),
        (
            "Refund for a tenant this agent does not serve",
            "POST",
            format!("{p}/v1/refunds"),
            "initech",
            Some((form, "charge=ch_123&amount=200")),
        ),
        (
            "Refund with invalid input (amount is not a number)",
            "POST",
            format!("{p}/v1/refunds"),
            "acme_co",
            Some((form, "charge=ch_123&amount=lots")),
        ),
        (
            "Refund $1,200 (over the auto-approve threshold)",
            "POST",
            format!("{p}/v1/refunds"),
            "acme_co",
            Some((form, "charge=ch_123&amount=1200")),
        ),
        (
            "Create a payout (not one of the agent's tools)",
            "POST",
            format!("{p}/v1/payouts"),
            "acme_co",
            Some((form, "amount=100")),
        ),
        (
            "Send a support macro (kill switch engaged)",
            "POST",
            format!("{s}/api/v2/tickets/42/macros"),
            "acme_co",
            Some((
                "application/json",
                r#"{"body":"Your refund is on its way"}"#,
            )),
        ),
    ];
    // Run ids are minted (and signed) by the sidecar; the demo starts one the way an
    // orchestrator holding the run key would.
    let run_id = match running.state.snapshot.load_full() {
        Some(snap) => crate::identify::mint(&snap.agent.runs),
        None => anyhow::bail!("the demo proxy has no configuration"),
    };
    let run_id = run_id.as_str();
    for (i, (title, method, url, tenant, body)) in steps.iter().enumerate() {
        let (status, json) = call(proxy, method, url, tenant, run_id, *body).await?;
        println!("{}. {title}", i + 1);
        println!("   {method} {url}  tenant={tenant}");
        if (200..300).contains(&status) {
            println!("   → {status} allowed; upstream saw: {}", json);
        } else {
            println!(
                "   → {status} {}: {}",
                json["error"].as_str().unwrap_or("?"),
                json["reason"].as_str().unwrap_or("")
            );
            if let Some(a) = json["approval"].as_str() {
                println!("     approval id: {a}");
            }
            if let Some(h) = json["hint"].as_str() {
                println!("     hint for the agent: {h}");
            }
        }
        println!();
    }
    // The approval cycle: a human approves the held refund, the identical retry goes through
    // once, and a different amount is not covered.
    println!("Approval cycle for the $1,200 refund");
    let admin = format!("http://{}", running.admin_addr);
    let (_, list) =
        super::admin_request(&admin, &admin_token, "GET", "/approvals", String::new()).await?;
    let pending = list["approvals"].as_array().cloned().unwrap_or_default();
    let id = pending
        .iter()
        .find(|a| a["state"] == "pending")
        .and_then(|a| a["id"].as_str())
        .context("no pending approval")?
        .to_string();
    println!(
        "   pending: {id}  ({})",
        pending[0]["summary"]["reasons"][0].as_str().unwrap_or("")
    );
    let (status, decided) = super::admin_request(
        &admin,
        &admin_token,
        "POST",
        &format!("/approvals/{id}/approve"),
        r#"{"reason":"customer verified"}"#.into(),
    )
    .await?;
    println!(
        "   {status}: {id} {} by {}  (tollgate-proxy approvals approve {id})",
        decided["state"].as_str().unwrap_or("?"),
        decided["approver"].as_str().unwrap_or("?")
    );
    let refund = format!("{p}/v1/refunds");
    for (title, body) in [
        ("identical retry", "charge=ch_123&amount=1200"),
        (
            "the same call again (approval is single-use)",
            "charge=ch_123&amount=1200",
        ),
        (
            "a different amount (not covered by the approval)",
            "charge=ch_123&amount=1300",
        ),
    ] {
        let (status, json) = call(
            proxy,
            "POST",
            &refund,
            "acme_co",
            run_id,
            Some((form, body)),
        )
        .await?;
        let what = if (200..300).contains(&status) {
            "allowed".to_string()
        } else {
            format!(
                "{}: {}",
                json["error"].as_str().unwrap_or("?"),
                json["reason"].as_str().unwrap_or("")
            )
        };
        println!("   {title}: {status} {what}");
    }
    println!();
    running.stop().await;
    let records = std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .count();
    println!(
        "{records} hash-chained audit records written to {}",
        dir.join("audit.jsonl").display()
    );
    Ok(())
}
