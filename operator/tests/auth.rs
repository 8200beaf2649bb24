//! Sidecar authentication rides out an API-server outage (issue 18): a token the API server
//! accepted keeps working until its `exp`, while tokens it refused, tokens never reviewed and
//! expired tokens are not let through. Runs against the in-process test API server (no real
//! one can run here), which is stopped to make the outage.

use base64::Engine;
use std::time::Duration;
use tollgate_operator::server::Authenticator;
use tollgate_operator::testapi::TestApiServer;

fn jwt(exp: u64) -> String {
    let enc = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.sig",
        enc(serde_json::json!({"alg": "RS256"})),
        enc(serde_json::json!({"sub": "system:serviceaccount:agents:billing-agent", "exp": exp}))
    )
}

#[tokio::test]
async fn reviewed_tokens_survive_an_api_outage_until_they_expire() {
    let api = tokio::task::spawn_blocking(TestApiServer::start)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let live = jwt(now + 3600);
    let expired = jwt(now.saturating_sub(10));
    let user = "system:serviceaccount:agents:billing-agent";
    api.add_token(&live, user, &["tollgate"]);
    api.add_token(&expired, user, &["tollgate"]);
    api.add_token("never-reviewed", user, &["tollgate"]);
    let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap())).unwrap();
    // Refresh zero: every check asks the API server.
    let auth = Authenticator::with_refresh(client, Duration::ZERO);
    assert_eq!(auth.review(&live).await.unwrap().as_deref(), Some(user));
    assert_eq!(auth.review(&expired).await.unwrap().as_deref(), Some(user));
    assert_eq!(
        auth.review("forged").await.unwrap(),
        None,
        "unknown token refused"
    );
    // The API server goes away.
    tokio::task::spawn_blocking(move || drop(api))
        .await
        .unwrap();
    assert_eq!(
        auth.review(&live).await.unwrap().as_deref(),
        Some(user),
        "a reviewed, unexpired token keeps working"
    );
    assert_eq!(
        auth.served_stale.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        auth.review(&expired).await.is_err(),
        "an expired token is not reused"
    );
    assert!(
        auth.review("never-reviewed").await.is_err(),
        "503, not a guess"
    );
    assert!(
        auth.review("forged").await.is_err(),
        "a refusal is never turned into access"
    );
}
