//! No import cycles between the modules of `proxy/src`. For every module with children (the
//! crate root, and each folder such as `pipeline/` or `audit/`), the children form a graph:
//! an edge `a → b` when code inside `a` names `crate::…::b` (or `super::b`, `self::b` from
//! the parent's own file). A cycle in any of those graphs fails the test, naming it and one
//! reference per edge.
//!
//! The source is read by a small scanner rather than a full parser: comments, string and
//! char literals and `#[cfg(test)]` items (test modules, inline or in their own files) are
//! skipped; `use` groups (`crate::{a, b::c}`) are expanded. A child's reference to its own
//! parent's items is not an edge (the parent is not one of the children).
//!
//! [`KNOWN`] lists the back edges that still close cycles today, each with what should move;
//! they are left out of the graph, and the test also fails when one of them is gone, so the
//! list only shrinks. Any other cycle fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Back edges still to remove: `(parent, from, to)`, with the item that should move. Without
/// them the graphs are acyclic; in the crate root the layers run, bottom up, config and target
/// → snapshot → refusal → identify, killswitch, pins, canonical → idempotency → limits → meter
/// → upstream → approval, audit → state → control → intercept → pipeline → runtime → cli.
const KNOWN: &[(&str, &str, &str)] = &[
    // Types the snapshot holds, defined beside their users: `CallOptions`, `Runs` and `Pin`
    // move into `snapshot` (or below it).
    ("", "snapshot", "canonical"),
    ("", "snapshot", "identify"),
    ("", "snapshot", "pins"),
    // `upstream::forward::{json_response, response_headers}` build the proxy's own answers
    // and belong in `body`, once `identify::RUN_HEADER` sits below `refusal` (identify.rs is
    // being changed on another branch now).
    ("", "refusal", "upstream"),
    ("", "idempotency", "upstream"),
    // The Redis connection is shared by limits and idempotency: its own module.
    ("", "idempotency", "limits"),
    // A kill switch's voided approvals are reported to the operator from `state`: the report
    // belongs to the caller in `control`, or `state` takes a hook.
    ("", "state", "control"),
    // The tunnel hands requests to the pipeline while the pipeline reads `intercept`'s
    // targets and tunnels: those belong in `target`.
    ("", "intercept", "pipeline"),
    // `finish` calls `respond::answered`, which wires the stream's end back into
    // `finish::body_ended`: pass `body_ended` in (pipeline/finish.rs is being changed on
    // another branch now).
    ("pipeline", "respond", "finish"),
];

/// A module path below the crate root, e.g. `["pipeline", "gates"]`; the root is `[]`.
type ModPath = Vec<String>;

/// One source file: its module path and its text.
struct File {
    module: ModPath,
    display: String,
    text: String,
}

/// Where `from → to` is first seen.
type Edges = BTreeMap<(ModPath, String, String), String>;

#[test]
fn proxy_modules_have_no_import_cycles() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = load(&src);
    assert!(
        files.len() > 50,
        "expected the proxy's source files under {}, found {}",
        src.display(),
        files.len()
    );
    let edges = edges(&files);
    // `MODULE_GRAPH=1` prints the graph (one edge a line, with where it is first seen).
    if std::env::var_os("MODULE_GRAPH").is_some() {
        for ((parent, a, b), at) in &edges {
            println!("{}: {a} -> {b}  ({at})", parent.join("::"));
        }
    }
    // The scanner sees the edges it must: the pipeline calls into the stages.
    assert!(
        edges.contains_key(&(vec![], "pipeline".into(), "stages".into())),
        "the scanner missed pipeline → stages"
    );
    let mut edges = edges;
    let gone: Vec<String> = KNOWN
        .iter()
        .filter(|(parent, a, b)| {
            let parent: ModPath = if parent.is_empty() {
                vec![]
            } else {
                parent.split("::").map(String::from).collect()
            };
            edges
                .remove(&(parent, a.to_string(), b.to_string()))
                .is_none()
        })
        .map(|(p, a, b)| format!("{p}: {a} → {b}"))
        .collect();
    let cycles = cycles(&edges);
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
    assert!(
        gone.is_empty(),
        "these known back edges are gone: remove them from KNOWN: {gone:?}"
    );
}

/// The scanner and the cycle search on a small crate with a cycle three modules long (one
/// edge through a `use` group, one through `super::`), a test-only back edge that must be
/// ignored, and a commented one.
#[test]
fn a_cycle_is_found_and_named() {
    let f = |module: &[&str], text: &str| File {
        module: module.iter().map(|s| s.to_string()).collect(),
        display: module.join("/"),
        text: text.into(),
    };
    let files = vec![
        f(&[], "pub mod a; pub mod b; pub mod c; pub mod d;"),
        f(&["a"], "use crate::{b::X, d};\n// crate::c::Y\nfn f() {}"),
        f(&["b"], "pub mod inner;"),
        f(
            &["b", "inner"],
            "fn g() { super::super::c::h(); let s = \"crate::a\"; }",
        ),
        f(
            &["c"],
            "pub fn h() { crate::a::f(); }\n#[cfg(test)]\nmod tests { use crate::d::Z; }",
        ),
        f(
            &["d"],
            "#[cfg(test)] use crate::a;\nconst C: char = '\"'; fn k<'a>() { crate::b::X; }",
        ),
    ];
    let edges = edges(&files);
    let got: BTreeSet<(String, String)> = edges
        .keys()
        .filter(|(p, _, _)| p.is_empty())
        .map(|(_, a, b)| (a.clone(), b.clone()))
        .collect();
    let want: BTreeSet<(String, String)> =
        [("a", "b"), ("a", "d"), ("b", "c"), ("c", "a"), ("d", "b")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    assert_eq!(got, want);
    let cycles = cycles(&edges);
    assert_eq!(cycles.len(), 1, "{cycles:?}");
    assert!(
        cycles[0].starts_with("crate: a → b → c → a"),
        "{}",
        cycles[0]
    );
}

/// Every `.rs` file under `src` except `main.rs` (its own crate) and files of `#[cfg(test)]`
/// modules.
fn load(src: &Path) -> Vec<File> {
    let mut paths = Vec::new();
    walk(src, &mut paths);
    let mut files: Vec<File> = paths
        .into_iter()
        .filter(|p| p != &src.join("main.rs"))
        .map(|p| {
            let rel = p.strip_prefix(src).unwrap();
            let mut module: ModPath = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            File {
                module,
                display: rel.display().to_string(),
                text: std::fs::read_to_string(&p).unwrap(),
            }
        })
        .collect();
    let test_modules: BTreeSet<ModPath> = files
        .iter()
        .flat_map(|f| {
            test_module_decls(&f.text).into_iter().map(move |name| {
                let mut m = f.module.clone();
                m.push(name);
                m
            })
        })
        .collect();
    files.retain(|f| !test_modules.iter().any(|t| f.module.starts_with(t)));
    files
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The edges between siblings, for every parent module.
fn edges(files: &[File]) -> Edges {
    let modules: BTreeSet<&ModPath> = files.iter().map(|f| &f.module).collect();
    let mut out = Edges::new();
    for f in files {
        let code = strip(&f.text);
        for (line, path) in references(&code, &f.module) {
            // The longest known module the reference names.
            let Some(target) = (1..=path.len())
                .rev()
                .map(|n| path[..n].to_vec())
                .find(|p| modules.contains(p))
            else {
                continue;
            };
            // The deepest common parent: `from` and `to` are its children.
            let common = f
                .module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common >= f.module.len() || common >= target.len() {
                continue; // a module naming itself, a descendant or an ancestor
            }
            let key = (
                f.module[..common].to_vec(),
                f.module[common].clone(),
                target[common].clone(),
            );
            out.entry(key)
                .or_insert_with(|| format!("{}:{line}: crate::{}", f.display, path.join("::")));
        }
    }
    out
}

/// Every cycle, one per strongly connected component: its shortest cycle through its first
/// module, with where each edge is, and the whole component, e.g.
/// `crate: a → b → a (a → b at a.rs:3: crate::b::X; b → a at …) [component: a, b]`.
fn cycles(edges: &Edges) -> Vec<String> {
    let mut by_parent: BTreeMap<&ModPath, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (parent, a, b) in edges.keys() {
        by_parent
            .entry(parent)
            .or_default()
            .entry(a)
            .or_default()
            .insert(b);
    }
    let mut out = Vec::new();
    for (parent, graph) in by_parent {
        let reach: BTreeMap<&str, BTreeSet<&str>> =
            graph.keys().map(|&n| (n, reachable(&graph, n))).collect();
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        for &start in graph.keys() {
            if seen.contains(start) || !reach[start].contains(start) {
                continue;
            }
            let component: Vec<&str> = reach[start]
                .iter()
                .copied()
                .filter(|m| reach.get(m).is_some_and(|r| r.contains(start)))
                .collect();
            seen.extend(component.iter().copied());
            let cycle = shortest_cycle(&graph, start);
            let name = if parent.is_empty() {
                "crate".to_string()
            } else {
                format!("crate::{}", parent.join("::"))
            };
            let sites: Vec<String> = cycle
                .windows(2)
                .map(|w| {
                    let at = &edges[&(parent.clone(), w[0].to_string(), w[1].to_string())];
                    format!("{} → {} at {at}", w[0], w[1])
                })
                .collect();
            out.push(format!(
                "{name}: {} ({}) [component: {}]",
                cycle.join(" → "),
                sites.join("; "),
                component.join(", ")
            ));
        }
    }
    out
}

/// Every module reachable from `start` in one or more steps.
fn reachable<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![start];
    while let Some(n) = stack.pop() {
        for &m in graph.get(n).into_iter().flatten() {
            if seen.insert(m) {
                stack.push(m);
            }
        }
    }
    seen
}

/// The shortest path from `start` back to itself (breadth first; `start` is on a cycle),
/// `start` at both ends.
fn shortest_cycle<'a>(
    graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
    start: &'a str,
) -> Vec<&'a str> {
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &m in graph.get(n).into_iter().flatten() {
            if m == start {
                let mut chain = vec![start];
                let mut at = n;
                while at != start {
                    chain.push(at);
                    at = prev[at];
                }
                chain.push(start);
                chain.reverse();
                return chain;
            }
            if !prev.contains_key(m) {
                prev.insert(m, n);
                queue.push_back(m);
            }
        }
    }
    vec![start]
}

/// Names of `#[cfg(test)] mod NAME;` declarations (test modules in their own files).
fn test_module_decls(text: &str) -> Vec<String> {
    let code = strip_comments_and_literals(text);
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("#[cfg(test)]") {
        rest = &rest[i + "#[cfg(test)]".len()..];
        let item = skip_attributes(rest);
        let words: Vec<&str> = item
            .split(|c: char| c.is_whitespace() || c == ';' || c == '{')
            .filter(|w| !w.is_empty())
            .take(3)
            .collect();
        let (kw, name) = match words.as_slice() {
            ["mod", name, ..] => (true, *name),
            [vis, "mod", name] if vis.starts_with("pub") => (true, *name),
            _ => (false, ""),
        };
        let decl_ends = item.find(';');
        let block = item.find('{');
        if kw && decl_ends.is_some_and(|s| block.is_none_or(|b| s < b)) {
            out.push(name.to_string());
        }
    }
    out
}

/// The code with comments, literals and `#[cfg(test)]` items blanked (newlines kept, so line
/// numbers stay right).
fn strip(text: &str) -> String {
    let code = strip_comments_and_literals(text);
    let mut out: Vec<char> = code.chars().collect();
    let marker: Vec<char> = "#[cfg(test)]".chars().collect();
    let mut i = 0;
    while i + marker.len() <= out.len() {
        if out[i..i + marker.len()] != marker[..] {
            i += 1;
            continue;
        }
        // Blank the attribute, any further attributes, then the item: up to its `;` or the
        // end of its first brace block, whichever closes it.
        let mut j = i + marker.len();
        let mut depth = 0usize;
        let mut brackets = 0usize;
        while j < out.len() {
            match out[j] {
                '[' => brackets += 1,
                ']' => brackets = brackets.saturating_sub(1),
                '{' if brackets == 0 => depth += 1,
                '}' if brackets == 0 => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                ';' if depth == 0 && brackets == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let end = j.min(out.len());
        for c in &mut out[i..end] {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = j;
    }
    out.into_iter().collect()
}

fn skip_attributes(mut s: &str) -> &str {
    loop {
        s = s.trim_start();
        if !s.starts_with("#[") {
            return s;
        }
        let mut depth = 0;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s = &s[end..];
    }
}

/// Comments and string/char literals replaced by spaces (newlines kept).
fn strip_comments_and_literals(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, s: &[char]| {
        for &ch in s {
            out.push(if ch == '\n' { '\n' } else { ' ' });
        }
    };
    let mut i = 0;
    while i < c.len() {
        let rest = &c[i..];
        let starts = |p: &str| rest.iter().take(p.len()).copied().eq(p.chars());
        if starts("//") {
            let end = rest.iter().position(|&x| x == '\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if starts("/*") {
            // Block comments nest.
            let (mut depth, mut j) = (0usize, 0usize);
            while j < rest.len() {
                if rest[j..].starts_with(&['/', '*']) {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(&['*', '/']) {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j.min(rest.len())]);
            i += j;
        } else if let Some(len) = raw_string_len(rest) {
            blank(&mut out, &rest[..len]);
            i += len;
        } else if rest[0] == '"' || (rest[0] == 'b' && rest.get(1) == Some(&'"')) {
            let open = if rest[0] == 'b' { 2 } else { 1 };
            let mut j = open;
            while j < rest.len() && rest[j] != '"' {
                j += if rest[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            let len = if rest.get(1) == Some(&'\\') {
                rest.iter().skip(2).position(|&x| x == '\'').map(|p| p + 3)
            } else if rest.get(2) == Some(&'\'') {
                Some(3)
            } else {
                None
            };
            match len {
                Some(len) => {
                    blank(&mut out, &rest[..len.min(rest.len())]);
                    i += len;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    out
}

/// `r"…"`, `r#"…"#`, `br##"…"##`: the literal's length if one starts here.
fn raw_string_len(rest: &[char]) -> Option<usize> {
    let mut j = match rest {
        ['r', ..] => 1,
        ['b', 'r', ..] => 2,
        _ => return None,
    };
    let hashes = rest[j..].iter().take_while(|&&x| x == '#').count();
    j += hashes;
    if rest.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < rest.len() {
        if rest[j] == '"'
            && rest[j + 1..]
                .iter()
                .take(hashes)
                .filter(|&&x| x == '#')
                .count()
                == hashes
        {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(rest.len())
}

/// Every module path the code names from the crate root, with its line: `crate::a::b`,
/// `super::…` and `self::…` resolved against `module`, `use` groups expanded.
fn references(code: &str, module: &ModPath) -> Vec<(usize, ModPath)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < c.len() {
        if c[i] == '\n' {
            line += 1;
            i += 1;
            continue;
        }
        let boundary =
            i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_' || c[i - 1] == ':');
        if boundary && (c[i].is_alphabetic() || c[i] == '_') {
            let (word, after) = ident(&c, i);
            let base: Option<ModPath> = match word.as_str() {
                "crate" => Some(Vec::new()),
                "super" | "self" => Some(module.clone()),
                _ => None,
            };
            if let Some(mut base) = base {
                let mut j = after;
                if word == "super" {
                    base.pop();
                }
                // Further `super::` segments.
                while starts_with(&c, j, "::super") {
                    base.pop();
                    j += "::super".len();
                }
                for p in paths(&c, j, base) {
                    out.push((line, p));
                }
            }
            i = after;
            continue;
        }
        i += 1;
    }
    out
}

/// The paths that continue at `c[j..]` (`::a::b`, `::{a, b::c}`), prefixed with `base`.
fn paths(c: &[char], mut j: usize, base: ModPath) -> Vec<ModPath> {
    let mut path = base;
    loop {
        if !starts_with(c, j, "::") {
            return if path.is_empty() { vec![] } else { vec![path] };
        }
        j += 2;
        while j < c.len() && c[j].is_whitespace() {
            j += 1;
        }
        if j < c.len() && c[j] == '{' {
            // A group: each comma-separated member at depth one.
            let mut out = Vec::new();
            let mut k = j + 1;
            loop {
                while k < c.len() && (c[k].is_whitespace() || c[k] == ',') {
                    k += 1;
                }
                if k >= c.len() || c[k] == '}' {
                    break;
                }
                let (word, after) = ident(c, k);
                if word.is_empty() {
                    k += 1;
                    continue;
                }
                let mut member = path.clone();
                if word != "self" {
                    member.push(word);
                }
                let sub = paths(c, after, member.clone());
                out.extend(if sub.is_empty() { vec![member] } else { sub });
                // Skip to the next member at this depth.
                let mut depth = 0;
                k = after;
                while k < c.len() {
                    match c[k] {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => break,
                        _ => {}
                    }
                    k += 1;
                }
            }
            return out;
        }
        let (word, after) = ident(c, j);
        if word.is_empty() {
            return if path.is_empty() { vec![] } else { vec![path] };
        }
        path.push(word);
        j = after;
    }
}

fn ident(c: &[char], i: usize) -> (String, usize) {
    let mut j = i;
    while j < c.len() && (c[j].is_alphanumeric() || c[j] == '_') {
        j += 1;
    }
    (c[i..j].iter().collect(), j)
}

fn starts_with(c: &[char], j: usize, p: &str) -> bool {
    c.len() >= j + p.len() && c[j..j + p.len()].iter().copied().eq(p.chars())
}
