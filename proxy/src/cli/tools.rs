//! `tollgate-proxy tools diff|pin`: the standalone review loop of a pinned MCP tool. Both ask
//! the tool's MCP server for its `tools/list` directly (the `initialize` handshake, then every
//! page of the list), compare the tool's advertised definition with the config's pin, and
//! `pin` writes the reviewed definition into the config file — only when the server still
//! advertises the hash the reviewer saw (`--sha256`), so what is pinned is what was reviewed.

use crate::config::{PinnedDefinition, ToolConfig, ToolPin};
use crate::pins::{advertised, hash, line_diff, Pin};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// The revision asked for in `initialize` (servers of the current revision still answer it).
const PROTOCOL: &str = "2025-11-25";

/// Most `tools/list` pages followed.
const MAX_PAGES: usize = 50;

/// The MCP endpoint of a tool: `--url`, else its match (`scheme://host/path`, `http` and `/mcp`
/// by default). A wildcard host or a templated path names no one endpoint.
pub fn endpoint(t: &ToolConfig, url: Option<&str>) -> Result<String, String> {
    if let Some(u) = url {
        return Ok(u.to_string());
    }
    let m = &t.matcher;
    if m.host.contains('*') {
        return Err(format!(
            "tool {} matches a wildcard host ({}); give the server's --url",
            t.name, m.host
        ));
    }
    let path = m.path.as_deref().unwrap_or("/mcp");
    if path.contains('{') {
        return Err(format!(
            "tool {} matches a path template ({path}); give the server's --url",
            t.name
        ));
    }
    let scheme = m.scheme.as_deref().unwrap_or("http");
    Ok(format!("{scheme}://{}{path}", m.host))
}

/// One JSON-RPC exchange with an MCP server: the answer to `id` (JSON or SSE, decoded), and
/// the session id the server set, if any.
async fn rpc(
    client: &crate::upstream::Upstreams,
    url: &str,
    session: Option<&str>,
    msg: &Value,
) -> Result<(Option<Value>, Option<String>), String> {
    let mut req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json, text/event-stream")
        .header(http::header::ACCEPT_ENCODING, "gzip, br, zstd")
        .header("mcp-protocol-version", PROTOCOL);
    if let Some(s) = session {
        req = req.header(crate::mcp::SESSION_HEADER, s);
    }
    let req = req
        .body(Full::new(Bytes::from(msg.to_string())))
        .map_err(|e| e.to_string())?;
    let res = client
        .send(req, Duration::from_secs(5), Duration::from_secs(30))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut parts, body) = res.into_parts();
    let session = parts
        .headers
        .get(crate::mcp::SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = tokio::time::timeout(
        Duration::from_secs(30),
        Limited::new(body, crate::mcp::MAX_LIST_BYTES).collect(),
    )
    .await
    .map_err(|_| format!("{url}: the answer timed out"))?
    .map_err(|e| format!("{url}: {e}"))?
    .to_bytes();
    if !parts.status.is_success() {
        return Err(format!(
            "{url} answered {}: {}",
            parts.status,
            String::from_utf8_lossy(&bytes)
        ));
    }
    let Some(id) = msg.get("id") else {
        return Ok((None, session));
    };
    let sse = crate::meter::is_sse(&parts.headers);
    let body = crate::mcp::decoded_body(&mut parts.headers, &bytes)?;
    let answers: Vec<Value> = if sse {
        String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim_start()).ok())
            .collect()
    } else {
        vec![serde_json::from_slice(&body).map_err(|e| format!("{url}: not JSON: {e}"))?]
    };
    let answer = answers
        .into_iter()
        .find(|a| a.get("id") == Some(id))
        .ok_or_else(|| format!("{url}: no answer to request {id}"))?;
    if let Some(e) = answer.get("error") {
        return Err(format!("{url}: {} failed: {e}", msg["method"]));
    }
    Ok((Some(answer["result"].clone()), session))
}

/// Every tool the MCP server at `url` advertises (all pages of `tools/list`).
pub async fn list_tools(url: &str, extra_ca: Option<&Path>) -> Result<Vec<Value>, String> {
    let client = crate::upstream::Upstreams::new(extra_ca)?;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {},
        "clientInfo": {"name": "tollgate-proxy tools", "version": env!("CARGO_PKG_VERSION")}}});
    let (_, session) = rpc(&client, url, None, &init).await?;
    let s = session.as_deref();
    let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    rpc(&client, url, s, &note).await?;
    let mut tools = Vec::new();
    let mut cursor: Option<Value> = None;
    for page in 0..MAX_PAGES {
        let params = match &cursor {
            Some(c) => json!({"cursor": c}),
            None => json!({}),
        };
        let list =
            json!({"jsonrpc": "2.0", "id": 2 + page, "method": "tools/list", "params": params});
        let (result, _) = rpc(&client, url, s, &list).await?;
        let result = result.unwrap_or(Value::Null);
        tools.extend(result["tools"].as_array().cloned().unwrap_or_default());
        match result.get("nextCursor").filter(|c| !c.is_null()) {
            Some(c) => cursor = Some(c.clone()),
            None => return Ok(tools),
        }
    }
    Err(format!("{url}: tools/list has more than {MAX_PAGES} pages"))
}

/// The config, the tool, its compiled pin and the definition its server advertises now.
struct Reviewed {
    tool: ToolConfig,
    pin: Option<Pin>,
    observed: Value,
}

async fn review(config: &Path, tool: &str, url: Option<&str>) -> Result<Reviewed, (u8, String)> {
    let usage = |m: String| (2u8, m);
    let cfg = crate::config::load_file(config).map_err(|e| {
        (
            super::EXIT_CONFIG,
            format!("invalid config {}: {e}", config.display()),
        )
    })?;
    let t = cfg
        .tools
        .iter()
        .find(|t| t.name == tool)
        .cloned()
        .ok_or_else(|| usage(format!("no tool {tool} in {}", config.display())))?;
    let mcp = t
        .matcher
        .mcp_tool
        .clone()
        .ok_or_else(|| usage(format!("tool {tool} is not an MCP tool (no match.mcpTool)")))?;
    let pin = crate::pins::compile(&t)
        .map_err(|(f, m)| (super::EXIT_CONFIG, format!("tools[{tool}].{f}: {m}")))?;
    let url = endpoint(&t, url).map_err(usage)?;
    let extra_ca = cfg
        .tls
        .extra_ca_file
        .as_deref()
        .map(|p| crate::snapshot::resolve(config.parent().unwrap_or(Path::new(".")), p));
    let tools = list_tools(&url, extra_ca.as_deref())
        .await
        .map_err(|e| (1, e))?;
    let observed = tools
        .iter()
        .find(|x| x.get("name").and_then(Value::as_str) == Some(mcp.as_str()))
        .and_then(advertised)
        .ok_or_else(|| (1, format!("{url} does not advertise a tool named {mcp:?}")))?;
    Ok(Reviewed {
        tool: t,
        pin,
        observed,
    })
}

/// `tools diff --config FILE --tool NAME [--url URL]`: pinned vs advertised. Exit 0 when the
/// server advertises the pinned definition, 1 when it differs or the tool is not pinned.
pub async fn diff(config: &Path, tool: &str, url: Option<&str>) -> u8 {
    let r = match review(config, tool, url).await {
        Ok(r) => r,
        Err((code, m)) => {
            eprintln!("{m}");
            return code;
        }
    };
    let observed_hash = hash(&r.observed);
    println!("tool:       {}", r.tool.name);
    println!("advertised: sha256 {observed_hash}");
    let Some(pin) = &r.pin else {
        println!("pinned:     (not pinned)");
        println!();
        println!(
            "{}",
            serde_json::to_string_pretty(&r.observed).unwrap_or_default()
        );
        println!();
        println!(
            "after review: tollgate-proxy tools pin --config {} --tool {} --sha256 {observed_hash}",
            config.display(),
            r.tool.name
        );
        return 1;
    };
    println!("pinned:     sha256 {}", pin.sha256);
    if pin.sha256 == observed_hash {
        println!("the server advertises the pinned definition");
        return 0;
    }
    println!();
    match &pin.definition {
        Some(d) => print!("{}", line_diff(d, &r.observed)),
        None => {
            println!("(pinned by hash only; the advertised definition:)");
            println!(
                "{}",
                serde_json::to_string_pretty(&r.observed).unwrap_or_default()
            );
        }
    }
    println!();
    println!(
        "after review: tollgate-proxy tools pin --config {} --tool {} --sha256 {observed_hash}",
        config.display(),
        r.tool.name
    );
    1
}

/// `tools pin --config FILE --tool NAME --sha256 H [--url URL]`: write the advertised
/// definition into the tool's `pin` in FILE, if the server still advertises `H` (the hash the
/// reviewer saw in `tools diff`). The file is rewritten from its parsed YAML (comments are not
/// kept) and must still load.
pub async fn pin(config: &Path, tool: &str, reviewed: &str, url: Option<&str>) -> u8 {
    let r = match review(config, tool, url).await {
        Ok(r) => r,
        Err((code, m)) => {
            eprintln!("{m}");
            return code;
        }
    };
    let observed_hash = hash(&r.observed);
    if observed_hash != reviewed {
        eprintln!(
            "the server now advertises sha256 {observed_hash}, not the {reviewed} you reviewed: run tools diff again"
        );
        return 1;
    }
    let o = &r.observed;
    let pin = ToolPin {
        sha256: Some(observed_hash.clone()),
        definition: Some(PinnedDefinition {
            name: o["name"].as_str().unwrap_or_default().to_string(),
            description: o["description"].as_str().map(str::to_owned),
            input_schema: Some(o["inputSchema"].clone()).filter(|s| !s.is_null()),
        }),
    };
    if !o["description"].is_null() && !o["description"].is_string() {
        eprintln!("the advertised description is not a string; it cannot be pinned");
        return 1;
    }
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            return 1;
        }
    };
    let mut doc: yaml_serde::Value = match yaml_serde::from_str(&text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{}: {e}", config.display());
            return super::EXIT_CONFIG;
        }
    };
    let entry = doc
        .get_mut("tools")
        .and_then(|t| t.as_sequence_mut())
        .and_then(|s| {
            s.iter_mut()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(tool))
        });
    let (Some(entry), Ok(value)) = (entry, yaml_serde::to_value(&pin)) else {
        eprintln!("tool {tool} not found in {}", config.display());
        return 1;
    };
    if let Some(m) = entry.as_mapping_mut() {
        m.insert("pin".into(), value);
    }
    let out = match yaml_serde::to_string(&doc) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 1;
        }
    };
    if let Err(e) = crate::config::parse_str(&out) {
        eprintln!("the pinned config does not load: {e}");
        return super::EXIT_CONFIG;
    }
    if let Err(e) = std::fs::write(config, out) {
        eprintln!("{}: {e}", config.display());
        return 1;
    }
    println!(
        "pinned {tool} to sha256 {observed_hash} in {} (comments in the file are not kept)",
        config.display()
    );
    0
}
