//! What a Kubernetes API server checks when a CRD is created, run offline: the schema is
//! structural ([`crate::crd::structural_violations`]) and every `x-kubernetes-validations`
//! rule compiles. "Compiles" means what it means to the API server: the rule parses as CEL
//! (the [`cel`] crate's ANTLR parser, built from the CEL grammar, which like cel-go rejects
//! reserved identifiers), every identifier is declared (`self`, `oldSelf`, comprehension
//! variables, type names), every function exists, and every field selection names a property
//! of the schema node it is applied to — spelled the way Kubernetes exposes property names to
//! CEL, with reserved words escaped (`namespace` is `__namespace__`).
//!
//! It is not a full CEL type checker: operand types of operators and function overloads are
//! not checked, and a value whose schema is unknown (`x-kubernetes-preserve-unknown-fields`,
//! a function's result) accepts any selection. The checks cover the mistakes a schema change
//! or a typo makes, which is the class a real server found (`has(self.namespace)`).

use cel::common::ast::{Expr, IdedExpr};
use serde_json::Value;
use std::collections::HashMap;

/// Words Kubernetes escapes as `__word__` when a property has that name (apiserver
/// `pkg/cel/escaping.go`): CEL's reserved identifiers and `in`.
pub const RESERVED: &[&str] = &[
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
];

/// Functions and macros a Kubernetes CEL rule may call: the CEL standard library plus the
/// Kubernetes extension libraries (lists, strings, regex, URLs, IPs, quantities, sets).
const FUNCTIONS: &[&str] = &[
    // Standard library.
    "size",
    "has",
    "all",
    "exists",
    "exists_one",
    "map",
    "filter",
    "matches",
    "startsWith",
    "endsWith",
    "contains",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "bool",
    "duration",
    "timestamp",
    "type",
    "dyn",
    "getDate",
    "getDayOfMonth",
    "getDayOfWeek",
    "getDayOfYear",
    "getFullYear",
    "getHours",
    "getMilliseconds",
    "getMinutes",
    "getMonth",
    "getSeconds",
    // Kubernetes lists.
    "isSorted",
    "sum",
    "min",
    "max",
    "indexOf",
    "lastIndexOf",
    // Kubernetes strings (cel-go ext.Strings).
    "charAt",
    "format",
    "join",
    "lowerAscii",
    "upperAscii",
    "replace",
    "split",
    "substring",
    "trim",
    "reverse",
    "quote",
    // Kubernetes regex.
    "find",
    "findAll",
    // URLs.
    "url",
    "isURL",
    "getScheme",
    "getHost",
    "getHostname",
    "getPort",
    "getEscapedPath",
    "getQuery",
    // IPs and CIDRs.
    "ip",
    "isIP",
    "cidr",
    "isCIDR",
    "family",
    "isUnspecified",
    "isLoopback",
    "isLinkLocalMulticast",
    "isLinkLocalUnicast",
    "isGlobalUnicast",
    "ip.isCanonical",
    "containsIP",
    "containsCIDR",
    "prefixLength",
    "masked",
    // Quantities.
    "quantity",
    "isQuantity",
    "sign",
    "isInteger",
    "asInteger",
    "asApproximateFloat",
    "add",
    "sub",
    "isGreaterThan",
    "isLessThan",
    "compareTo",
    // Sets.
    "sets.contains",
    "sets.equivalent",
    "sets.intersects",
    // Optionals.
    "optional.of",
    "optional.none",
    "optional.ofNonZeroValue",
    "value",
    "hasValue",
    "orValue",
    "or",
];

/// Identifiers that name types, usable as values (`type(x) == string`).
const TYPE_NAMES: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "duration",
    "timestamp",
];

/// How Kubernetes spells a schema property name in CEL, or `None` if CEL cannot reach it.
pub fn escape(property: &str) -> Option<String> {
    if RESERVED.contains(&property) {
        return Some(format!("__{property}__"));
    }
    let mut chars = property.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || "_.-/".contains(c));
    if !first_ok
        || !property
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
    {
        return None;
    }
    Some(
        property
            .replace("__", "__underscores__")
            .replace('.', "__dot__")
            .replace('-', "__dash__")
            .replace('/', "__slash__"),
    )
}

/// What the checker knows about a value: its schema node, or nothing.
#[derive(Clone, Copy)]
enum Ty<'a> {
    Schema(&'a Value),
    Unknown,
}

struct Checker<'a> {
    vars: HashMap<String, Ty<'a>>,
}

impl<'a> Checker<'a> {
    fn check(&mut self, e: &IdedExpr) -> Result<Ty<'a>, String> {
        match &e.expr {
            Expr::Unspecified | Expr::Literal(_) => Ok(Ty::Unknown),
            Expr::Ident(name) => match self.vars.get(name) {
                Some(t) => Ok(*t),
                None if TYPE_NAMES.contains(&name.as_str()) => Ok(Ty::Unknown),
                None => Err(format!("undeclared reference to '{name}'")),
            },
            Expr::Select(s) => {
                let on = self.check(&s.operand)?;
                select(on, &s.field)
            }
            Expr::Call(c) => {
                let target = c.target.as_deref().map(|t| self.check(t)).transpose()?;
                let args = c
                    .args
                    .iter()
                    .map(|a| self.check(a))
                    .collect::<Result<Vec<_>, _>>()?;
                let operator = c.func_name.starts_with('_')
                    || c.func_name.starts_with('!')
                    || c.func_name.starts_with('-')
                    || c.func_name.starts_with('@');
                if !operator && !FUNCTIONS.contains(&c.func_name.as_str()) {
                    return Err(format!("undeclared reference to '{}'", c.func_name));
                }
                if c.func_name == "_[_]" {
                    if let Some(Ty::Schema(s)) = args.first() {
                        return Ok(element(s));
                    }
                }
                let _ = target;
                Ok(Ty::Unknown)
            }
            Expr::Comprehension(c) => {
                let range = self.check(&c.iter_range)?;
                let (first, second) = match range {
                    Ty::Schema(s) if s["type"] == "array" => (element(s), None),
                    Ty::Schema(s) if s["type"] == "object" => (Ty::Unknown, Some(element(s))),
                    _ => (Ty::Unknown, Some(Ty::Unknown)),
                };
                let saved = self.vars.clone();
                match &c.iter_var2 {
                    // Two-variable form: (index, element) or (key, value).
                    Some(v2) => {
                        self.vars.insert(c.iter_var.clone(), Ty::Unknown);
                        self.vars.insert(v2.clone(), second.unwrap_or(first));
                    }
                    None => {
                        self.vars.insert(c.iter_var.clone(), first);
                    }
                }
                let init = self.check(&c.accu_init);
                self.vars.insert(c.accu_var.clone(), Ty::Unknown);
                let out = init
                    .and_then(|_| self.check(&c.loop_cond))
                    .and_then(|_| self.check(&c.loop_step))
                    .and_then(|_| self.check(&c.result));
                self.vars = saved;
                out.map(|_| Ty::Unknown)
            }
            Expr::List(l) => {
                for x in &l.elements {
                    self.check(x)?;
                }
                Ok(Ty::Unknown)
            }
            Expr::Map(m) => {
                for x in &m.entries {
                    self.entry(&x.expr)?;
                }
                Ok(Ty::Unknown)
            }
            Expr::Struct(s) => {
                for x in &s.entries {
                    self.entry(&x.expr)?;
                }
                Ok(Ty::Unknown)
            }
        }
    }

    fn entry(&mut self, e: &cel::common::ast::EntryExpr) -> Result<(), String> {
        match e {
            cel::common::ast::EntryExpr::StructField(f) => self.check(&f.value).map(|_| ()),
            cel::common::ast::EntryExpr::MapEntry(m) => {
                self.check(&m.key)?;
                self.check(&m.value).map(|_| ())
            }
        }
    }
}

/// A list's item or a map's value schema.
fn element(s: &Value) -> Ty<'_> {
    match (s.get("items"), s.get("additionalProperties")) {
        (Some(i), _) if i.is_object() => Ty::Schema(i),
        (_, Some(a)) if a.is_object() => Ty::Schema(a),
        _ => Ty::Unknown,
    }
}

/// `operand.field` (also inside `has()`), resolved against the operand's schema.
fn select<'a>(on: Ty<'a>, field: &str) -> Result<Ty<'a>, String> {
    let Ty::Schema(s) = on else {
        return Ok(Ty::Unknown);
    };
    if s.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)) {
        return Ok(s
            .get("properties")
            .and_then(Value::as_object)
            .and_then(|p| p.iter().find(|(k, _)| escape(k).as_deref() == Some(field)))
            .map_or(Ty::Unknown, |(_, v)| Ty::Schema(v)));
    }
    match s.get("type").and_then(Value::as_str) {
        Some("object") => {}
        Some(other) => {
            return Err(format!(
                "type '{other}' does not support field selection ('{field}')"
            ))
        }
        None => return Ok(Ty::Unknown),
    }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        if let Some((_, v)) = props
            .iter()
            .find(|(k, _)| escape(k).as_deref() == Some(field))
        {
            return Ok(Ty::Schema(v));
        }
        let hint = props
            .keys()
            .find(|k| k.as_str() == field && escape(k).as_deref() != Some(field))
            .and_then(|k| escape(k))
            .map(|e| format!(" (a property named '{field}' is written '{e}' in CEL)"))
            .unwrap_or_default();
        return Err(format!("undefined field '{field}'{hint}"));
    }
    if let Some(ap) = s.get("additionalProperties").filter(|a| a.is_object()) {
        return Ok(Ty::Schema(ap));
    }
    Err(format!("undefined field '{field}'"))
}

/// Compile one rule against the schema node it is attached to (`self` and `oldSelf` both have
/// that node's schema; Kubernetes skips rules using `oldSelf` on create).
pub fn compile_rule(rule: &str, schema: &Value) -> Result<(), String> {
    let ast = cel::parser::Parser::new()
        .parse(rule)
        .map_err(|e| format!("compilation failed: {e}"))?;
    let mut c = Checker {
        vars: [
            ("self".to_string(), Ty::Schema(schema)),
            ("oldSelf".to_string(), Ty::Schema(schema)),
        ]
        .into(),
    };
    c.check(&ast)
        .map(|_| ())
        .map_err(|e| format!("compilation failed: {e}"))
}

/// Every rule that does not compile in one schema, as `path: rule: error`.
pub fn cel_violations(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(o) = schema.as_object() else {
        return;
    };
    if let Some(rules) = o.get("x-kubernetes-validations").and_then(Value::as_array) {
        for r in rules {
            let Some(rule) = r.get("rule").and_then(Value::as_str) else {
                out.push(format!(
                    "{path}: x-kubernetes-validations entry without rule"
                ));
                continue;
            };
            if let Err(e) = compile_rule(rule, schema) {
                out.push(format!("{path}: {rule}: {e}"));
            }
        }
    }
    if let Some(p) = o.get("properties").and_then(Value::as_object) {
        for (k, s) in p {
            cel_violations(s, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = o.get("items") {
        cel_violations(items, &format!("{path}[]"), out);
    }
    if let Some(ap) = o.get("additionalProperties").filter(|a| a.is_object()) {
        cel_violations(ap, &format!("{path}{{}}"), out);
    }
}

/// Everything a real API server would reject in a `CustomResourceDefinition` on create:
/// each served version's schema must be structural and its CEL rules must compile.
pub fn crd_violations(crd: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(versions) = crd["spec"]["versions"].as_array() else {
        return vec!["spec.versions: required".into()];
    };
    for v in versions {
        let name = v["name"].as_str().unwrap_or("?");
        let schema = &v["schema"]["openAPIV3Schema"];
        if schema.is_null() {
            out.push(format!(
                "spec.versions[{name}].schema.openAPIV3Schema: required"
            ));
            continue;
        }
        let path = format!("spec.versions[{name}].schema.openAPIV3Schema");
        crate::crd::structural_violations(schema, &path, &mut out);
        cel_violations(schema, &path, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Value {
        json!({"type": "object", "properties": {
            "all": {"type": "boolean"},
            "namespace": {"type": "string"},
            "tool": {"type": "string"},
            "x-y": {"type": "string"},
            "items": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        }})
    }

    #[test]
    fn reserved_property_names_must_be_escaped() {
        let s = scope();
        let e = compile_rule("self.all || has(self.namespace)", &s).unwrap_err();
        assert!(e.contains("undefined field 'namespace'"), "{e}");
        assert!(e.contains("__namespace__"), "{e}");
        compile_rule("self.all || has(self.__namespace__)", &s).unwrap();
        compile_rule("has(self.x__dash__y)", &s).unwrap();
        assert!(compile_rule("has(self.x_y)", &s).is_err());
    }

    #[test]
    fn typos_unknown_functions_and_variables_fail() {
        let s = scope();
        assert!(compile_rule("has(self.tol)", &s)
            .unwrap_err()
            .contains("'tol'"));
        assert!(compile_rule("sizee(self.items) > 0", &s).is_err());
        assert!(compile_rule("other.all", &s).is_err());
        assert!(compile_rule("self.all ||", &s).is_err(), "syntax error");
        assert!(
            compile_rule("self.tool.name == 'x'", &s).is_err(),
            "select on a string"
        );
        assert!(
            compile_rule("namespace == 'x'", &s).is_err(),
            "reserved identifier"
        );
    }

    #[test]
    fn comprehensions_maps_and_indexes_resolve_through_the_schema() {
        let s = scope();
        compile_rule("self.items.all(i, size(i.name) > 0)", &s).unwrap();
        assert!(compile_rule("self.items.all(i, has(i.nam))", &s).is_err());
        compile_rule("self.items[0].name != ''", &s).unwrap();
        compile_rule("self.labels.all(k, k.startsWith('a'))", &s).unwrap();
        compile_rule("self.labels.anything == 'x'", &s).unwrap();
        compile_rule("self == oldSelf", &s).unwrap();
        compile_rule("type(self.tool) == string", &s).unwrap();
    }

    #[test]
    fn escaping_matches_kubernetes() {
        assert_eq!(escape("namespace").unwrap(), "__namespace__");
        assert_eq!(escape("a.b").unwrap(), "a__dot__b");
        assert_eq!(escape("a__b").unwrap(), "a__underscores__b");
        assert_eq!(escape("a/b-c").unwrap(), "a__slash__b__dash__c");
        assert_eq!(escape("1abc"), None);
        assert_eq!(escape("tenant").unwrap(), "tenant");
    }
}
