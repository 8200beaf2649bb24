//! The redaction implementation before issue 16, kept verbatim as the test oracle: the
//! compiled [`super::Redactor`] must produce exactly what this produces (see `tests.rs`).
//! Five `replace_all` passes per string, patterns recompiled per call, a cloned tree.

use crate::config::RedactionConfig;
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

static EMAIL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").expect("regex"));
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(?:\d[ -]?){12,18}\d\b").expect("regex"));
static SSN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d{3}-\d{2}-\d{4}\b").expect("regex"));
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?:\+\d{1,3}[ .-]?)?\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b").expect("regex")
});
static BEARER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}|\b(sk|rk|pk)_(live|test)_[A-Za-z0-9]{8,}",
    )
    .expect("regex")
});

/// Mask PII in one string.
pub(crate) fn redact_str(s: &str, cfg: &RedactionConfig, extra: &[Regex]) -> String {
    let mut out = s.to_string();
    if cfg.pii {
        out = BEARER.replace_all(&out, "[REDACTED:token]").into_owned();
        out = EMAIL.replace_all(&out, "[REDACTED:email]").into_owned();
        out = SSN.replace_all(&out, "[REDACTED:ssn]").into_owned();
        out = CARD
            .replace_all(&out, |c: &regex::Captures<'_>| {
                let digits: String = c[0].chars().filter(char::is_ascii_digit).collect();
                if luhn(&digits) {
                    "[REDACTED:card]".to_string()
                } else {
                    c[0].to_string()
                }
            })
            .into_owned();
        out = PHONE.replace_all(&out, "[REDACTED:phone]").into_owned();
    }
    for re in extra {
        out = re.replace_all(&out, "[REDACTED]").into_owned();
    }
    out
}

/// Luhn checksum of a digit string.
fn luhn(digits: &str) -> bool {
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

/// Redact a JSON value: configured field names are masked wherever they appear, and every
/// string is scanned for PII.
pub(crate) fn redact_value(v: &Value, cfg: &RedactionConfig, extra: &[Regex]) -> Value {
    match v {
        Value::String(s) => Value::String(redact_str(s, cfg, extra)),
        Value::Array(a) => Value::Array(a.iter().map(|x| redact_value(x, cfg, extra)).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    if cfg.fields.iter().any(|f| f.eq_ignore_ascii_case(k)) {
                        (k.clone(), Value::String("[REDACTED]".into()))
                    } else {
                        (k.clone(), redact_value(x, cfg, extra))
                    }
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Redact a policy input document for the audit record: drop configured headers, mask PII.
pub(crate) fn redact_input(input: &Value, cfg: &RedactionConfig) -> Value {
    if input.is_null() {
        return Value::Null;
    }
    let extra: Vec<Regex> = cfg
        .patterns
        .iter()
        .filter_map(|p| Regex::new(p).ok())
        .collect();
    let mut v = input.clone();
    if let Some(h) = v
        .pointer_mut("/request/headers")
        .and_then(Value::as_object_mut)
    {
        for name in &cfg.headers {
            h.remove(&name.to_ascii_lowercase());
        }
        for name in crate::policy::SECRET_HEADERS {
            h.remove(*name);
        }
    }
    redact_value(&v, cfg, &extra)
}
