//! The layering of ARCHITECTURE.md: every `crate::` path in `src/` names a module on a lower layer
//! (or the module itself). Engine and hub are the bottom layer and do not import each other. Inside
//! the engine its modules import each other without cycles, under the rules of `ENGINE_RULES`.

use std::collections::{BTreeMap, BTreeSet};
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

/// Inside the engine: (module, the engine modules it may not import). ARCHITECTURE.md states these.
const ENGINE_RULES: &[(&str, &[&str])] = &[
    // The forward-pass vocabulary: a leaf.
    ("batch", &["*"]),
    // What a loaded engine is made of: names the types it holds, builds and runs nothing.
    (
        "parts",
        &[
            "layers",
            "kv_cache",
            "models",
            "loader",
            "gguf",
            "embedding",
            "runner",
        ],
    ),
    // The shared layers and the cache know no model, loader or runner.
    (
        "layers",
        &["models", "loader", "embedding", "parts", "runner"],
    ),
    (
        "kv_cache",
        &["layers", "models", "loader", "embedding", "parts", "runner"],
    ),
    // Models know no loader, embedder or runner.
    ("models", &["loader", "embedding", "parts", "runner"]),
    // The embedder is loaded for the runner, never the other way round.
    ("embedding", &["runner"]),
];

/// The engine's foundations: they import no kernel, cache, model, loader, parts or runner.
const ENGINE_FOUNDATIONS: &[&str] = &[
    "error",
    "types",
    "settings",
    "quant",
    "gguf",
    "speculative",
    "tokenizer",
    "template",
    "sampling",
    "stop",
    "detokenize",
    "validate",
    "scheduler",
    "block_allocator",
    "prefix_cache",
    "device_memory",
    "lora",
    "constraint",
];

/// What the foundations may not import.
const ABOVE_FOUNDATIONS: &[&str] = &[
    "layers",
    "kv_cache",
    "models",
    "loader",
    "embedding",
    "parts",
    "runner",
];

/// A file's engine module (`src/engine/<m>.rs` or `src/engine/<m>/...`) and whether it sits at the
/// engine's top level (where `super::x` names the engine module `x`).
fn engine_module(rel: &Path) -> Option<(String, bool)> {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) != Some("engine") || parts.len() < 2 {
        return None;
    }
    if parts[1] == "mod.rs" {
        return None;
    }
    let top = parts.len() == 2 || (parts.len() == 3 && parts[2] == "mod.rs");
    Some((parts[1].trim_end_matches(".rs").to_string(), top))
}

/// The engine modules a line of an engine file names: `crate::engine::m` anywhere, `super::m` in a
/// top-level file. Names starting upper-case are the engine root's re-exports (`EngineError`).
fn engine_imports(line: &str, top: bool) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = Vec::new();
    let mut scan = |prefix: &str| {
        for (i, m) in code.match_indices(prefix) {
            if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let name: String = code[i + m.len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name.starts_with(|c: char| c.is_ascii_lowercase()) {
                found.push(name);
            }
        }
    };
    scan("crate::engine::");
    if top {
        scan("super::");
    }
    found
}

/// Engine module → (engine module it imports → the first place it does).
fn engine_graph() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join("engine"), &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let Some((module, top)) = engine_module(rel) else {
            continue;
        };
        let entry = graph.entry(module.clone()).or_default();
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for imported in engine_imports(line, top) {
                if imported != module {
                    entry
                        .entry(imported)
                        .or_insert_with(|| format!("{}:{}: {}", rel.display(), n + 1, line.trim()));
                }
            }
        }
    }
    graph
}

#[test]
fn engine_modules_import_each_other_without_cycles() {
    let graph = engine_graph();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| p == m) {
            let cycle = &path[at..];
            let edges: Vec<String> = cycle
                .iter()
                .zip(cycle.iter().skip(1).chain(std::iter::once(&m.to_string())))
                .map(|(a, b)| graph[a][b].clone())
                .collect();
            cycles.push(format!(
                "{} -> {m}\n  {}",
                cycle.join(" -> "),
                edges.join("\n  ")
            ));
            return;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flat_map(BTreeMap::keys) {
            visit(next, graph, path, done, cycles);
        }
        path.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    let mut cycles = Vec::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(
        cycles.is_empty(),
        "engine import cycles:\n{}",
        cycles.join("\n")
    );
    assert!(graph.contains_key("batch") && graph.contains_key("parts"));
}

#[test]
fn engine_modules_keep_their_rules() {
    let graph = engine_graph();
    let mut wrong = Vec::new();
    let foundations = ENGINE_FOUNDATIONS.iter().map(|m| (*m, ABOVE_FOUNDATIONS));
    for (module, forbidden) in ENGINE_RULES.iter().copied().chain(foundations) {
        let imports = graph
            .get(module)
            .unwrap_or_else(|| panic!("no engine module `{module}`"));
        for (imported, at) in imports {
            if forbidden.contains(&"*") || forbidden.contains(&imported.as_str()) {
                wrong.push(format!("`{module}` imports `{imported}`: {at}"));
            }
        }
    }
    // The runner takes only the embedding model's parts from `embedding`, nothing of its insides.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/engine");
    let mut files = vec![src.join("runner.rs")];
    rust_files(&src.join("runner"), &mut files);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for (i, m) in code.match_indices("embedding::") {
                if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let name: String = code[i + m.len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if name != "embedding_parts" {
                    wrong.push(format!(
                        "runner uses `embedding::{name}`: {}:{}",
                        file.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "engine imports against the rules:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_engine_scanner_reads_paths() {
    assert_eq!(
        engine_imports("use crate::engine::models::{CausalLM};", false),
        ["models"]
    );
    assert_eq!(
        engine_imports("use super::batch::ForwardBatch;", true),
        ["batch"]
    );
    assert!(engine_imports("use super::batch::ForwardBatch;", false).is_empty());
    assert!(engine_imports(
        "x: crate::engine::EngineError, // crate::engine::runner",
        false
    )
    .is_empty());
    assert_eq!(
        engine_module(Path::new("engine/models/mod.rs")),
        Some(("models".to_string(), true))
    );
    assert_eq!(
        engine_module(Path::new("engine/layers/attention.rs")),
        Some(("layers".to_string(), false))
    );
}

/// Inside `api`, the front doors translate one way: `api/anthropic` (and the Responses route)
/// build on the OpenAI front door's chat machinery; nothing in `api/openai` or `api/error.rs`
/// reaches into `api/anthropic`, and `api/error.rs` into no front door.
const API_RULES: &[(&str, &[&str])] = &[
    ("api/openai", &["api::anthropic"]),
    (
        "api/error.rs",
        &["api::anthropic", "api::openai", "api::native"],
    ),
    ("api/native.rs", &["api::anthropic"]),
    ("api/stream_batch.rs", &["api::anthropic", "api::openai"]),
];

#[test]
fn api_front_doors_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join("api"), &mut files);
    assert!(files
        .iter()
        .any(|f| f.ends_with("api/anthropic/messages.rs")));
    let mut wrong = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(file).unwrap();
        for (prefix, forbidden) in API_RULES.iter().filter(|(p, _)| rel.starts_with(p)) {
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for f in forbidden
                    .iter()
                    .filter(|f| code.contains(&format!("crate::{f}")))
                {
                    wrong.push(format!("{rel}:{}: {prefix} imports {f}", n + 1));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the api rules:\n{}",
        wrong.join("\n")
    );
}
