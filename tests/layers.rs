//! The crate's modules import downward only (ARCHITECTURE.md): each layer uses only the
//! layers below it, never one above, nor another module of its own layer. Checked on the
//! sources: every `crate::<module>` path outside comments and test modules, including
//! names the crate root re-exports (`crate::Error` is `error`'s).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers, lowest first.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["wire"],
    &["target"],
    &["runtime"],
    &["log", "sync"],
    &["process", "child"],
    &["pool"],
    &["node"],
];

/// The calls up, and why: the pre-main entry point (`.init_array`, in the unsafe
/// module) is where a child, or a node, starts, so it names their mains, as `main`
/// names a program's.
const ALLOWED: &[(&str, &str)] = &[
    ("src/target/sys.rs", "child"),
    ("src/target/sys.rs", "node"),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate-root names `lib.rs` re-exports, with the module each comes from.
fn reexports(lib: &str) -> HashMap<String, String> {
    let mut names = HashMap::new();
    let mut text = String::new();
    for line in lib.lines().map(str::trim) {
        if line.starts_with("pub use ") || !text.is_empty() {
            text.push_str(line);
            if line.ends_with(';') {
                let body = text.trim_start_matches("pub use ").trim_end_matches(';');
                if let Some((module, rest)) = body.split_once("::") {
                    let rest = rest.trim_start_matches('{').trim_end_matches('}');
                    for name in rest.split(',') {
                        let name = name.split(" as ").last().unwrap_or(name).trim();
                        if !name.is_empty() {
                            names.insert(name.to_owned(), module.to_owned());
                        }
                    }
                }
                text.clear();
            }
        }
    }
    names
}

/// `crate::<word>` paths in the code (comments and test modules left out).
fn crate_paths(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut in_tests = false;
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        if code.trim() == "#[cfg(test)]" {
            in_tests = true; // the test module runs to the end of the file
        }
        if in_tests {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let tail = &rest[at + "crate::".len()..];
            let word: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let before = rest[..at].chars().last();
            if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && !word.is_empty() {
                found.push((n + 1, word));
            }
            rest = tail;
        }
    }
    found
}

#[test]
fn modules_import_only_from_layers_below_them() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let names = reexports(&lib);
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in &files {
        let rel = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let Some(module) = rel
            .strip_prefix("src/")
            .and_then(|r| r.split('/').next())
            .map(|m| m.trim_end_matches(".rs"))
        else {
            continue;
        };
        // The crate root and the hidden fuzzing entry points sit above everything.
        let Some(mine) = layer_of(module) else {
            assert!(
                ["lib", "fuzz"].contains(&module),
                "{rel}: module `{module}` has no layer in LAYERS"
            );
            continue;
        };
        if rel.ends_with("/tests.rs") {
            continue;
        }
        let source = std::fs::read_to_string(file).unwrap();
        for (line, word) in crate_paths(&source) {
            let target = match layer_of(&word) {
                Some(_) => word.clone(),
                None => match names.get(&word) {
                    Some(m) => m.clone(),
                    None => panic!("{rel}:{line}: `crate::{word}` is no module or re-export"),
                },
            };
            checked += 1;
            if target == module {
                continue;
            }
            let Some(theirs) = layer_of(&target) else {
                wrong.push(format!("{rel}:{line}: uses `{target}`, which has no layer"));
                continue;
            };
            let allowed = ALLOWED.contains(&(rel.as_str(), target.as_str()));
            if theirs >= mine && !allowed {
                let how = if theirs == mine { "beside" } else { "above" };
                wrong.push(format!(
                    "{rel}:{line}: `{module}` uses `{target}` (`crate::{word}`), a layer {how} it"
                ));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} paths found: is the scan broken?"
    );
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_scan_sees_a_violation() {
    // The checker itself: a path up a layer, in code, is found; in a comment, it is not.
    let found = crate_paths(
        "use crate::pool::AsyncPool;\n// crate::child::boot\nlet x = crate::Error::Closed;",
    );
    assert_eq!(found, vec![(1, "pool".to_owned()), (3, "Error".to_owned())]);
    let names = reexports(
        "pub use error::{Error, ExitReason, Result};\npub use pool::{\n    Apply, AsyncPool,\n};",
    );
    assert_eq!(names.get("Error").map(String::as_str), Some("error"));
    assert_eq!(names.get("AsyncPool").map(String::as_str), Some("pool"));
    assert_eq!(layer_of("pool"), Some(6));
    assert!(layer_of("pool") > layer_of("sync"));
}
