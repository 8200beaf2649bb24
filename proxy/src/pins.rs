//! Pinned MCP tool definitions ("rug pull" detection): a `Tool` may pin the definition its MCP
//! server must advertise, and this module owns the canonical form that is hashed, what this
//! sidecar has observed in `tools/list` answers, and the check a `tools/call` must pass.
//!
//! **Canonical form.** A definition is the JSON object of exactly three members, `name`
//! (string), `description` (string, or `null` when the server sends none) and `inputSchema`
//! (the schema as sent, or `null`), serialised with the members of every object sorted by
//! key (byte order), no whitespace, strings and numbers as `serde_json` writes them (minimal
//! escapes, integers as digits). For schemas without fractional numbers this is the RFC 8785
//! (JCS) serialisation. The pin hash is the lowercase hex sha256 of those bytes. Every other
//! member of an advertised tool (`title`, `annotations`, `outputSchema`, `_meta`, icons) is
//! not part of the pin.
//!
//! **Observations** are per sidecar and per tool: the definition the last `tools/list` answer
//! of any session advertised for it. A call is compared with the pin at call time, so a new
//! pin (after review) takes effect without another list. A pinned tool this sidecar has never
//! seen advertised is refused (`tool_definition_unverified`): the sidecar cannot fetch the
//! list itself, and forwarding would run a tool whose description nobody checked (see
//! SECURITY.md, "Pinned tool definitions").
//!
//! The `tools diff|pin` commands are in [`crate::cli::tools`]; the report of observations to
//! the operator is [`crate::control::pins`].

use crate::config::{PinnedDefinition, ToolConfig};
use crate::refusal::Refusal;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;

/// Largest canonical definition kept (and reported to the operator) in full; a larger one is
/// kept by hash only.
pub const MAX_KEPT_DEFINITION: usize = 16 * 1024;

/// Most tools whose observations are kept (a hostile server cannot grow the map: only
/// catalog tools are observed, this is a backstop).
const MAX_OBSERVED: usize = 4096;

/// A tool pin, compiled: the hash to match and, when the full definition was pinned, the
/// definition (canonical value) for diffs.
#[derive(Clone, Debug, PartialEq)]
pub struct Pin {
    /// Hex sha256 of the canonical definition.
    pub sha256: String,
    /// The pinned definition, in canonical shape, if it was pinned in full.
    pub definition: Option<Value>,
}

/// The canonical value of a definition: `{"description", "inputSchema", "name"}`.
pub fn canonical_value(
    name: &str,
    description: Option<&str>,
    input_schema: Option<&Value>,
) -> Value {
    json!({
        "name": name,
        "description": description,
        "inputSchema": input_schema.cloned().unwrap_or(Value::Null),
    })
}

/// The canonical value of a tool as a `tools/list` answer advertises it (`None` when it has no
/// string `name`). A non-string `description` is kept as sent, so it cannot match a pin.
pub fn advertised(tool: &Value) -> Option<Value> {
    let name = tool.get("name")?.as_str()?;
    Some(json!({
        "name": name,
        "description": tool.get("description").cloned().unwrap_or(Value::Null),
        "inputSchema": tool.get("inputSchema").cloned().unwrap_or(Value::Null),
    }))
}

/// The canonical bytes of a canonical value.
pub fn canonical_bytes(def: &Value) -> Vec<u8> {
    crate::policy::canonical_json(def)
}

/// The pin hash of a canonical value.
pub fn hash(def: &Value) -> String {
    crate::policy::sha256_hex(&canonical_bytes(def))
}

/// The canonical value of a pinned definition.
pub fn pinned_value(d: &PinnedDefinition) -> Value {
    canonical_value(&d.name, d.description.as_deref(), d.input_schema.as_ref())
}

/// Compile a tool's pin (config validation): only MCP tools, a well-formed hash, a definition
/// named like the tool, and a hash and definition that agree. Errors are `(field, message)`.
pub fn compile(t: &ToolConfig) -> Result<Option<Pin>, (String, String)> {
    let Some(p) = &t.pin else { return Ok(None) };
    let Some(mcp) = t.matcher.mcp_tool.as_deref() else {
        return Err((
            "pin".into(),
            "only MCP tools (match.mcpTool) advertise a definition to pin".into(),
        ));
    };
    let definition = p.definition.as_ref().map(pinned_value);
    if let Some(d) = &p.definition {
        if d.name != mcp {
            return Err((
                "pin.definition.name".into(),
                format!("must be the tool's match.mcpTool {mcp:?}, not {:?}", d.name),
            ));
        }
    }
    let from_def = definition.as_ref().map(hash);
    let sha256 = match (&p.sha256, from_def) {
        (None, None) => return Err(("pin".into(), "set sha256, definition, or both".into())),
        (Some(h), _) if !is_sha256(h) => {
            return Err((
                "pin.sha256".into(),
                "must be 64 lowercase hex digits (the sha256 of the canonical definition)".into(),
            ))
        }
        (Some(h), Some(d)) if *h != d => {
            return Err((
                "pin.sha256".into(),
                format!("does not match pin.definition, whose hash is {d}"),
            ))
        }
        (Some(h), _) => h.clone(),
        (None, Some(d)) => d,
    };
    Ok(Some(Pin { sha256, definition }))
}

/// The hash a pin pins: its `sha256`, else the hash of its definition (`None` when it has
/// neither; [`compile`] rejects that).
pub fn pin_sha256(p: &crate::config::ToolPin) -> Option<String> {
    p.sha256
        .clone()
        .or_else(|| p.definition.as_ref().map(|d| hash(&pinned_value(d))))
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn is_sha256(h: &str) -> bool {
    h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What was last advertised for one tool.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Hex sha256 of the advertised canonical definition.
    pub sha256: String,
    /// The advertised canonical definition (`None` when over [`MAX_KEPT_DEFINITION`]).
    pub definition: Option<Value>,
    /// RFC 3339 time of the observation.
    pub at: String,
    /// The advertised definition matched the tool's pin (true for unpinned tools).
    pub matches: bool,
}

/// One tool's observations.
#[derive(Clone, Debug, Default)]
struct Entry {
    last: Option<Observed>,
    /// The last advertised definition that matched the pin: what a hash-only pin diffs to.
    last_good: Option<Value>,
}

/// What this sidecar has seen its MCP servers advertise, by tool name.
#[derive(Default)]
pub struct Observations {
    by_tool: Mutex<HashMap<String, Entry>>,
    /// Bumped whenever an observation changes (the operator reporter waits on it).
    version: tokio::sync::watch::Sender<u64>,
}

/// A definition the server advertised that differs from the pin.
#[derive(Clone, Debug)]
pub struct Mismatch {
    /// Tollgate tool name.
    pub tool: String,
    /// The pinned hash.
    pub pinned: String,
    /// The advertised hash.
    pub advertised: String,
    /// What differs, for people: e.g. `description changed (42 -> 130 chars)`.
    pub summary: Vec<String>,
    /// The advertised definition (canonical).
    pub definition: Value,
}

impl Observations {
    /// Record what a `tools/list` answer advertised for catalog tool `t` (its `pin`, if any);
    /// returns the mismatch when the tool is pinned and the definition differs.
    pub fn observe(&self, tool: &str, pin: Option<&Pin>, def: Value) -> Option<Mismatch> {
        let sha256 = hash(&def);
        let matches = pin.is_none_or(|p| p.sha256 == sha256);
        let kept = (canonical_bytes(&def).len() <= MAX_KEPT_DEFINITION).then(|| def.clone());
        let mut map = self.by_tool.lock().expect("observations lock");
        if map.len() >= MAX_OBSERVED && !map.contains_key(tool) {
            map.clear();
        }
        let e = map.entry(tool.to_string()).or_default();
        let changed = e
            .last
            .as_ref()
            .is_none_or(|o| o.sha256 != sha256 || o.matches != matches);
        let before = e.last_good.clone();
        if matches && pin.is_some() {
            e.last_good = kept.clone();
        }
        e.last = Some(Observed {
            sha256: sha256.clone(),
            definition: kept,
            at: now_rfc3339(),
            matches,
        });
        drop(map);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        let pin = pin.filter(|_| !matches)?;
        let reference = pin.definition.clone().or(before);
        Some(Mismatch {
            tool: tool.to_string(),
            pinned: pin.sha256.clone(),
            advertised: sha256,
            summary: diff_summary(reference.as_ref(), &def),
            definition: def,
        })
    }

    /// The last observation of `tool`.
    pub fn get(&self, tool: &str) -> Option<Observed> {
        self.by_tool
            .lock()
            .expect("observations lock")
            .get(tool)
            .and_then(|e| e.last.clone())
    }

    /// Every tool's last observation, by tool name.
    pub fn all(&self) -> Vec<(String, Observed)> {
        let map = self.by_tool.lock().expect("observations lock");
        let mut v: Vec<_> = map
            .iter()
            .filter_map(|(k, e)| e.last.clone().map(|o| (k.clone(), o)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A counter that changes whenever an observation does.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// A receiver that sees every change of [`Self::version`].
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// May a `tools/call` of `tool` (pinned with `pin`) go ahead? Compared at call time with
    /// the last definition this sidecar saw advertised.
    pub fn check(&self, tool: &str, pin: Option<&Pin>) -> Result<(), Refusal> {
        let Some(pin) = pin else { return Ok(()) };
        match self.get(tool) {
            None => Err(Refusal::ToolDefinition {
                code: "tool_definition_unverified",
                reason: format!(
                    "tool {tool} is pinned and this sidecar has not yet seen its server advertise it; list the tools (tools/list) first"
                ),
            }),
            Some(o) if o.sha256 != pin.sha256 => Err(Refusal::ToolDefinition {
                code: "tool_definition_changed",
                reason: format!(
                    "the server advertises tool {tool} with definition sha256 {} but sha256 {} was pinned after review",
                    o.sha256, pin.sha256
                ),
            }),
            Some(_) => Ok(()),
        }
    }
}

/// What differs between a reference definition (the pinned one, or the last one that matched)
/// and an advertised one, in a few bounded lines.
pub fn diff_summary(reference: Option<&Value>, advertised: &Value) -> Vec<String> {
    let Some(r) = reference else {
        return vec![
            "no reviewed definition to compare with (pinned by hash only, not seen matching yet)"
                .into(),
        ];
    };
    let mut out = Vec::new();
    if r["name"] != advertised["name"] {
        out.push(format!("name changed to {}", advertised["name"]));
    }
    let len = |v: &Value| v.as_str().map_or(0, |s| s.chars().count());
    if r["description"] != advertised["description"] {
        out.push(format!(
            "description changed ({} -> {} chars)",
            len(&r["description"]),
            len(&advertised["description"])
        ));
    }
    if r["inputSchema"] != advertised["inputSchema"] {
        let props = |v: &Value| -> Vec<String> {
            v["inputSchema"]["properties"]
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default()
        };
        let (a, b) = (props(r), props(advertised));
        let added: Vec<_> = b
            .iter()
            .filter(|k| !a.contains(k))
            .take(10)
            .cloned()
            .collect();
        let removed: Vec<_> = a
            .iter()
            .filter(|k| !b.contains(k))
            .take(10)
            .cloned()
            .collect();
        let mut s = String::from("inputSchema changed");
        if !added.is_empty() {
            s += &format!("; properties added: {}", added.join(", "));
        }
        if !removed.is_empty() {
            s += &format!("; properties removed: {}", removed.join(", "));
        }
        out.push(s);
    }
    if out.is_empty() {
        out.push("the canonical forms differ".into());
    }
    out
}

/// A line diff of two definitions, pretty-printed with sorted keys (`tools diff`): `-` lines
/// only in `pinned`, `+` lines only in `observed`. A longest-common-subsequence diff written
/// here rather than a crate: definitions are bounded ([`MAX_KEPT_DEFINITION`]), so the
/// quadratic table stays small, and the proxy needs no text-diff dependency for one command.
pub fn line_diff(pinned: &Value, observed: &Value) -> String {
    let pretty = |v: &Value| {
        let sorted: Value = serde_json::from_slice(&canonical_bytes(v)).unwrap_or(Value::Null);
        serde_json::to_string_pretty(&sorted).unwrap_or_default()
    };
    let (a, b) = (pretty(pinned), pretty(observed));
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    if a.len().saturating_mul(b.len()) > 4_000_000 {
        return format!(
            "(definitions too large to diff line by line: {} and {} lines)\n",
            a.len(),
            b.len()
        );
    }
    // lcs[i][j]: length of the LCS of a[i..] and b[j..].
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!(" {}\n", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out += &format!("+{}\n", b[j]);
            j += 1;
        } else {
            out += &format!("-{}\n", a[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
