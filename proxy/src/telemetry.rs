//! Logs and traces. Logs go to stderr, as text or structured JSON (`--log-json`), each line
//! carrying the ids of the span it was written in (`call`, `run`, `trace_id`, `tool`).
//!
//! Traces are exported over OTLP/HTTP (protobuf) when the standard OpenTelemetry variables
//! name a collector: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (a full URL) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL; `/v1/traces` is appended), with
//! `OTEL_SERVICE_NAME` (default `tollgate-proxy`) and `OTEL_EXPORTER_OTLP_HEADERS`. Each call
//! is one `call` span with child spans `limits`, `policy`, `approval` and `upstream`; the
//! agent's `traceparent` is its parent, and the `traceparent` sent upstream names the call
//! span, so the upstream's spans hang under Tollgate's in the same trace as the audit
//! record's `trace_id`. Export is batched off the request path; a collector that is down
//! costs dropped spans (counted by the SDK's own logs), never a refused call.
//!
//! The stage spans (`limits`, `policy`, `approval`, `upstream`, target [`STAGE_SPANS`]) exist
//! for traces: when nothing is exported and logging is above `debug`, no layer wants them, so
//! they are never created and their fields never formatted (a disabled span costs one
//! cached-interest check). The `call` span is always there: its ids are what every log line of
//! the call carries.

use bytes::Bytes;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// The tracer provider, when OTLP export is on (flushed by [`shutdown`]).
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether traces are exported (the call span's ids then come from OpenTelemetry).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Target of the per-stage child spans of a call (see the module docs).
pub const STAGE_SPANS: &str = "tollgate::stage";

/// Whether the environment names an OTLP traces collector.
fn otlp_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.trim().is_empty()))
}

/// Install logging (`TOLLGATE_LOG` overrides `default`, an env-filter) and, when configured,
/// OTLP trace export. Call inside the Tokio runtime: the exporter sends on it.
pub fn init(json: bool, default: &str) {
    use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Stage spans reach the log only with debug logging on (module docs). A static filter,
    // so the decision is cached per callsite.
    let debug = filter
        .max_level_hint()
        .is_none_or(|l| l >= LevelFilter::DEBUG);
    let stages = Targets::new().with_default(LevelFilter::TRACE).with_target(
        STAGE_SPANS,
        if debug {
            LevelFilter::TRACE
        } else {
            LevelFilter::OFF
        },
    );
    let filter = filter.and(stages);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    let otel = match otlp_configured().then(provider).transpose() {
        Ok(p) => p.map(|p| {
            let tracer = p.tracer("tollgate-proxy");
            let _ = PROVIDER.set(p);
            // Spans are exported whatever the log filter says: the filter is for stderr.
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        }),
        Err(e) => {
            eprintln!("OTLP trace export is off: {e}");
            None
        }
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
}

fn provider() -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = Client {
        rt: tokio::runtime::Handle::try_current()
            .map_err(|_| "no Tokio runtime to send on".to_string())?,
        upstreams: crate::upstream::Upstreams::new(None)?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_timeout(Duration::from_secs(10))
        .with_http_client(client)
        .build()
        .map_err(|e| e.to_string())?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "tollgate-proxy".into());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Flush and stop trace export (blocking; call outside async code or on a blocking thread).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        if let Err(e) = p.shutdown() {
            eprintln!("OTLP trace export did not flush: {e}");
        }
    }
}

/// Make `span` (a call span) a child of the agent's `traceparent`, and return the
/// (`traceparent`, trace id) to send upstream and record: the call span's own ids. `None`
/// when traces are not exported (the caller keeps its own ids).
pub fn link(span: &tracing::Span, agent_headers: &http::HeaderMap) -> Option<(String, String)> {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !exporting() {
        return None;
    }
    let propagator = opentelemetry_sdk::propagation::TraceContextPropagator::new();
    let parent = propagator.extract(&opentelemetry_http::HeaderExtractor(agent_headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() {
        return None;
    }
    let trace_id = sc.trace_id().to_string();
    Some((format!("00-{trace_id}-{}-01", sc.span_id()), trace_id))
}

/// The OTLP exporter's HTTP client: Tollgate's own pooled hyper client, driven on the proxy's
/// runtime (the SDK's batch thread awaits the spawned send).
struct Client {
    rt: tokio::runtime::Handle,
    upstreams: crate::upstream::Upstreams,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("tollgate OTLP client")
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let upstreams = self.upstreams.clone();
        let send = async move {
            let req = request.map(http_body_util::Full::new);
            let t = Duration::from_secs(10);
            let res = upstreams.send(req, t, t).await.map_err(|e| e.to_string())?;
            let (parts, body) = res.into_parts();
            let limited = http_body_util::Limited::new(body, 1 << 20);
            let bytes = tokio::time::timeout(t, limited.collect())
                .await
                .map_err(|_| "collector response timed out".to_string())?
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(http::Response::from_parts(parts, bytes))
        };
        match self.rt.spawn(send).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(e.to_string().into()),
        }
    }
}
