//! The library's layers only point down: read from the `crate::` paths of `src/`, outside
//! test code, as the module map in `src/lib.rs` draws them.
//!
//! A module may use its own layer's modules and lower layers'; no chain of uses may come
//! back to where it started. A new top-level module must be given a layer here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top: each top-level module of `src/` and its layer.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "contracts",
        &[
            "error",
            "secret",
            "deadline",
            "schema",
            "prompt",
            "image_spec",
        ],
    ),
    (
        "parts",
        &[
            "normalize",
            "text",
            "labels",
            "retry",
            "batch_stop",
            "aws",
            "storage",
            "urls",
            "provider",
            "cache",
            "story",
            "events",
            "metrics",
            "queue",
            "telemetry",
            "allocator",
        ],
    ),
    ("configuration", &["config"]),
    ("service", &["service", "cast", "batch", "queued_story"]),
    ("shells", &["lambda"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The code of a file without its unit tests (everything from a `#[cfg(test)]` line
/// on, where a file's tests live) and without comments (doc links are not uses).
fn code_outside_tests(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let without_comment = line.split("//").next().unwrap_or("");
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// Every `crate::name` in `code`.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue; // `some_crate::`, not `crate::`
        }
        let rest = &code[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.insert(name);
        }
    }
    names
}

/// Module → the other top-level modules it uses.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let first = first.to_string_lossy();
        if first == "bin" || first == "lib.rs" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let code = code_outside_tests(&std::fs::read_to_string(&file).unwrap());
        let uses = graph.entry(module.clone()).or_default();
        for used in crate_paths(&code) {
            // `crate::Stage3Error` and the like are re-exports at the root, not modules.
            let is_module = src.join(&used).is_dir() || src.join(format!("{used}.rs")).is_file();
            if used != module && is_module {
                uses.insert(used);
            }
        }
    }
    graph
}

/// A cycle through `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_form_no_import_cycle() {
    let graph = module_graph();
    assert!(graph.len() > 10, "read too few modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
}

#[test]
fn every_use_points_to_the_same_layer_or_below() {
    let graph = module_graph();
    let mut violations = Vec::new();
    for (module, uses) in &graph {
        let Some(from) = layer_of(module) else {
            violations.push(format!("{module} has no layer in tests/layers.rs"));
            continue;
        };
        for used in uses {
            match layer_of(used) {
                Some(to) if to <= from => {}
                Some(to) => violations.push(format!(
                    "{module} ({}) uses {used} ({}), a layer above it",
                    LAYERS[from].0, LAYERS[to].0
                )),
                None => violations.push(format!("{used} has no layer in tests/layers.rs")),
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_checks_see_a_cycle_and_an_upward_use() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("schema", &["error"][..]),
        ("error", &["story"][..]),
        ("story", &["schema"][..]),
    ]
    .into_iter()
    .map(|(module, uses)| {
        (
            module.to_string(),
            uses.iter().map(|u| u.to_string()).collect(),
        )
    })
    .collect();
    let cycle = find_cycle(&graph).expect("a cycle");
    assert_eq!(cycle.first(), cycle.last());
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    assert!(layer_of("error") < layer_of("story"));
    assert_eq!(
        crate_paths("use crate::schema::X; use aws_crate::y; crate::story::f()"),
        ["schema", "story"].iter().map(|s| s.to_string()).collect()
    );
}
