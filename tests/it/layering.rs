//! The layering of ARCHITECTURE.md: every `crate::` path in `src/` names a module on a lower layer
//! (or the module itself). Engine and hub are the bottom layer and do not import each other.

use std::path::{Path, PathBuf};

/// Bottom up; a module may import modules of a lower layer only.
const LAYERS: &[&[&str]] = &[
    &["engine", "hub"],
    &["api"],
    &["batch"],
    &["config"],
    &["serverless"],
];

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module `{module}` is not in ARCHITECTURE.md's layers"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules a line names through `crate::` (comments skipped).
fn imports(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .filter(|(i, _)| {
            // `worker_candle::` or `some_crate::` are other crates.
            *i == 0 || !code[..*i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        })
        .map(|(i, m)| {
            code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|m: &String| !m.is_empty())
        .collect()
}

#[test]
fn no_module_imports_from_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = top.trim_end_matches(".rs");
        if module == "main" || module == "lib" {
            continue;
        }
        let own = layer(module);
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for imported in imports(line) {
                if imported == module {
                    continue;
                }
                let theirs = layer(&imported);
                if theirs >= own {
                    wrong.push(format!(
                        "{}:{}: `{module}` imports `{imported}`: {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_import_scanner_reads_paths() {
    assert_eq!(imports("use crate::api::error::ApiError;"), ["api"]);
    assert_eq!(
        imports("let x = crate::batch::run(); // crate::config"),
        ["batch"]
    );
    assert!(imports("use worker_candle::config::Config;").is_empty());
}
