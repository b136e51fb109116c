//! The crate's dependencies run one way (docs/architecture.md): the layer on the
//! engine, the engine on the store, the store on entries and keys; the policy is a
//! leaf and the breaker generic. Checked over the `crate::` paths of every source file,
//! so that a new import against the grain fails here rather than in review.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules its code names through `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The module a file belongs to: `src/store/redis/keys.rs` → `store`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative
        .components()
        .next()?
        .as_os_str()
        .to_str()?
        .to_owned();
    let name = first.trim_end_matches(".rs").to_owned();
    (name != "lib").then_some(name)
}

/// Every `crate::name` in the file's code (comments and doc comments left out), and
/// whether one names a root re-export (`crate::HybridCache`), which would hide the
/// module it comes from.
fn named_modules(text: &str) -> (BTreeSet<String>, Vec<String>) {
    let mut modules = BTreeSet::new();
    let mut root_paths = Vec::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                root_paths.push(line.trim().to_owned());
            } else if !name.is_empty() {
                modules.insert(name);
            }
        }
    }
    (modules, root_paths)
}

fn graph() -> (Graph, Vec<String>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph = Graph::new();
    let mut root_paths = Vec::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let (named, roots) = named_modules(&text);
        root_paths.extend(
            roots
                .into_iter()
                .map(|line| format!("{}: {line}", file.display())),
        );
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(named.into_iter().filter(|name| *name != module));
    }
    (graph, root_paths)
}

fn reaches(graph: &Graph, from: &str, to: &str, seen: &mut BTreeSet<String>) -> bool {
    let Some(edges) = graph.get(from) else {
        return false;
    };
    edges
        .iter()
        .any(|next| next == to || (seen.insert(next.clone()) && reaches(graph, next, to, seen)))
}

#[test]
fn no_two_modules_depend_on_each_other_even_through_others() {
    let (graph, _) = graph();
    assert!(graph.len() >= 10, "{graph:?}");
    for module in graph.keys() {
        assert!(
            !reaches(&graph, module, module, &mut BTreeSet::new()),
            "{module} depends on itself through {:?}",
            graph[module]
        );
    }
}

#[test]
fn each_part_depends_only_on_the_parts_below_it() {
    let (graph, _) = graph();
    // What each module may name; anything else is against the grain.
    let allowed: &[(&str, &[&str])] = &[
        ("policy", &[]),
        ("telemetry", &[]),
        ("random", &[]),
        ("key", &["policy"]),
        ("entry", &["policy", "random"]),
        ("error", &["entry"]),
        ("breaker", &["telemetry"]),
        (
            "store",
            &["breaker", "entry", "error", "key", "random", "telemetry"],
        ),
        (
            "engine",
            &["breaker", "entry", "error", "key", "store", "telemetry"],
        ),
        ("layer", &["engine", "entry", "key", "policy", "telemetry"]),
    ];
    for (module, may) in allowed {
        let names = graph.get(*module).cloned().unwrap_or_default();
        let against: Vec<_> = names
            .iter()
            .filter(|n| !may.contains(&n.as_str()))
            .collect();
        assert!(against.is_empty(), "{module} names {against:?}");
    }
}

#[test]
fn code_names_modules_not_root_re_exports() {
    let (_, root_paths) = graph();
    assert!(root_paths.is_empty(), "{root_paths:#?}");
}
