use super::*;
use crate::target::{normalise_path, Via};

fn target(host: &str, port: u16, method: &str, path: &str) -> Target {
    Target {
        scheme: Scheme::Https,
        host: host.into(),
        port,
        method: method.parse().unwrap(),
        path: normalise_path(path).unwrap(),
        query: None,
        via: Via::ForwardProxy,
    }
}

fn rule(tool: usize, host: &str, methods: &[&str], path: Option<&str>) -> MatchRule {
    let (host, port) = parse_host_pattern(host).unwrap();
    MatchRule {
        tool,
        host,
        port,
        scheme: None,
        methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
        path: path.map(|p| PathTemplate::parse(p).unwrap()),
        mcp_tool: None,
        path_case_insensitive: false,
        path_params: false,
    }
}

fn catalog() -> Catalog {
    Catalog::new(vec![
        rule(0, "api.stripe.com", &["POST"], Some("/v1/refunds")),
        rule(1, "api.stripe.com", &["GET"], Some("/v1/charges/{id}")),
        rule(2, "api.stripe.com", &["GET"], Some("/v1/charges/search")),
        rule(3, "*.zendesk.com", &["POST"], Some("/api/v2/tickets")),
        rule(4, "localhost:8080", &[], Some("/files/{*rest}")),
    ])
}

#[test]
fn matches_by_host_method_and_template() {
    let c = catalog();
    assert_eq!(
        c.match_target(&target("api.stripe.com", 443, "POST", "/v1/refunds")),
        RouteMatch::Tool(0)
    );
    assert_eq!(
        c.match_target(&target("api.stripe.com", 443, "GET", "/v1/charges/ch_1")),
        RouteMatch::Tool(1)
    );
    assert_eq!(
        c.match_target(&target("api.stripe.com", 443, "GET", "/v1/charges/search")),
        RouteMatch::Tool(2)
    );
    assert_eq!(
        c.match_target(&target("acme.zendesk.com", 443, "POST", "/api/v2/tickets")),
        RouteMatch::Tool(3)
    );
    assert_eq!(
        c.match_target(&target(
            "eu.acme.zendesk.com",
            443,
            "POST",
            "/api/v2/tickets"
        )),
        RouteMatch::Tool(3)
    );
    assert_eq!(
        c.match_target(&target("localhost", 8080, "PUT", "/files/a/b")),
        RouteMatch::Tool(4)
    );
}

#[test]
fn refuses_what_does_not_match() {
    let c = catalog();
    for (host, port, method, path) in [
        ("api.stripe.com", 443, "GET", "/v1/refunds"),
        ("api.stripe.com", 8443, "POST", "/v1/refunds"),
        ("api.stripe.com", 443, "POST", "/v1/refunds/"),
        ("api.stripe.com", 443, "POST", "/v1/refunds/extra"),
        ("api.stripe.com", 443, "GET", "/v1/charges/ch_1/refunds"),
        ("api.stripe.com", 443, "GET", "/v1/charges"),
        ("zendesk.com", 443, "POST", "/api/v2/tickets"),
        ("evilzendesk.com", 443, "POST", "/api/v2/tickets"),
        ("api.stripe.com.evil.com", 443, "POST", "/v1/refunds"),
        ("localhost", 80, "GET", "/files/a"),
        ("localhost", 8080, "GET", "/files"),
    ] {
        assert_eq!(
            c.match_target(&target(host, port, method, path)),
            RouteMatch::None,
            "{host}:{port} {method} {path}"
        );
    }
}

#[test]
fn templates_reject_bad_syntax() {
    for t in ["v1", "/v1/{", "/v1/{*a}/b", "/v1/x{id}", "/v1/{}"] {
        assert!(PathTemplate::parse(t).is_err(), "{t}");
    }
    assert!(parse_host_pattern("api.stripe.com:notaport").is_err());
}

#[test]
fn host_known_respects_ports() {
    let c = catalog();
    assert!(c.host_known("api.stripe.com", 443, Scheme::Https));
    assert!(!c.host_known("api.stripe.com", 444, Scheme::Https));
    assert!(c.host_known("x.zendesk.com", 443, Scheme::Https));
    assert!(!c.host_known("example.com", 443, Scheme::Https));
}

#[test]
fn case_insensitive_matching_is_opt_in() {
    let mut r = rule(0, "api.example.com", &["POST"], Some("/v1/refunds/{id}"));
    let t = |p: &str| Target {
        scheme: Scheme::Https,
        host: "api.example.com".into(),
        port: 443,
        method: http::Method::POST,
        path: p.into(),
        query: None,
        via: crate::target::Via::ForwardProxy,
    };
    let c = Catalog::new(vec![r.clone()]);
    assert_eq!(c.match_target(&t("/V1/Refunds/re_1")), RouteMatch::None);
    r.path_case_insensitive = true;
    let c = Catalog::new(vec![r]);
    assert_eq!(c.match_target(&t("/V1/Refunds/re_1")), RouteMatch::Tool(0));
    assert_eq!(c.match_target(&t("/v1/refunds/re_1")), RouteMatch::Tool(0));
    assert_eq!(c.match_target(&t("/v1/refundsx/re_1")), RouteMatch::None);
}

#[test]
fn path_parameters_are_stripped_for_matching_only_when_opted_in() {
    let mut r = rule(0, "api.example.com", &["GET"], Some("/v1/charges/list"));
    let t = Target {
        scheme: Scheme::Https,
        host: "api.example.com".into(),
        port: 443,
        method: http::Method::GET,
        path: "/v1/charges;jsessionid=1/list".into(),
        query: None,
        via: crate::target::Via::ForwardProxy,
    };
    assert_eq!(
        Catalog::new(vec![r.clone()]).match_target(&t),
        RouteMatch::None
    );
    r.path_params = true;
    assert_eq!(Catalog::new(vec![r]).match_target(&t), RouteMatch::Tool(0));
}
