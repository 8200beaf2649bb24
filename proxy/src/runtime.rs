//! Starting and stopping a sidecar: bind listeners, open the audit log, install the first
//! snapshot, serve until asked to stop, then drain in-flight calls.

use crate::audit::AuditLog;
use crate::intercept::server::{serve_proxy, ConnLimits};
use crate::metrics::Metrics;
use crate::snapshot::{resolve, Snapshot};
use crate::state::ProxyState;
use crate::upstream::Upstreams;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running sidecar.
pub(crate) struct Running {
    /// Proxy listener address.
    pub proxy_addr: SocketAddr,
    /// Admin listener address.
    pub admin_addr: SocketAddr,
    /// Shared state.
    pub state: Arc<ProxyState>,
    /// Fire to stop.
    pub shutdown: CancellationToken,
    proxy_task: tokio::task::JoinHandle<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    /// Operator mode: the checkpoint uploader, which ends once the final checkpoint (written
    /// when the audit writer closes) is published or given up on.
    checkpoint_upload: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop accepting, finish in-flight calls, return once drained and the audit writer has
    /// written its final checkpoint.
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.proxy_task.await;
        // Records written after a response went out (a body's end, a dropped call, a run's
        // outcome) are in tasks of their own: they land before the writer closes.
        self.state.records_pending.close();
        self.state.records_pending.wait().await;
        self.state.audit.close().await;
        if let Some(upload) = self.checkpoint_upload {
            let _ = upload.await;
        }
    }
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    /// Invalid config (exit 64).
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// Listener, audit or TLS setup failed (exit 1).
    #[error("{0}")]
    Setup(String),
}

/// Start from a config file, watching it for changes.
pub(crate) async fn start_from_file(
    path: &Path,
    proxy: Option<TcpListener>,
    admin: Option<TcpListener>,
) -> Result<Running, StartError> {
    let snap = crate::reload::load_snapshot(path, 1)?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut running = start(snap, &base, proxy, admin, false).await?;
    let watcher = crate::reload::watch(
        path.to_path_buf(),
        running.state.clone(),
        Arc::new(AtomicU64::new(1)),
    )
    .map_err(|e| StartError::Setup(format!("cannot watch {}: {e}", path.display())))?;
    running._watcher = Some(watcher);
    Ok(running)
}

/// Start in operator mode: local settings from `base` (listeners, audit, limits, TLS), the
/// identity's snapshot from the operator (see [`crate::control`]). Calls are refused with 503
/// until the first snapshot arrives.
pub(crate) async fn start_operator(
    base: crate::config::Config,
    base_dir: &Path,
    args: crate::control::ControlArgs,
) -> Result<Running, StartError> {
    let audit_path = resolve(base_dir, &base.audit.path);
    let au = &base.audit;
    // In a cluster the chain is always checkpointed to the operator (issue 17): with the
    // local `audit.checkpoints` settings when given, otherwise every 60 s with the key beside
    // the audit file.
    let checkpoints = au.checkpoints.clone().unwrap_or_else(|| {
        let key = audit_path.with_file_name("audit-checkpoint.key");
        crate::config::AuditCheckpointConfig {
            path: None,
            stdout: false,
            interval: None,
            key_file: Some(key.display().to_string()),
        }
    });
    let (publish, published) = tokio::sync::mpsc::unbounded_channel();
    let audit = crate::audit::WriterOptions::from_config(
        au.stdout,
        au.max_file_bytes,
        Some(&checkpoints),
        &au.retention,
        base_dir,
    )
    .map(|mut o| {
        if let Some(sink) = &mut o.checkpoints {
            sink.publish = Some(publish);
        }
        o
    })
    .and_then(|o| AuditLog::open_with(&audit_path, o))
    .map_err(|e| StartError::Setup(format!("audit log: {e}")))?;
    let extra_ca = base
        .tls
        .extra_ca_file
        .as_deref()
        .map(|p| resolve(base_dir, p));
    let upstreams = Upstreams::new(extra_ca.as_deref()).map_err(StartError::Setup)?;
    let metrics = Arc::new(Metrics::new());
    let limits =
        crate::limits::Limits::new(&base.limits, metrics.clone()).map_err(StartError::Setup)?;
    let state = Arc::new(ProxyState::new(
        None,
        true,
        metrics,
        audit,
        upstreams,
        Arc::new(limits),
    ));
    let _ = state.control.set(args.clone());
    state
        .approvals
        .set_use_recorder(crate::control::use_recorder(
            &args,
            &state.upstreams,
            format!("{:016x}", rand::random::<u64>()),
        ));
    tokio::spawn(crate::control::report_usage(
        state.clone(),
        args.clone(),
        std::time::Duration::from_secs(5),
    ));
    tokio::spawn(crate::pins::report(
        state.clone(),
        args.clone(),
        std::time::Duration::from_secs(60),
    ));
    let mut running =
        start_with_state(state.clone(), &base.listen, &base.server, None, None).await?;
    running.checkpoint_upload = Some(tokio::spawn(crate::control::publish_checkpoints(
        state.clone(),
        args.clone(),
        crate::control::pod_name(),
        published,
    )));
    tokio::spawn(crate::control::poll(
        state,
        base,
        base_dir.to_path_buf(),
        args,
    ));
    Ok(running)
}

/// Start with a first snapshot. `tracked` enables staleness (operator mode).
pub(crate) async fn start(
    snap: Snapshot,
    base: &Path,
    proxy: Option<TcpListener>,
    admin: Option<TcpListener>,
    tracked: bool,
) -> Result<Running, StartError> {
    let audit_path = resolve(base, &snap.audit.path);
    let au = &snap.audit;
    let audit = crate::audit::WriterOptions::from_config(
        au.stdout,
        au.max_file_bytes,
        au.checkpoints.as_ref(),
        &au.retention,
        base,
    )
    .and_then(|o| AuditLog::open_with(&audit_path, o))
    .map_err(|e| StartError::Setup(format!("audit log: {e}")))?;
    let extra_ca = snap
        .server
        .extra_ca_file
        .as_deref()
        .map(|p| resolve(base, p));
    let upstreams = Upstreams::new(extra_ca.as_deref()).map_err(StartError::Setup)?;
    let metrics = Arc::new(Metrics::new());
    let limits =
        crate::limits::Limits::new(&snap.limits, metrics.clone()).map_err(StartError::Setup)?;
    let (listen, server) = (snap.server.listen.clone(), snap.server.connection.clone());
    let state = Arc::new(ProxyState::new(
        Some(Arc::new(snap)),
        tracked,
        metrics,
        audit,
        upstreams,
        Arc::new(limits),
    ));
    start_with_state(state, &listen, &server, proxy, admin).await
}

/// Start serving an existing state (used by operator mode, which may have no snapshot yet).
pub(crate) async fn start_with_state(
    state: Arc<ProxyState>,
    listen: &crate::config::ListenConfig,
    server: &crate::config::ServerConfig,
    proxy: Option<TcpListener>,
    admin: Option<TcpListener>,
) -> Result<Running, StartError> {
    let bind = |addr: &str| {
        let addr = addr.to_string();
        async move {
            TcpListener::bind(&addr)
                .await
                .map_err(|e| StartError::Setup(format!("cannot listen on {addr}: {e}")))
        }
    };
    let proxy = match proxy {
        Some(l) => l,
        None => bind(&listen.proxy).await?,
    };
    let admin = match admin {
        Some(l) => l,
        None => bind(&listen.admin).await?,
    };
    let proxy_addr = proxy
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::admin::serve_admin(
        admin,
        state.clone(),
        shutdown.clone(),
    ));
    let limits = ConnLimits::from_config(server);
    let proxy_task = tokio::spawn(serve_proxy(proxy, state.clone(), limits, shutdown.clone()));
    if let Some(addr) = &listen.transparent {
        let transparent = bind(addr).await?;
        tracing::info!(addr = %addr, "transparent listener (iptables REDIRECT target)");
        tokio::spawn(crate::intercept::transparent::serve_transparent(
            transparent,
            state.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(%proxy_addr, %admin_addr, "tollgate proxy listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        state,
        shutdown,
        proxy_task,
        _watcher: None,
        checkpoint_upload: None,
    })
}
