//! The tool catalog: maps a normalised [`Target`] (or an MCP tool name) to one typed tool.
//!
//! Hosts are looked up in a hash map (exact names) and then in a short list of wildcard
//! suffixes, so matching does not grow with the catalog; only the tools of one host are
//! compared by method and path template, most specific template first.

use crate::target::{Scheme, Target};
use std::collections::HashMap;
use std::sync::Arc;

/// A compiled path template such as `/v1/charges/{id}` or `/repos/{owner}/{*rest}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    trailing_slash: bool,
    source: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

impl PathTemplate {
    /// Compile a template. Literal segments are normalised like request paths.
    pub fn parse(t: &str) -> Result<Self, String> {
        if !t.starts_with('/') {
            return Err(format!("path template {t:?} must start with '/'"));
        }
        let mut segments = Vec::new();
        let parts: Vec<&str> = t.split('/').filter(|s| !s.is_empty()).collect();
        for (i, p) in parts.iter().enumerate() {
            if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if let Some(rest) = name.strip_prefix('*') {
                    if i + 1 != parts.len() {
                        return Err(format!("{{*{rest}}} must be the last segment of {t:?}"));
                    }
                    segments.push(Segment::Rest(rest.to_string()));
                } else if name.is_empty() || name.contains(['{', '}']) {
                    return Err(format!("bad parameter in {t:?}"));
                } else {
                    segments.push(Segment::Param(name.to_string()));
                }
            } else if p.contains(['{', '}']) {
                return Err(format!("segment {p:?} of {t:?} mixes text and a parameter"));
            } else {
                let norm = crate::target::normalise_path(&format!("/{p}"))
                    .map_err(|e| format!("{t:?}: {e}"))?;
                if norm.matches('/').count() != 1 {
                    return Err(format!("{t:?}: dot segments are not allowed in templates"));
                }
                segments.push(Segment::Literal(norm[1..].to_string()));
            }
        }
        Ok(Self {
            segments,
            trailing_slash: t.len() > 1 && t.ends_with('/'),
            source: t.to_string(),
        })
    }

    /// Does a normalised path match? Returns captured parameters on success.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        self.matches_with(path, false)
    }

    /// [`matches`](Self::matches), comparing literal segments ASCII-case-insensitively when
    /// `fold_case` (for tools whose upstream routes that way: Express, ASP.NET).
    pub fn matches_with<'p>(&self, path: &'p str, fold_case: bool) -> Option<Vec<(&str, &'p str)>> {
        let mut caps = Vec::new();
        let body = path.strip_prefix('/')?;
        let has_trailing = body.ends_with('/') && !body.is_empty();
        let body = body.strip_suffix('/').unwrap_or(body);
        let mut parts = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect::<Vec<_>>()
        };
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Rest(name) => {
                    if parts.len() <= i {
                        return None;
                    }
                    let start = parts[..i].iter().map(|p| p.len() + 1).sum::<usize>() + 1;
                    caps.push((name.as_str(), &path[start..]));
                    parts.clear();
                    return Some(caps);
                }
                Segment::Literal(l) => {
                    let p = parts.get(i)?;
                    if !(*p == l.as_str() || (fold_case && p.eq_ignore_ascii_case(l))) {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    let v = *parts.get(i)?;
                    caps.push((name.as_str(), v));
                }
            }
        }
        if parts.len() != self.segments.len() || has_trailing != self.trailing_slash {
            return None;
        }
        Some(caps)
    }

    /// Higher is more specific: literals beat parameters, parameters beat a rest capture.
    fn specificity(&self) -> (usize, usize, usize) {
        let lits = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let rest = self.segments.iter().any(|s| matches!(s, Segment::Rest(_)));
        (usize::from(!rest), lits, self.segments.len())
    }

    /// The template text.
    pub fn as_str(&self) -> &str {
        &self.source
    }
}

/// Host part of a tool match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exact host name or IP.
    Exact(String),
    /// `*.example.com`: one or more labels before the suffix (stored as `.example.com`).
    Wildcard(String),
}

/// One compiled match rule of a tool.
#[derive(Clone, Debug)]
pub struct MatchRule {
    /// Index of the tool in the snapshot's tool list.
    pub tool: usize,
    /// Host pattern.
    pub host: HostPattern,
    /// Explicit port, or `None` for the scheme's default.
    pub port: Option<u16>,
    /// Scheme restriction.
    pub scheme: Option<Scheme>,
    /// Allowed methods (empty = any).
    pub methods: Vec<http::Method>,
    /// Path template (None = any path).
    pub path: Option<PathTemplate>,
    /// MCP tool name, for JSON-RPC `tools/call`.
    pub mcp_tool: Option<String>,
    /// Literal path segments match whatever their ASCII case (`request.pathCaseInsensitive`).
    pub path_case_insensitive: bool,
    /// `;` parameters are stripped from path segments before matching
    /// (`request.pathParams`); without it a `;` stays part of the segment.
    pub path_params: bool,
}

impl MatchRule {
    fn port_ok(&self, t: &Target) -> bool {
        match self.port {
            Some(p) => p == t.port,
            None => t.port == t.scheme.default_port(),
        }
    }

    fn path_ok(&self, t: &Target) -> bool {
        let Some(p) = &self.path else {
            return true;
        };
        if self.path_params && t.path.contains(';') {
            let stripped = crate::target::strip_path_params(&t.path);
            return p
                .matches_with(&stripped, self.path_case_insensitive)
                .is_some();
        }
        p.matches_with(&t.path, self.path_case_insensitive)
            .is_some()
    }

    fn http_matches(&self, t: &Target) -> bool {
        self.mcp_tool.is_none()
            && self.port_ok(t)
            && self.scheme.is_none_or(|s| s == t.scheme)
            && (self.methods.is_empty() || self.methods.contains(&t.method))
            && self.path_ok(t)
    }
}

/// What the catalog found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMatch {
    /// A plain HTTP tool (index into the snapshot's tools).
    Tool(usize),
    /// The host serves MCP tools; the body decides which (see [`Catalog::match_mcp`]).
    Mcp,
    /// Nothing matched.
    None,
}

/// The compiled catalog.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    exact: HashMap<String, Arc<[MatchRule]>>,
    wildcard: Vec<(String, Arc<[MatchRule]>)>,
}

impl Catalog {
    /// Build from rules. Rules of one host are ordered most specific first.
    pub fn new(rules: Vec<MatchRule>) -> Self {
        let mut exact: HashMap<String, Vec<MatchRule>> = HashMap::new();
        let mut wild: HashMap<String, Vec<MatchRule>> = HashMap::new();
        for r in rules {
            match &r.host {
                HostPattern::Exact(h) => exact.entry(h.clone()).or_default().push(r),
                HostPattern::Wildcard(s) => wild.entry(s.clone()).or_default().push(r),
            }
        }
        let order = |v: &mut Vec<MatchRule>| {
            v.sort_by(|a, b| {
                let sa = a
                    .path
                    .as_ref()
                    .map(|p| p.specificity())
                    .unwrap_or((0, 0, 0));
                let sb = b
                    .path
                    .as_ref()
                    .map(|p| p.specificity())
                    .unwrap_or((0, 0, 0));
                sb.cmp(&sa)
                    .then(b.methods.is_empty().cmp(&a.methods.is_empty()).reverse())
            })
        };
        let exact = exact
            .into_iter()
            .map(|(k, mut v)| {
                order(&mut v);
                (k, Arc::from(v))
            })
            .collect();
        // Longest suffix first, so `*.eu.example.com` wins over `*.example.com`.
        let mut wildcard: Vec<(String, Arc<[MatchRule]>)> = wild
            .into_iter()
            .map(|(k, mut v)| {
                order(&mut v);
                (k, Arc::from(v))
            })
            .collect();
        wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
        Self { exact, wildcard }
    }

    fn rules_for<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a MatchRule> + 'a {
        let exact = self.exact.get(host).map(|r| r.iter()).into_iter().flatten();
        let wild = self
            .wildcard
            .iter()
            .filter(move |(suffix, _)| host.len() > suffix.len() && host.ends_with(suffix.as_str()))
            .flat_map(|(_, r)| r.iter());
        exact.chain(wild)
    }

    /// Is any tool served on this host and port? (CONNECT and transparent mode ask this
    /// before any TLS.)
    pub fn host_known(&self, host: &str, port: u16, scheme: Scheme) -> bool {
        self.rules_for(host).any(|r| match r.port {
            Some(p) => p == port,
            None => port == scheme.default_port(),
        })
    }

    /// Indices of the tools served on this host and port.
    pub fn tools_on(&self, host: &str, port: u16, scheme: Scheme) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .rules_for(host)
            .filter(|r| r.port.unwrap_or(scheme.default_port()) == port)
            .filter(|r| r.scheme.is_none_or(|s| s == scheme))
            .map(|r| r.tool)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Match a target to a tool by host, port, method and path.
    pub fn match_target(&self, t: &Target) -> RouteMatch {
        let mut mcp = false;
        for r in self.rules_for(&t.host) {
            if r.http_matches(t) {
                return RouteMatch::Tool(r.tool);
            }
            if r.mcp_tool.is_some() && r.port_ok(t) && r.path_ok(t) {
                mcp = true;
            }
        }
        if mcp {
            RouteMatch::Mcp
        } else {
            RouteMatch::None
        }
    }

    /// Match an MCP `tools/call` by tool name on this target's host.
    pub fn match_mcp(&self, t: &Target, name: &str) -> Option<usize> {
        self.rules_for(&t.host)
            .find(|r| r.mcp_tool.as_deref() == Some(name) && r.port_ok(t))
            .map(|r| r.tool)
    }

    /// MCP tool names served on this host (for filtering `tools/list`).
    pub fn mcp_tools_on<'a>(&'a self, t: &'a Target) -> Vec<&'a str> {
        self.rules_for(&t.host)
            .filter(|r| r.port_ok(t))
            .filter_map(|r| r.mcp_tool.as_deref())
            .collect()
    }
}

/// Parse a config host (`name[:port]`, `*.suffix`, IP) into a pattern and optional port.
pub fn parse_host_pattern(host: &str) -> Result<(HostPattern, Option<u16>), String> {
    let (name, port) = if host.starts_with('[') {
        let (h, p) =
            crate::target::parse_authority(host, Scheme::Http).map_err(|e| e.to_string())?;
        let explicit = host.rsplit_once("]:").map(|_| p);
        return Ok((HostPattern::Exact(h), explicit));
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("invalid port in host {host:?}"))?,
                ),
            ),
            None => (host, None),
        }
    };
    if let Some(suffix) = name.strip_prefix("*.") {
        let s = crate::target::normalise_host(suffix).map_err(|e| e.to_string())?;
        return Ok((HostPattern::Wildcard(format!(".{s}")), port));
    }
    let h = crate::target::normalise_host(name).map_err(|e| e.to_string())?;
    Ok((HostPattern::Exact(h), port))
}

#[cfg(test)]
mod tests;
