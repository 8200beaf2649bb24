//! `kubectl tollgate`: the SRE's workflow on Tollgate objects. Put it on `PATH` and kubectl
//! finds it as a plugin.
//!
//! ```text
//! kubectl tollgate approvals [-n NS | -A]            pending and decided approval requests
//! kubectl tollgate approve NAME [-n NS] [--reason R] approve a held call (approver = you)
//! kubectl tollgate deny NAME [-n NS] [--reason R]    deny it
//! kubectl tollgate kill NAME --reason R [--all | --in-namespace N | --tenant T | --agent A | --tool T]
//!   (`--tool` is scoped to the current namespace, `-n`, unless `-A`)
//! kubectl tollgate unkill NAME                       lift a kill switch
//! kubectl tollgate status [-n NS | -A]               identities, readiness, snapshot versions, kill switches
//! kubectl tollgate tools diff TOOL [-n NS]           pinned vs last-observed MCP tool definition
//! kubectl tollgate tools pin TOOL --sha256 H [-n NS] pin the observed definition (after review)
//! kubectl tollgate audit checkpoints IDENTITY [--pod P] [-o json]
//!   the signed audit checkpoints the operator holds for the identity's pods; `-o json`
//!   prints one pod's as the JSON lines `tollgate-proxy audit verify --checkpoints` reads
//! ```
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::process::ExitCode;
use tollgate_operator::crd::{
    AgentIdentity, ApprovalRequest, AuditCheckpoint, KillSwitch, KillSwitchScope, KillSwitchSpec,
    Tool,
};

#[derive(Parser)]
#[command(
    name = "kubectl-tollgate",
    version,
    about = "Tollgate approvals and kill switches from kubectl"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long, global = true)]
    all_namespaces: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List approval requests.
    Approvals,
    /// Approve a held call.
    Approve {
        /// ApprovalRequest name.
        name: String,
        /// Reason recorded with the decision.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a held call.
    Deny {
        /// ApprovalRequest name.
        name: String,
        /// Reason recorded with the decision.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Engage a kill switch.
    Kill {
        /// KillSwitch name.
        name: String,
        /// Why (shown to agents and in audit records).
        #[arg(long)]
        reason: String,
        /// Everything.
        #[arg(long)]
        all: bool,
        /// Agents in this namespace.
        #[arg(long = "in-namespace")]
        in_namespace: Option<String>,
        /// This tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// This agent.
        #[arg(long)]
        agent: Option<String>,
        /// This tool.
        #[arg(long)]
        tool: Option<String>,
    },
    /// Lift a kill switch.
    Unkill {
        /// KillSwitch name.
        name: String,
    },
    /// Identities and kill switches at a glance.
    Status,
    /// Pinned MCP tool definitions.
    Tools {
        #[command(subcommand)]
        command: ToolsCmd,
    },
    /// Audit trail anchors held by the operator.
    Audit {
        #[command(subcommand)]
        command: AuditCmd,
    },
}

#[derive(Subcommand)]
enum ToolsCmd {
    /// The Tool's pinned definition against the one its sidecars last saw advertised (exit 1
    /// when they differ, or when the tool is not pinned).
    Diff {
        /// Tool name.
        tool: String,
    },
    /// Record the last-observed definition in the Tool's `spec.pin`, after review: only if it
    /// still has the hash you reviewed (`tools diff` prints it).
    Pin {
        /// Tool name.
        tool: String,
        /// The observed hash you reviewed.
        #[arg(long)]
        sha256: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// The signed checkpoints stored for an identity's pods (one chain per pod).
    Checkpoints {
        /// AgentIdentity name.
        identity: String,
        /// Only this pod's chain (required with `-o json` when the identity has several).
        #[arg(long)]
        pod: Option<String>,
        /// `json`: the checkpoint lines, for `tollgate-proxy audit verify FILE --checkpoints -`.
        #[arg(short, long)]
        output: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes configuration: {e}"))?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let approvals: Api<ApprovalRequest> = if cli.all_namespaces {
        Api::all(client.clone())
    } else {
        Api::namespaced(client.clone(), &ns)
    };
    match cli.command {
        Cmd::Tools { command } => tools(&Api::namespaced(client, &ns), command).await,
        Cmd::Approvals => {
            let list = approvals
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            println!(
                "{:<24} {:<14} {:<22} {:<10} {:<10} {:<20} SUMMARY",
                "NAME", "NAMESPACE", "AGENT", "TENANT", "PHASE", "APPROVER"
            );
            for a in list.items {
                let st = a.status.clone().unwrap_or_default();
                println!(
                    "{:<24} {:<14} {:<22} {:<10} {:<10} {:<20} {}",
                    a.name_any(),
                    a.namespace().unwrap_or_default(),
                    a.spec.agent,
                    a.spec.tenant,
                    st.phase.unwrap_or_else(|| "Pending".into()),
                    st.approver.unwrap_or_default(),
                    a.spec.summary
                );
            }
            Ok(())
        }
        Cmd::Approve { name, reason } => {
            decide(&Api::namespaced(client, &ns), &name, "Approved", reason).await
        }
        Cmd::Deny { name, reason } => {
            decide(&Api::namespaced(client, &ns), &name, "Denied", reason).await
        }
        Cmd::Kill {
            name,
            reason,
            all,
            in_namespace,
            tenant,
            agent,
            tool,
        } => {
            if !all
                && in_namespace.is_none()
                && tenant.is_none()
                && agent.is_none()
                && tool.is_none()
            {
                return Err(
                    "give a scope: --all, or any of --in-namespace, --tenant, --agent, --tool"
                        .into(),
                );
            }
            // Tools are namespaced: `--tool X` means X in the current namespace (`-n`, or the
            // kubeconfig's), not every tool named X in the cluster; `-A` widens it on purpose.
            let namespace = in_namespace
                .or_else(|| (tool.is_some() && !all && !cli.all_namespaces).then(|| ns.clone()));
            let api: Api<KillSwitch> = Api::all(client);
            let ks = KillSwitch::new(
                &name,
                KillSwitchSpec {
                    scope: KillSwitchScope {
                        all,
                        namespace,
                        tenant,
                        agent,
                        tool,
                    },
                    engaged: true,
                    reason,
                },
            );
            let patch = Patch::Apply(serde_json::to_value(&ks).map_err(|e| e.to_string())?);
            api.patch(
                &name,
                &PatchParams::apply("kubectl-tollgate").force(),
                &patch,
            )
            .await
            .map_err(|e| e.to_string())?;
            println!("killswitch/{name} engaged");
            Ok(())
        }
        Cmd::Unkill { name } => {
            let api: Api<KillSwitch> = Api::all(client);
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"engaged": false}})),
            )
            .await
            .map_err(|e| e.to_string())?;
            println!("killswitch/{name} lifted");
            Ok(())
        }
        Cmd::Audit {
            command:
                AuditCmd::Checkpoints {
                    identity,
                    pod,
                    output,
                },
        } => {
            audit_checkpoints(
                &Api::namespaced(client, &ns),
                &identity,
                pod.as_deref(),
                output.as_deref(),
            )
            .await
        }
        Cmd::Status => {
            let ids: Api<AgentIdentity> = if cli.all_namespaces {
                Api::all(client.clone())
            } else {
                Api::namespaced(client.clone(), &ns)
            };
            println!(
                "{:<30} {:<8} {:<10} {:<16} MESSAGE",
                "AGENT", "READY", "MODE", "SNAPSHOT"
            );
            for i in ids
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
            {
                let st = i.status.clone().unwrap_or_default();
                let ready = st.conditions.iter().find(|c| c.type_ == "Ready");
                println!(
                    "{:<30} {:<8} {:<10} {:<16} {}",
                    format!("{}/{}", i.namespace().unwrap_or_default(), i.name_any()),
                    ready.map(|c| c.status.as_str()).unwrap_or("Unknown"),
                    i.spec.mode.as_str(),
                    st.snapshot_version,
                    ready.map(|c| c.message.as_str()).unwrap_or("")
                );
            }
            let pending = approvals
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .filter(|a| {
                    a.status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .unwrap_or("Pending")
                        == "Pending"
                })
                .count();
            println!("pending approvals: {pending}  (kubectl tollgate approvals)");
            let ks: Api<KillSwitch> = Api::all(client);
            for k in ks
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
            {
                if k.spec.engaged {
                    println!(
                        "killswitch/{} ENGAGED: {} ({} agents)",
                        k.name_any(),
                        k.spec.reason,
                        k.status.map(|s| s.affected_agents).unwrap_or(0)
                    );
                }
            }
            Ok(())
        }
    }
}

/// `tools diff` and `tools pin`.
async fn tools(api: &Api<Tool>, command: ToolsCmd) -> Result<(), String> {
    use tollgate_proxy::pins;
    let name = match &command {
        ToolsCmd::Diff { tool } | ToolsCmd::Pin { tool, .. } => tool.clone(),
    };
    let t = api
        .get(&name)
        .await
        .map_err(|e| format!("tool/{name}: {e}"))?;
    let observed = t
        .status
        .as_ref()
        .and_then(|s| s.observed_definition.clone());
    let pinned = t.spec.pin.as_ref().and_then(pins::pin_sha256);
    match command {
        ToolsCmd::Diff { .. } => {
            println!("tool:     {}/{name}", t.namespace().unwrap_or_default());
            println!(
                "pinned:   {}",
                pinned
                    .as_deref()
                    .map_or("(not pinned)".into(), |h| format!("sha256 {h}"))
            );
            let Some(o) = observed else {
                println!("observed: (no sidecar has reported what its server advertises yet)");
                return Err("nothing observed to compare".into());
            };
            println!(
                "observed: sha256 {} (by {} at {})",
                o.sha256, o.agent, o.observed_at
            );
            if pinned.as_deref() == Some(o.sha256.as_str()) {
                println!("the server advertises the pinned definition");
                return Ok(());
            }
            println!();
            let pinned_def = t
                .spec
                .pin
                .as_ref()
                .and_then(|p| p.definition.as_ref())
                .map(pins::pinned_value);
            match (&pinned_def, &o.definition) {
                (Some(p), Some(d)) => print!("{}", pins::line_diff(p, d)),
                (_, Some(d)) => println!("{}", serde_json::to_string_pretty(d).unwrap_or_default()),
                (_, None) => println!(
                    "(the observed definition was too large to keep; only its hash is known)"
                ),
            }
            println!();
            println!(
                "after review: kubectl tollgate tools pin {name} --sha256 {}",
                o.sha256
            );
            Err(format!(
                "tool/{name}: the observed definition is not the pinned one"
            ))
        }
        ToolsCmd::Pin { sha256, .. } => {
            let o = observed.ok_or_else(|| format!("tool/{name}: nothing observed to pin yet"))?;
            if o.sha256 != sha256 {
                return Err(format!("tool/{name}: the last observed definition is sha256 {}, not the {sha256} you reviewed; run tools diff again", o.sha256));
            }
            let d = o.definition.as_ref();
            let definition = d.map(|d| tollgate_proxy::config::PinnedDefinition {
                name: d["name"].as_str().unwrap_or_default().to_string(),
                description: d["description"].as_str().map(str::to_owned),
                input_schema: Some(d["inputSchema"].clone()).filter(|s| !s.is_null()),
            });
            let pin = tollgate_proxy::config::ToolPin {
                sha256: Some(o.sha256.clone()),
                definition,
            };
            // The kept definition must hash to what was observed, or the pin would not hold.
            if let Some(h) = pin
                .definition
                .as_ref()
                .map(|d| pins::hash(&pins::pinned_value(d)))
            {
                if h != o.sha256 {
                    return Err(format!("tool/{name}: the kept definition hashes to {h}, not {}; pin by hash in the spec instead", o.sha256));
                }
            }
            // A replace conditional on the version read: an edit made since is not lost.
            let mut t = t;
            t.spec.pin = Some(pin);
            api.replace(&name, &kube::api::PostParams::default(), &t)
                .await
                .map_err(|e| format!("tool/{name}: {e}"))?;
            println!("tool/{name} pinned to sha256 {}", o.sha256);
            Ok(())
        }
    }
}

async fn decide(
    api: &Api<ApprovalRequest>,
    name: &str,
    phase: &str,
    reason: Option<String>,
) -> Result<(), String> {
    let a = api
        .get(name)
        .await
        .map_err(|e| format!("approvalrequest/{name}: {e}"))?;
    let current = a
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    if current != "Pending" {
        return Err(format!(
            "approvalrequest/{name} is already {current}; decisions are final"
        ));
    }
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if !a.spec.expires_at.is_empty() && a.spec.expires_at <= now {
        return Err(format!(
            "approvalrequest/{name} expired at {}",
            a.spec.expires_at
        ));
    }
    let mut status = serde_json::json!({"phase": phase});
    if let Some(r) = reason {
        status["reason"] = r.into();
    }
    // The approver is stamped by the admission webhook from your Kubernetes identity.
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map_err(|e| e.to_string())?;
    println!("approvalrequest/{name} {}", phase.to_lowercase());
    Ok(())
}

/// `audit checkpoints IDENTITY [--pod P] [-o json]`: a table of the identity's checkpoint
/// chains, or (`-o json`) one chain's signed lines exactly as stored, which
/// `tollgate-proxy audit verify FILE --checkpoints SOURCE` checks the pod's audit file against.
async fn audit_checkpoints(
    api: &Api<AuditCheckpoint>,
    identity: &str,
    pod: Option<&str>,
    output: Option<&str>,
) -> Result<(), String> {
    let chains: Vec<AuditCheckpoint> = api
        .list(&ListParams::default().labels(&format!("tollgate.dev/agent={identity}")))
        .await
        .map_err(|e| e.to_string())?
        .items
        .into_iter()
        .filter(|c| c.spec.agent == identity && pod.is_none_or(|p| c.spec.pod == p))
        .collect();
    if chains.is_empty() {
        return Err(format!(
            "no audit checkpoints stored for {identity}{}",
            pod.map(|p| format!(" pod {p}")).unwrap_or_default()
        ));
    }
    match output {
        Some("json") => {
            let [chain] = chains.as_slice() else {
                let pods: Vec<&str> = chains.iter().map(|c| c.spec.pod.as_str()).collect();
                return Err(format!(
                    "{identity} has {} checkpoint chains (pods {}); choose one with --pod",
                    chains.len(),
                    pods.join(", ")
                ));
            };
            for line in chain.status.iter().flat_map(|s| &s.checkpoints) {
                println!("{line}");
            }
            Ok(())
        }
        None => {
            println!(
                "{:<40} {:<18} {:>8} {:>6} {:>6} LAST",
                "POD", "KEY", "SEQ", "KEPT", "PRUNED"
            );
            for c in &chains {
                let st = c.status.clone().unwrap_or_default();
                println!(
                    "{:<40} {:<18} {:>8} {:>6} {:>6} {}",
                    c.spec.pod,
                    c.spec.key_id,
                    st.seq,
                    st.checkpoints.len(),
                    st.pruned,
                    st.last_checkpoint_time
                );
            }
            Ok(())
        }
        Some(other) => Err(format!("-o {other}: only json is supported")),
    }
}
