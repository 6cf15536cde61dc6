//! The layer diagram in `src/lib.rs`, kept true: each layer's non-test code names (as
//! `crate::<module>`) only the layers below it; `crash` and `telemetry` are leaves anyone may
//! call; `steps` uses only the engine's step contract (`engine::action`).

use std::path::{Path, PathBuf};

/// Each layer and the layers it may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("domain", &[]),
    ("workflow", &["domain"]),
    ("store", &["domain"]),
    ("providers", &["domain"]),
    ("engine", &["domain", "workflow", "store"]),
    ("steps", &["domain", "workflow", "store", "providers", "engine"]),
    ("api", &["domain", "workflow", "store", "providers", "engine", "steps"]),
    ("sim", &["domain", "providers"]),
];
const LEAVES: &[&str] = &["crash", "telemetry"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // Unit tests may use any layer (test fixtures).
            if path.file_name().is_some_and(|n| n != "tests") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") && path.file_name().is_some_and(|n| n != "tests.rs") {
            out.push(path);
        }
    }
}

/// The modules a file's code (not its comments, not its `#[cfg(test)]` part) names.
fn named(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((n + 1, path));
        }
    }
    found
}

#[test]
fn every_layer_uses_only_the_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for (layer, allowed) in ALLOWED {
        let mut files = Vec::new();
        let dir = src.join(layer);
        if dir.is_dir() {
            sources(&dir, &mut files);
        }
        let file = src.join(format!("{layer}.rs"));
        if file.is_file() {
            files.push(file);
        }
        assert!(!files.is_empty(), "no sources for layer {layer}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, path) in named(&text) {
                let module = path.split("::").next().unwrap_or_default();
                let ok = module == *layer
                    || LEAVES.contains(&module)
                    || (allowed.contains(&module)
                        && (*layer != "steps" || module != "engine" || path.starts_with("engine::action")));
                if !ok {
                    problems.push(format!("{}:{line}: {layer} uses crate::{path}", file.display()));
                }
            }
        }
    }
    assert!(problems.is_empty(), "layering broken:\n{}", problems.join("\n"));
}
