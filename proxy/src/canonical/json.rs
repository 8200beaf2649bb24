//! Strict JSON: one reading for every parser.
//!
//! Refused, because real parsers disagree on them: duplicate keys (most take the last, some
//! the first), keys of one object that differ only in case (Go's `encoding/json` matches
//! struct fields case-insensitively and takes the last: `amount` and `AMOUNT` are one field
//! there), nesting deeper than [`MAX_DEPTH`], numbers that do not survive a round trip
//! through an IEEE double (JavaScript and many JSON libraries read them as doubles), and
//! trailing bytes. serde_json already refuses lone surrogates, control characters in strings,
//! a byte-order mark and comments.

use super::keys::fold_key;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;

/// Deepest JSON nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Largest integer magnitude that survives a round trip through an IEEE double.
const MAX_SAFE_INT: f64 = 9_007_199_254_740_991.0;

/// Parse JSON strictly (see the module docs). The error text names the first problem.
pub fn parse_strict(body: &[u8]) -> Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let v = Level(0).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

struct Level(usize);

impl<'de> DeserializeSeed<'de> for Level {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Level {
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
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number is not finite"))
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
        if self.0 >= MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH}"
            )));
        }
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Level(self.0 + 1))? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        if self.0 >= MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nesting deeper than {MAX_DEPTH}"
            )));
        }
        let mut out = Map::new();
        let mut folded: HashMap<String, String> = HashMap::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Level(self.0 + 1))?;
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            if let Some(prev) = folded.insert(fold_key(&k), k.clone()) {
                return Err(de::Error::custom(format!(
                    "keys {prev:?} and {k:?} differ only in case"
                )));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}
