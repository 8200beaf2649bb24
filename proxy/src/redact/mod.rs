//! Redaction of what is recorded and logged: credentials and auth headers are removed, and
//! emails, card numbers (Luhn-checked), SSNs, phone numbers and bearer tokens in string values
//! are masked. `input_hash` is computed before this, on the unredacted canonical input.
//!
//! A [`Redactor`] is compiled once per snapshot (the configured patterns included). A string
//! is scanned once by a `RegexSet` of every pattern; only a string with a match goes through
//! the masking passes, in the fixed order (token, email, SSN, card, phone, configured), each
//! pass seeing the previous passes' masks — exactly the semantics of the implementation kept
//! in `oracle.rs`, which a generated corpus in `tests.rs` checks it against. The audit record's
//! input is serialised straight from the policy input, masking on the way: no clone, no second
//! tree.

#[cfg(test)]
mod oracle;
#[cfg(test)]
mod tests;

use crate::config::RedactionConfig;
use regex::{Regex, RegexSet};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::Value;
use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

const EMAIL: &str = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}";
const CARD: &str = r"\b(?:\d[ -]?){12,18}\d\b";
const SSN: &str = r"\b\d{3}-\d{2}-\d{4}\b";
const PHONE: &str = r"(?:\+\d{1,3}[ .-]?)?\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b";
const BEARER: &str =
    r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}|\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]{8,}";

/// The built-in passes in the order they run, with their masks (`None`: Luhn-checked card).
static PII: LazyLock<Vec<(Regex, Option<&'static str>)>> = LazyLock::new(|| {
    [
        (BEARER, Some("[REDACTED:token]")),
        (EMAIL, Some("[REDACTED:email]")),
        (SSN, Some("[REDACTED:ssn]")),
        (CARD, None),
        (PHONE, Some("[REDACTED:phone]")),
    ]
    .into_iter()
    .map(|(p, mask)| (Regex::new(p).expect("built-in redaction pattern"), mask))
    .collect()
});

/// Redaction compiled from a [`RedactionConfig`]: build once (per snapshot), use per call.
#[derive(Debug)]
pub struct Redactor {
    pii: bool,
    /// Configured patterns that compile (an invalid one is ignored, as it always was;
    /// config validation reports it).
    extra: Vec<Regex>,
    /// Every active pattern: a string none of them matches is recorded as it is.
    any: Option<RegexSet>,
    fields: Vec<String>,
    /// Header names removed from `request.headers`, in removal order.
    drop_headers: Vec<String>,
}

impl Redactor {
    /// Compile `cfg`.
    pub fn new(cfg: &RedactionConfig) -> Self {
        let extra: Vec<Regex> = cfg
            .patterns
            .iter()
            .filter_map(|p| Regex::new(p).ok())
            .collect();
        let mut all: Vec<&str> = Vec::new();
        if cfg.pii {
            all.extend([BEARER, EMAIL, SSN, CARD, PHONE]);
        }
        all.extend(extra.iter().map(Regex::as_str));
        // A set that cannot be built (size limits) only loses the fast path.
        let any = RegexSet::new(&all).ok();
        let drop_headers = cfg
            .headers
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .chain(crate::policy::SECRET_HEADERS.iter().map(|h| h.to_string()))
            .collect();
        Self {
            pii: cfg.pii,
            extra,
            any,
            fields: cfg.fields.clone(),
            drop_headers,
        }
    }

    /// Mask PII and the configured patterns in one string; borrowed when nothing matched.
    pub fn redact_str<'a>(&self, s: &'a str) -> Cow<'a, str> {
        if let Some(set) = &self.any {
            if !set.is_match(s) {
                return Cow::Borrowed(s);
            }
        }
        let mut out = Cow::Borrowed(s);
        if self.pii {
            for (re, mask) in PII.iter() {
                let replaced = match mask {
                    Some(m) => re.replace_all(&out, *m),
                    None => re.replace_all(&out, |c: &regex::Captures<'_>| {
                        let digits: String = c[0].chars().filter(char::is_ascii_digit).collect();
                        if luhn(&digits) {
                            "[REDACTED:card]".to_string()
                        } else {
                            c[0].to_string()
                        }
                    }),
                };
                if let Cow::Owned(o) = replaced {
                    out = Cow::Owned(o);
                }
            }
        }
        for re in &self.extra {
            if let Cow::Owned(o) = re.replace_all(&out, "[REDACTED]") {
                out = Cow::Owned(o);
            }
        }
        out
    }

    fn masks_field(&self, key: &str) -> bool {
        self.fields.iter().any(|f| f.eq_ignore_ascii_case(key))
    }

    /// Redact a value in place: configured field names masked wherever they appear, every
    /// string scanned for PII.
    pub fn redact_value_in_place(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(o) = self.redact_str(s) {
                    *s = o;
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.redact_value_in_place(x)),
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if self.masks_field(k) {
                        *x = Value::String("[REDACTED]".into());
                    } else {
                        self.redact_value_in_place(x);
                    }
                }
            }
            _ => {}
        }
    }

    /// A redacted copy of a policy input document (approval previews).
    pub fn redact_input(&self, input: &Value) -> Value {
        if input.is_null() {
            return Value::Null;
        }
        let mut v = input.clone();
        if let Some(h) = v
            .pointer_mut("/request/headers")
            .and_then(Value::as_object_mut)
        {
            for name in &self.drop_headers {
                h.remove(name);
            }
        }
        self.redact_value_in_place(&mut v);
        v
    }

    /// The policy input as recorded: redacted and serialised in one walk, straight from the
    /// input (no copy of the tree). Shared by a call's decision and outcome records.
    pub fn record_input(&self, input: &Value) -> RecordedInput {
        if input.is_null() {
            return RecordedInput::default();
        }
        let json = serde_json::to_string(&Top { v: input, r: self })
            .expect("serialising a JSON value cannot fail");
        RecordedInput(Some(json.into()))
    }
}

/// The redacted policy input of an audit record, already serialised (`null` when absent).
/// The audit writer splices the text into the record's line as it is; serialising it through
/// serde (anything but the writer) parses it back first.
#[derive(Clone, Debug, Default)]
pub struct RecordedInput(Option<Arc<str>>);

impl RecordedInput {
    /// The JSON text (`null` when absent).
    pub fn json(&self) -> &str {
        self.0.as_deref().unwrap_or("null")
    }

    /// Whether there is no input (`null`).
    pub fn is_null(&self) -> bool {
        self.0.is_none()
    }

    /// Parsed back into a value (tests, tools).
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.json()).unwrap_or(Value::Null)
    }
}

impl PartialEq for RecordedInput {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Serialize for RecordedInput {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for RecordedInput {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::from(&Value::deserialize(d)?))
    }
}

impl From<&Value> for RecordedInput {
    /// An input recorded as it is (no redaction).
    fn from(v: &Value) -> Self {
        if v.is_null() {
            return Self::default();
        }
        Self(Some(v.to_string().into()))
    }
}

/// The document root: `request.headers` loses the dropped headers.
struct Top<'a> {
    v: &'a Value,
    r: &'a Redactor,
}

/// Any value below the root.
struct Masked<'a> {
    v: &'a Value,
    r: &'a Redactor,
}

/// The object at `/request` (its `headers` are filtered) or `/request/headers`.
struct Level<'a> {
    m: &'a serde_json::Map<String, Value>,
    r: &'a Redactor,
    depth: u8,
}

impl Serialize for Top<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.v {
            Value::Object(m) => Level {
                m,
                r: self.r,
                depth: 0,
            }
            .serialize(s),
            other => Masked {
                v: other,
                r: self.r,
            }
            .serialize(s),
        }
    }
}

impl Serialize for Level<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The entries in the order the tree would have after `Map::remove` (a swap-remove
        // under `preserve_order`) of each dropped header: the order the records always had.
        let mut entries: Vec<(&String, &Value)> = self.m.iter().collect();
        if self.depth == 2 {
            for name in &self.r.drop_headers {
                if let Some(i) = entries.iter().position(|(k, _)| *k == name) {
                    entries.swap_remove(i);
                }
            }
        }
        let mut map = s.serialize_map(Some(entries.len()))?;
        for (k, v) in entries {
            map.serialize_key(k)?;
            if self.r.masks_field(k) {
                map.serialize_value("[REDACTED]")?;
                continue;
            }
            let next = match (self.depth, k.as_str(), v) {
                (0, "request", Value::Object(m)) => Some((m, 1)),
                (1, "headers", Value::Object(m)) => Some((m, 2)),
                _ => None,
            };
            match next {
                Some((m, depth)) => map.serialize_value(&Level {
                    m,
                    r: self.r,
                    depth,
                })?,
                None => map.serialize_value(&Masked { v, r: self.r })?,
            }
        }
        map.end()
    }
}

impl Serialize for Masked<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.v {
            Value::String(x) => s.serialize_str(&self.r.redact_str(x)),
            Value::Array(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for x in a {
                    seq.serialize_element(&Masked { v: x, r: self.r })?;
                }
                seq.end()
            }
            Value::Object(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, x) in m {
                    map.serialize_key(k)?;
                    if self.r.masks_field(k) {
                        map.serialize_value("[REDACTED]")?;
                    } else {
                        map.serialize_value(&Masked { v: x, r: self.r })?;
                    }
                }
                map.end()
            }
            other => other.serialize(s),
        }
    }
}

/// Luhn checksum of a digit string.
pub fn luhn(digits: &str) -> bool {
    if digits.len() < 13 || digits.len() > 19 {
        return false;
    }
    let mut sum = 0;
    for (i, c) in digits.bytes().rev().enumerate() {
        let mut d = u32::from(c - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum % 10 == 0
}

/// Redact a policy input document with a one-off [`Redactor`] (callers without a snapshot).
pub fn redact_input(input: &Value, cfg: &RedactionConfig) -> Value {
    Redactor::new(cfg).redact_input(input)
}
