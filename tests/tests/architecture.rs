//! The import-direction invariants of ARCHITECTURE.md, checked on the source tree: no crate
//! has an import circle between its top-level modules, and only the endpoint's `store/` knows
//! sled or SQL. The compiler checks direction between crates; inside a crate only a test like
//! this one does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every crate's `src/` whose module graph must stay acyclic.
const CRATE_SOURCES: &[&str] = &[
    "firmware/src",
    "agent/src",
    "cloud-sync/src",
    "cloud-sync/rating/src",
    "cloud-sync/protocol/src",
    "tests/support/src",
];

/// Names that only the endpoint's store may use: its database libraries.
const STORE_ONLY: &[&str] = &["sled::", "tokio_postgres", "deadpool_postgres"];

/// The endpoint modules the store may import; anything above it (configuration, services,
/// routes, exporters) it must not know.
const STORE_MAY_IMPORT: &[&str] = &["store", "negcache"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its test module and comments: what the crate itself imports.
fn production_code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
    &s[..end]
}

/// The top-level modules of the crate that `code` names through `crate::`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b, c::{..}}`: the first segment of each path at depth 0.
            let (mut depth, mut start) = (0usize, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && !c.is_whitespace() => {
                        out.insert(ident_at(&group[j..]).to_owned());
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident_at(rest).to_owned());
        }
    }
    out.retain(|m| m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    out
}

/// Top-level module → the other top-level modules its files import.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel.components().next().expect("a component").as_os_str().to_string_lossy();
        let top = first.trim_end_matches(".rs").to_owned();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("a readable source file");
        let code = production_code(&text);
        let mut refs = crate_refs(&code);
        if rel.components().count() == 1 {
            // In a top-level file, `super::x` is the crate root's `x`.
            for (i, _) in code.match_indices("super::") {
                refs.insert(ident_at(&code[i + "super::".len()..]).to_owned());
            }
        }
        refs.remove(&top);
        graph.entry(top).or_default().extend(refs);
    }
    let names: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|r| names.contains(r));
    }
    graph
}

/// A cycle through `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        graph: &BTreeMap<String, BTreeSet<String>>,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn no_crate_has_an_import_circle_between_its_modules() {
    for src in CRATE_SOURCES {
        let graph = module_graph(&workspace().join(src));
        assert!(graph.len() > 1, "{src}: no modules found");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{src}: import circle {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn only_the_store_knows_sled_or_sql() {
    let src = workspace().join("cloud-sync/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files.iter().filter(|f| !f.starts_with(src.join("store"))) {
        let code = production_code(&std::fs::read_to_string(file).expect("readable"));
        for name in STORE_ONLY {
            assert!(!code.contains(name), "{} names {name}: only cloud-sync/src/store/ may", file.display());
        }
    }
    let graph = module_graph(&src);
    let store = graph.get("store").expect("a store module");
    for m in store {
        assert!(STORE_MAY_IMPORT.contains(&m.as_str()), "store/ imports crate::{m}, which is above it");
    }
}

#[test]
fn the_checker_finds_circles_and_grouped_imports() {
    let refs = crate_refs("use crate::{a::X, b, c::{d, e::F}};\nfn f() { crate::g::h() }");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["a", "b", "c", "g"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["c".to_owned()]));
    graph.insert("c".to_owned(), BTreeSet::new());
    assert_eq!(find_cycle(&graph), None);
    graph.get_mut("c").expect("c").insert("a".to_owned());
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    assert_eq!(production_code("use x; // crate::y\n#[cfg(test)]\nmod tests { crate::z }"), "use x; ");
}
