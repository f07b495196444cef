//! The layering the code keeps (docs/architecture.md, "Crates"): the machine crate below the
//! sessions, and inside each of the two crates modules that import in one direction. The
//! compiler enforces the crate boundaries; this test keeps the modules from growing a circle
//! again (a parent module and its own children may see each other).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crate_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join(name)
}

/// The workspace crates `name`'s Cargo.toml depends on (normal dependencies).
fn ftvm_dependencies(name: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(crate_dir(name).join("Cargo.toml")).unwrap();
    let mut in_deps = false;
    let mut deps = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
        } else if in_deps && line.starts_with("ftvm-") {
            deps.insert(line.split(['.', ' ', '=']).next().unwrap().to_string());
        }
    }
    deps
}

/// Each top-level module of a crate (`vcpu` for `vcpu/mod.rs` and everything under it) and the
/// top-level modules it names with `crate::`.
fn module_imports(krate: &str) -> BTreeMap<String, BTreeSet<String>> {
    let src = crate_dir(krate).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top =
                rel.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
            if top == "lib" {
                continue; // the crate root declares and re-exports every module
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // A module's unit tests may use whatever they need to set it up.
            let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or_default();
            let uses = graph.entry(top.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let name: String =
                    text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                if !name.is_empty() && name != top && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    uses.insert(name);
                }
            }
        }
    }
    // Names that are not modules of this crate (re-exports at the root, functions).
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for uses in graph.values_mut() {
        uses.retain(|u| modules.contains(u));
    }
    graph
}

/// A circle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_machine_crate_is_below_the_sessions_the_pair_and_the_api() {
    let machine = ftvm_dependencies("ftvm-machine");
    for upper in ["ftvm-vmm", "ftvm-replication", "ftvm-api", "ftvm-bench"] {
        assert!(!machine.contains(upper), "ftvm-machine depends on {upper}: {machine:?}");
    }
    for lower in ["ftvm-events", "ftvm-devices", "ftvm-log"] {
        let deps = ftvm_dependencies(lower);
        for upper in ["ftvm-machine", "ftvm-vmm", "ftvm-replication", "ftvm-api"] {
            assert!(!deps.contains(upper), "{lower} depends on {upper}: {deps:?}");
        }
    }
    assert!(ftvm_dependencies("ftvm-vmm").contains("ftvm-machine"));
}

#[test]
fn modules_import_in_one_direction() {
    for krate in [
        "ftvm-machine",
        "ftvm-vmm",
        "ftvm-replication",
        "ftvm-events",
        "ftvm-api",
        "ftvm-devices",
        "ftvm-virtio",
        "ftvm-log",
    ] {
        let graph = module_imports(krate);
        assert!(graph.len() >= 2, "{krate}: {graph:?}");
        if let Some(cycle) = find_cycle(&graph) {
            panic!("{krate}: the modules import each other in a circle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_cycle_finder_finds_circles() {
    let g = |edges: &[(&str, &str)]| {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            m.entry(a.to_string()).or_default().insert(b.to_string());
            m.entry(b.to_string()).or_default();
        }
        m
    };
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(find_cycle(&g(&[("a", "b"), ("b", "c"), ("c", "a")])).map(|c| c.len()), Some(4));
}
