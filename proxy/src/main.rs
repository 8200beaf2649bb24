//! `tollgate-proxy`: the sidecar (`run`) and its offline tools.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tollgate_proxy::cli;

/// The request path allocates per call (JSON trees, records, headers): mimalloc's thread-local
/// free lists cost fewer instructions per malloc/free than glibc's (docs/performance.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for an invalid config.
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "tollgate-proxy",
    version,
    about = "Tollgate sidecar: identity, policy, budget and audit for every agent tool call"
)]
struct Cli {
    /// Log as JSON lines (default: human-readable).
    #[arg(long, global = true, env = "TOLLGATE_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar: from a standalone config file (watched and hot-reloaded), or from the
    /// operator (`--operator`), with the file giving only local settings.
    Run {
        /// Standalone config file (with `--operator`: listeners, audit, limits, TLS only).
        #[arg(long, short, required_unless_present = "operator")]
        config: Option<PathBuf>,
        /// Operator snapshot API URL.
        #[arg(long, env = "TOLLGATE_OPERATOR", requires_all = ["agent", "token_file"])]
        operator: Option<String>,
        /// `namespace/name` of this sidecar's AgentIdentity.
        #[arg(long, env = "TOLLGATE_AGENT")]
        agent: Option<String>,
        /// Projected ServiceAccount token (audience `tollgate`).
        #[arg(long, env = "TOLLGATE_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Long-poll timeout, seconds.
        #[arg(long, default_value_t = 30)]
        poll_timeout: u64,
        /// Operator mode: proxy listener (overrides `listen.proxy`).
        #[arg(long)]
        listen_proxy: Option<String>,
        /// Operator mode: admin listener (overrides `listen.admin`).
        #[arg(long)]
        listen_admin: Option<String>,
        /// Operator mode: transparent listener (overrides `listen.transparent`).
        #[arg(long)]
        listen_transparent: Option<String>,
        /// Operator mode: audit file (overrides `audit.path`).
        #[arg(long)]
        audit_path: Option<String>,
        /// Operator mode: directory holding the interception CA as `tls.crt` and `tls.key`.
        #[arg(long)]
        intercept_ca_dir: Option<PathBuf>,
    },
    /// Validate a config file and compile its policies. Exit 0 if good, 64 if not.
    Check {
        /// Config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the guided demo: a proxy, stand-in payments and support APIs, and a scripted agent.
    Demo,
    /// Print the JSON Schema of the config file.
    Schema,
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Offline audit tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Re-decide recorded calls under other policies; print each decision that would change.
    Replay {
        /// Audit file(s); a rotated set is ordered automatically.
        #[arg(long, required = true, num_args = 1..)]
        audit: Vec<PathBuf>,
        /// Directory (or file) of Rego policies to replay against.
        #[arg(long)]
        policies: PathBuf,
        /// YAML or JSON file with `data.tollgate_config`.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Exit 1 if any decision would change (the release gate).
        #[arg(long)]
        fail_on_change: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Interception CA tools (CONNECT and transparent TLS interception).
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print (or `--apply`) the nat OUTPUT rules of transparent mode: outbound TCP to the given
    /// ports, from every UID but the sidecar's, is redirected to the transparent listener.
    Iptables {
        /// Install the rules (idempotent) instead of printing them.
        #[arg(long)]
        apply: bool,
        /// UID the sidecar runs as (its own traffic is not redirected).
        #[arg(long, default_value_t = 1337)]
        proxy_uid: u32,
        /// Destination ports to redirect.
        #[arg(long, value_delimiter = ',', default_values_t = [80u16, 443])]
        ports: Vec<u16>,
        /// Transparent listener port (`listen.transparent`).
        #[arg(long, default_value_t = 15006)]
        to_port: u16,
        /// Admin port, never redirected.
        #[arg(long, default_value_t = 15090)]
        admin_port: u16,
        /// Skip the ip6tables rules (only where the pod has no IPv6).
        #[arg(long)]
        no_ipv6: bool,
    },
    /// Review pinned MCP tool definitions against what their servers advertise.
    Tools {
        #[command(subcommand)]
        command: ToolsCommand,
    },
    /// List and decide approval requests held by a standalone sidecar (admin API).
    Approvals {
        /// `list`, `approve` or `deny`.
        #[arg(value_parser = ["list", "approve", "deny"])]
        action: String,
        /// Approval id (`apr-…`) for approve/deny.
        id: Option<String>,
        /// Admin URL of the sidecar.
        #[arg(long, default_value = "http://127.0.0.1:15090")]
        admin: String,
        /// Admin token (bound to your approver name in the sidecar's config).
        #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Reason recorded with the decision.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
enum ToolsCommand {
    /// Show the tool's pinned definition against the one its MCP server advertises now
    /// (exit 0 when they are the same, 1 when they differ or the tool is not pinned).
    Diff {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
        /// Tool name (`tools[].name`).
        #[arg(long)]
        tool: String,
        /// The MCP endpoint, when the tool's match does not name one (wildcard host, templated path).
        #[arg(long)]
        url: Option<String>,
    },
    /// Write the definition the server advertises into the tool's `pin`, after review: only if
    /// it still has the hash `tools diff` showed.
    Pin {
        /// Config file (rewritten; comments are not kept).
        #[arg(long)]
        config: PathBuf,
        /// Tool name (`tools[].name`).
        #[arg(long)]
        tool: String,
        /// The advertised hash you reviewed (from `tools diff`).
        #[arg(long)]
        sha256: String,
        /// The MCP endpoint, when the tool's match does not name one.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the interception CA (`ca.crt`, `ca.key`) in DIR.
    Init {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run `test_*` rules in `*_test.rego` and the scenario bank under DIR/scenarios, with coverage.
    Test {
        /// Policy directory.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain; report the first broken link and exit 1.
    Verify {
        /// Audit file(s); a rotated set is ordered automatically.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Accept an incomplete final line (what a crash mid-write leaves) and verify up to the
        /// last complete record. Without it, truncation is reported and exits 1.
        #[arg(long)]
        allow_torn_tail: bool,
        /// Signed checkpoints (a file, or `-` for stdin; other lines are skipped): the files
        /// must faithfully extend every one — truncation, a rewritten chain and a replaced or
        /// missing file exit 1, and so does a forged or unsigned checkpoint.
        #[arg(long, value_name = "SOURCE")]
        checkpoints: Option<String>,
        /// The sidecar's registered public key (base64, or a file holding it such as
        /// `audit-checkpoint.key.pub`). Without it the checkpoints' own key is used.
        #[arg(long, value_name = "K", requires = "checkpoints")]
        public_key: Option<String>,
    },
    /// Print the checkpoint signing key's public half and id (generating the key if absent),
    /// for registration with the verifier.
    Key {
        /// Key file (`audit.checkpoints.keyFile`).
        #[arg(long, default_value = "audit-checkpoint.key")]
        key_file: PathBuf,
    },
    /// Summarise runs in the shape of the run record.
    Runs {
        /// Audit file(s).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
        /// Only runs that ended in this period: a duration back from now (`24h`, `7d`) or an
        /// RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
        /// Cost per reported outcome per agent (and the cost per resolved run) instead of one
        /// summary per run.
        #[arg(long)]
        by_outcome: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its own story; the proxy's logs stay out of it unless asked for.
    let default_log = if matches!(cli.command, Command::Demo) {
        "warn"
    } else {
        "info"
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    {
        let _rt = rt.enter();
        tollgate_proxy::telemetry::init(cli.log_json, default_log);
    }
    let code = rt.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                operator: Some(url),
                agent: Some(agent),
                token_file: Some(token_file),
                poll_timeout,
                listen_proxy,
                listen_admin,
                listen_transparent,
                audit_path,
                intercept_ca_dir,
            } => {
                let args = tollgate_proxy::control::ControlArgs {
                    url,
                    agent,
                    token_file,
                    poll_timeout: std::time::Duration::from_secs(poll_timeout),
                };
                let local = cli::LocalOverrides {
                    listen_proxy,
                    listen_admin,
                    listen_transparent,
                    audit_path,
                    intercept_ca_dir,
                };
                cli::run_operator(config.as_deref(), args, local).await
            }
            Command::Run {
                config: Some(config),
                ..
            } => cli::run(&config).await,
            Command::Run { .. } => {
                eprintln!(
                    "run needs --config FILE, or --operator URL --agent NS/NAME --token-file F"
                );
                2
            }
            Command::Check { config } => cli::check(&config),
            Command::Demo => cli::demo().await,
            Command::Policy {
                command: PolicyCommand::Test { dir },
            } => cli::policy_test(&dir),
            Command::Audit {
                command:
                    AuditCommand::Verify {
                        files,
                        allow_torn_tail,
                        checkpoints,
                        public_key,
                    },
            } => match checkpoints {
                None => cli::audit_verify(&files, allow_torn_tail),
                Some(source) => cli::audit_verify_checkpoints(
                    &files,
                    allow_torn_tail,
                    &source,
                    public_key.as_deref(),
                ),
            },
            Command::Audit {
                command: AuditCommand::Key { key_file },
            } => cli::audit_key(&key_file),
            Command::Audit {
                command:
                    AuditCommand::Runs {
                        files,
                        json,
                        since,
                        by_outcome,
                    },
            } => cli::audit_runs(&files, json, since.as_deref(), by_outcome),
            Command::Replay {
                audit,
                policies,
                data,
                fail_on_change,
                json,
            } => cli::replay(&audit, &policies, data.as_deref(), fail_on_change, json),
            Command::Approvals {
                action,
                id,
                admin,
                token,
                reason,
            } => cli::approvals(&admin, &token, &action, id.as_deref(), reason.as_deref()).await,
            Command::Tools {
                command: ToolsCommand::Diff { config, tool, url },
            } => cli::tools_diff(&config, &tool, url.as_deref()).await,
            Command::Tools {
                command:
                    ToolsCommand::Pin {
                        config,
                        tool,
                        sha256,
                        url,
                    },
            } => cli::tools_pin(&config, &tool, &sha256, url.as_deref()).await,
            Command::Ca {
                command: CaCommand::Init { out, days, force },
            } => cli::ca_init(&out, days, force),
            Command::Iptables {
                apply,
                proxy_uid,
                ports,
                to_port,
                admin_port,
                no_ipv6,
            } => {
                let rules = tollgate_proxy::intercept::transparent::RedirectRules {
                    proxy_uid,
                    ports,
                    to_port,
                    admin_port,
                    ipv6: !no_ipv6,
                };
                cli::iptables(&rules, apply)
            }
            Command::Schema => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&tollgate_proxy::config::json_schema())
                        .unwrap_or_default()
                );
                0
            }
        }
    });
    // Spans still batched go out before the process exits (the runtime still runs the send).
    tollgate_proxy::telemetry::shutdown();
    let _ = EXIT_CONFIG;
    ExitCode::from(code)
}
