//! Reading the tool input from a buffered body: JSON, form-urlencoded or MCP JSON-RPC.
//!
//! Parsing is strict where parsers disagree in the wild: duplicate JSON keys, nesting deeper
//! than [`MAX_DEPTH`], numbers that lose precision as doubles, and repeated form fields are
//! refused, so the policy and the upstream can never see two different values.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// Deepest JSON nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Largest integer magnitude that survives a round trip through an IEEE double.
const MAX_SAFE_INT: f64 = 9_007_199_254_740_991.0;

/// The body kind, decided by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    Empty,
    /// `application/json` or `+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    /// Anything else: forwarded opaque, not visible to schema or policy.
    Opaque,
}

/// Classify a request body by its content type. An absent type with a body is treated as JSON
/// (agents' SDKs often omit it), and must then parse as JSON.
pub fn body_kind(content_type: Option<&str>, body: &[u8]) -> BodyKind {
    if body.is_empty() {
        return BodyKind::Empty;
    }
    let Some(ct) = content_type else {
        return BodyKind::Json;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        BodyKind::Json
    } else if essence == "application/x-www-form-urlencoded" {
        BodyKind::Form
    } else {
        BodyKind::Opaque
    }
}

/// Parse JSON strictly (see module docs).
pub fn parse_json(body: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = StrictValue::deserialize_with_depth(&mut de, 0)
        .map_err(|e| format!("body is not valid JSON: {e}"))?;
    de.end()
        .map_err(|e| format!("body is not valid JSON: {e}"))?;
    Ok(v)
}

struct StrictValue;

impl StrictValue {
    fn deserialize_with_depth<'de, D: Deserializer<'de>>(
        d: D,
        depth: usize,
    ) -> Result<Value, D::Error> {
        d.deserialize_any(StrictVisitor { depth })
    }
}

struct StrictVisitor {
    depth: usize,
}

struct Nested(usize);

impl<'de> de::DeserializeSeed<'de> for Nested {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        StrictValue::deserialize_with_depth(d, self.0)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        if (v as f64).abs() > MAX_SAFE_INT {
            return Err(E::custom("integer too large to be represented exactly"));
        }
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        if v as f64 > MAX_SAFE_INT {
            return Err(E::custom("integer too large to be represented exactly"));
        }
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        if !v.is_finite() || v.abs() > MAX_SAFE_INT {
            return Err(E::custom("number too large to be represented exactly"));
        }
        Ok(serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH}"
            )));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Nested(self.depth + 1))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH}"
            )));
        }
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Nested(self.depth + 1))?;
            if out.insert(k.clone(), v).is_some() {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
        }
        Ok(Value::Object(out))
    }
}

/// Parse a form body (or a query string) into an object. `a[b]=1` nests, `a[]=1&a[]=2` makes
/// an array, a repeated plain field is refused. Canonical integers become numbers so that a
/// schema saying `integer` and a policy comparing amounts read the value the upstream will.
pub fn parse_form(body: &[u8]) -> Result<Value, String> {
    let mut root = Map::new();
    for (k, v) in form_urlencoded::parse(body) {
        let value = coerce_form_value(&v);
        let (head, path) =
            split_brackets(&k).ok_or_else(|| format!("malformed form field name {k:?}"))?;
        insert_path(&mut root, head, &path, value).map_err(|e| format!("form field {k:?}: {e}"))?;
    }
    Ok(Value::Object(root))
}

fn coerce_form_value(v: &str) -> Value {
    let canonical_int = !v.is_empty()
        && v.len() <= 15
        && v.trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
        && !v.trim_start_matches('-').is_empty()
        && !(v.trim_start_matches('-').starts_with('0') && v.trim_start_matches('-').len() > 1);
    if canonical_int {
        if let Ok(n) = v.parse::<i64>() {
            return Value::from(n);
        }
    }
    Value::String(v.to_owned())
}

fn split_brackets(k: &str) -> Option<(&str, Vec<&str>)> {
    let Some(open) = k.find('[') else {
        return Some((k, Vec::new()));
    };
    let head = &k[..open];
    let mut rest = &k[open..];
    let mut path = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        path.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    (!head.is_empty()).then_some((head, path))
}

fn insert_path(
    obj: &mut Map<String, Value>,
    key: &str,
    path: &[&str],
    value: Value,
) -> Result<(), String> {
    match path.split_first() {
        None => {
            if obj.contains_key(key) {
                return Err("repeated field".into());
            }
            obj.insert(key.to_owned(), value);
            Ok(())
        }
        Some((&"", rest)) => {
            if !rest.is_empty() {
                return Err("nested arrays are not supported".into());
            }
            let arr = obj
                .entry(key.to_owned())
                .or_insert_with(|| Value::Array(Vec::new()));
            arr.as_array_mut()
                .ok_or("field is both a value and an array")?
                .push(value);
            Ok(())
        }
        Some((next, rest)) => {
            let child = obj
                .entry(key.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            let child = child
                .as_object_mut()
                .ok_or("field is both a value and an object")?;
            insert_path(child, next, rest, value)
        }
    }
}

/// A JSON-RPC request that MCP servers accept.
#[derive(Clone, Debug, PartialEq)]
pub enum McpCall {
    /// `tools/call` with its tool name, arguments and id.
    ToolsCall {
        /// MCP tool name.
        name: String,
        /// `params.arguments` (the tool input).
        arguments: Value,
        /// JSON-RPC id (absent for notifications).
        id: Value,
    },
    /// `tools/list`.
    ToolsList {
        /// JSON-RPC id.
        id: Value,
    },
    /// Any other method (initialize, ping, notifications…): host-level policy only.
    Other {
        /// Method name.
        method: String,
        /// JSON-RPC id.
        id: Value,
    },
}

/// Read a single JSON-RPC message as an MCP call, if it is one.
pub fn mcp_call(v: &Value) -> Result<Option<McpCall>, String> {
    let Some(o) = v.as_object() else {
        return Ok(None);
    };
    if o.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Ok(None);
    }
    let method = o
        .get("method")
        .and_then(Value::as_str)
        .ok_or("JSON-RPC message without a method")?;
    let id = o.get("id").cloned().unwrap_or(Value::Null);
    Ok(Some(match method {
        "tools/call" => {
            let params = o
                .get("params")
                .and_then(Value::as_object)
                .ok_or("tools/call without params")?;
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .ok_or("tools/call without params.name")?;
            let arguments = params
                .get("arguments")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new()));
            McpCall::ToolsCall {
                name: name.to_owned(),
                arguments,
                id,
            }
        }
        "tools/list" => McpCall::ToolsList { id },
        m => McpCall::Other {
            method: m.to_owned(),
            id,
        },
    }))
}

/// Validate an input against a compiled schema; errors are `path: message` lines.
pub fn validate(schema: &jsonschema::Validator, input: &Value) -> Result<(), Vec<String>> {
    let errors: Vec<String> = schema
        .iter_errors(input)
        .take(20)
        .map(|e| {
            let path = e.instance_path().to_string();
            if path.is_empty() {
                e.to_string()
            } else {
                format!("{path}: {e}")
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_is_strict() {
        assert_eq!(
            parse_json(br#"{"a":1,"b":[1,2]}"#).unwrap(),
            json!({"a":1,"b":[1,2]})
        );
        assert!(parse_json(br#"{"amount":1,"amount":900}"#)
            .unwrap_err()
            .contains("duplicate"));
        assert!(parse_json(br#"{"a":{"b":1,"b":2}}"#).is_err());
        assert!(parse_json(b"{\"a\":1} x").is_err());
        assert!(parse_json(br#"{"amount": 100000000000000000000001}"#).is_err());
        assert!(parse_json(br#"{"amount": 1e400}"#).is_err());
        assert_eq!(
            parse_json(br#"{"amount": 1.2e3}"#).unwrap(),
            json!({"amount": 1200.0})
        );
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_json(deep.as_bytes()).unwrap_err().contains("nesting"));
        assert!(parse_json(b"not json").is_err());
    }

    #[test]
    fn forms_nest_and_refuse_repeats() {
        assert_eq!(
            parse_form(b"charge=ch_1&amount=1200&metadata[order]=7&expand[]=a&expand[]=b").unwrap(),
            json!({"charge":"ch_1","amount":1200,"metadata":{"order":7},"expand":["a","b"]})
        );
        assert!(parse_form(b"amount=1&amount=900").is_err());
        assert!(parse_form(b"a=1&a[b]=2").is_err());
        assert!(parse_form(b"a[b=1").is_err());
        assert_eq!(
            parse_form(b"amount=0012").unwrap(),
            json!({"amount":"0012"})
        );
        assert_eq!(parse_form(b"amount=1e3").unwrap(), json!({"amount":"1e3"}));
    }

    #[test]
    fn kinds_follow_content_type() {
        assert_eq!(
            body_kind(Some("application/json; charset=utf-8"), b"{}"),
            BodyKind::Json
        );
        assert_eq!(
            body_kind(Some("application/vnd.api+json"), b"{}"),
            BodyKind::Json
        );
        assert_eq!(
            body_kind(Some("application/x-www-form-urlencoded"), b"a=1"),
            BodyKind::Form
        );
        assert_eq!(body_kind(Some("text/plain"), b"a"), BodyKind::Opaque);
        assert_eq!(body_kind(None, b"{}"), BodyKind::Json);
        assert_eq!(body_kind(Some("application/json"), b""), BodyKind::Empty);
    }

    #[test]
    fn mcp_calls_are_recognised() {
        let v = json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"send_macro","arguments":{"body":"hi"}}});
        assert_eq!(
            mcp_call(&v).unwrap(),
            Some(McpCall::ToolsCall {
                name: "send_macro".into(),
                arguments: json!({"body":"hi"}),
                id: json!(3)
            })
        );
        assert_eq!(mcp_call(&json!({"a":1})).unwrap(), None);
        assert!(mcp_call(&json!({"jsonrpc":"2.0","method":"tools/call"})).is_err());
    }

    #[test]
    fn schema_errors_are_listed() {
        let schema = jsonschema::validator_for(&json!({"type":"object","required":["charge","amount"],"properties":{"amount":{"type":"integer"}}})).unwrap();
        assert!(validate(&schema, &json!({"charge":"c","amount":5})).is_ok());
        let errs = validate(&schema, &json!({"amount":"5"})).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("/amount")), "{errs:?}");
    }
}
