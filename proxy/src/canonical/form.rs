//! Strict `application/x-www-form-urlencoded` bodies and query strings.
//!
//! One grammar for both: `&`-separated `name=value` pairs, `+` for space, `%XX` escapes.
//! `a[b]=1` nests into an object and `a[]=1` appends to an array, as Rack, PHP and Express's
//! `qs` read them, so a field is visible under its base name whichever way the upstream
//! groups it. Refused, because parsers disagree: a malformed escape (kept literally by some,
//! an error for others), bytes that are not UTF-8 after decoding (replaced by some, decoded as
//! Latin-1 by others), a raw `;` (a pair separator to older Python and Java parsers), an empty
//! field name, a field that is both a value and an object, and names of one object that
//! differ only in case. A repeated plain field is refused in a body (frameworks take the
//! first, the last or all of them) and kept as an array of every value in a query, where
//! repeating is common and the whole array is decided on.

use super::keys::fold_key;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// What a repeated plain field becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repeats {
    /// Refused (form bodies).
    Refuse,
    /// An array of all values, in order (query strings).
    Array,
}

/// Split and decode the pairs of a form or query, strictly (see the module docs).
pub fn pairs(input: &[u8]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for pair in input.split(|&b| b == b'&') {
        if pair.is_empty() {
            continue;
        }
        if pair.contains(&b';') {
            return Err(
                "raw ';' in a field (some parsers split pairs on it); encode it as %3B".into(),
            );
        }
        let (name, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        let name = decode_component(name)?;
        if name.is_empty() {
            return Err("a field without a name".into());
        }
        out.push((name, decode_component(value)?));
    }
    Ok(out)
}

fn decode_component(raw: &[u8]) -> Result<String, String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                bytes.push(b' ');
                i += 1;
            }
            b'%' => {
                let hex = raw
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .filter(|_| raw[i + 1].is_ascii_hexdigit() && raw[i + 2].is_ascii_hexdigit())
                    .ok_or_else(|| "malformed percent escape".to_string())?;
                bytes.push(hex);
                i += 3;
            }
            b => {
                bytes.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(bytes).map_err(|_| "a field that is not UTF-8 after decoding".into())
}

/// Build the structured view of decoded pairs.
pub(super) fn structure(
    pairs: &[(String, String)],
    repeats: Repeats,
) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    for (k, v) in pairs {
        let (head, path) =
            split_brackets(k).ok_or_else(|| format!("malformed field name {k:?}"))?;
        super::reject_override_field(head).map_err(|e| e.to_string())?;
        insert_path(&mut root, head, &path, coerce(v), repeats)
            .map_err(|e| format!("field {k:?}: {e}"))?;
    }
    check_case(&root)?;
    Ok(root)
}

/// Parse a form body into an object (repeated plain fields refused).
pub fn parse_form(body: &[u8]) -> Result<Map<String, Value>, String> {
    structure(&pairs(body)?, Repeats::Refuse)
}

/// Canonical integers (no sign but `-`, no leading zero, at most 15 digits) become numbers,
/// so that a schema saying `integer` and a policy comparing amounts read the value every
/// upstream reads; anything else stays a string.
fn coerce(v: &str) -> Value {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let canonical = !digits.is_empty()
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits.starts_with('0') && digits.len() > 1)
        && v != "-0";
    match canonical.then(|| v.parse::<i64>().ok()).flatten() {
        Some(n) => Value::from(n),
        None => Value::String(v.to_owned()),
    }
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
        let seg = &inner[..close];
        if seg.contains('[') {
            return None;
        }
        path.push(seg);
        rest = &inner[close + 1..];
    }
    (!head.is_empty()).then_some((head, path))
}

fn insert_path(
    obj: &mut Map<String, Value>,
    key: &str,
    path: &[&str],
    value: Value,
    repeats: Repeats,
) -> Result<(), String> {
    match path.split_first() {
        None => match (obj.get_mut(key), repeats) {
            (None, _) => {
                obj.insert(key.to_owned(), value);
                Ok(())
            }
            (Some(_), Repeats::Refuse) => Err("repeated field".into()),
            (Some(Value::Array(a)), Repeats::Array) => {
                a.push(value);
                Ok(())
            }
            (Some(Value::Object(_)), Repeats::Array) => {
                Err("field is both a value and an object".into())
            }
            (Some(prev), Repeats::Array) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, value]);
                Ok(())
            }
        },
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
            insert_path(child, next, rest, value, repeats)
        }
    }
}

/// Refuse names of one object that differ only in case, at every level.
pub(super) fn check_case(m: &Map<String, Value>) -> Result<(), String> {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for (k, v) in m {
        if let Some(prev) = seen.insert(fold_key(k), k) {
            return Err(format!("fields {prev:?} and {k:?} differ only in case"));
        }
        if let Value::Object(child) = v {
            check_case(child)?;
        }
    }
    Ok(())
}

/// Serialise a parsed form object back to a body: `a=1`, `a[b]=1`, `a[]=1`. The inverse of
/// [`parse_form`] on every value it returns (see the property test).
pub fn serialize_form(m: &Map<String, Value>) -> Result<String, String> {
    let mut s = form_urlencoded::Serializer::new(String::new());
    fn scalar(v: &Value) -> Result<String, String> {
        match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!("a form field cannot carry {other}")),
        }
    }
    fn walk(
        s: &mut form_urlencoded::Serializer<'_, String>,
        name: &str,
        v: &Value,
    ) -> Result<(), String> {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    walk(s, &format!("{name}[{k}]"), v)?;
                }
            }
            Value::Array(a) => {
                for v in a {
                    s.append_pair(&format!("{name}[]"), &scalar(v)?);
                }
            }
            v => {
                s.append_pair(name, &scalar(v)?);
            }
        }
        Ok(())
    }
    for (k, v) in m {
        walk(&mut s, k, v)?;
    }
    Ok(s.finish())
}

/// Re-encode decided query pairs.
pub(super) fn serialize_pairs(pairs: &[(String, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}
