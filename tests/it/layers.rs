//! The library's layers point one way: a module imports only modules of its own layer or
//! below (`docs/architecture.md` draws them), and the command line (clap) stays in the binary.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "vocabulary",
        &["dtype", "error", "progress", "noise", "text"],
    ),
    (
        "checkpoint I/O",
        &["checkpoint", "convert", "hashing", "device"],
    ),
    ("arch", &["arch"]),
    ("engines", &["merge", "lora", "gen", "synth", "inspect"]),
    ("store", &["store"]),
    ("node kinds", &["nodes"]),
    ("recipe", &["recipe"]),
    ("build", &["build"]),
    ("report", &["report"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The top-level module a library file belongs to (`None` for the binary's files).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.iter().next()?.to_str()?.trim_end_matches(".rs");
    match first {
        "main" | "cli" => None,
        m => Some(m.to_string()),
    }
}

/// The top-level modules a piece of code names through `crate::` (paths and `use` groups),
/// comments left out.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for part in group[..end].split(',') {
                    let name: String = part
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        }
    }
    out
}

#[test]
fn the_import_parser_reads_paths_and_groups() {
    let code = "use crate::{dtype::DType, error};\n// crate::build in a comment\nlet x = crate::store::Cache::new(p);";
    let found: Vec<String> = imports(code).into_iter().collect();
    assert_eq!(found, ["dtype", "error", "store"]);
}

#[test]
fn every_module_has_a_layer() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for line in lib.lines() {
        if let Some(m) = line
            .strip_prefix("pub mod ")
            .and_then(|l| l.strip_suffix(';'))
        {
            assert!(
                layer_of(m).is_some(),
                "module `{m}` has no layer in tests/it/layers.rs (and docs/architecture.md)"
            );
        }
    }
}

#[test]
fn lower_layers_do_not_import_higher_ones() {
    let mut violations = Vec::new();
    for file in files(&src()) {
        let Some(module) = module_of(&file) else {
            continue;
        };
        if module == "lib" {
            continue;
        }
        let own = layer_of(&module).unwrap_or_else(|| panic!("no layer for `{module}`"));
        let code = std::fs::read_to_string(&file).unwrap();
        for target in imports(&code) {
            if let Some(theirs) = layer_of(&target) {
                if theirs > own {
                    violations.push(format!(
                        "{}: {module} ({}) imports {target} ({})",
                        file.strip_prefix(src()).unwrap().display(),
                        LAYERS[own].0,
                        LAYERS[theirs].0
                    ));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_command_line_stays_in_the_binary() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    assert!(!lib.contains("mod cli"), "cli is a module of the binary");
    for file in files(&src()) {
        if module_of(&file).is_none() {
            continue;
        }
        let code = std::fs::read_to_string(&file).unwrap();
        assert!(
            !code.contains("clap::") && !code.contains("use clap"),
            "{} uses clap: parse arguments in src/cli/",
            file.display()
        );
    }
}
