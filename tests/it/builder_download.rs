//! The model downloader against a local hub-like server serving `tests/fixtures/llama`: listing,
//! `resolve` with Range support, a `.bin` duplicate to filter, a sharded variant, token checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use worker_candle::hub::{FileSet, Hub, HubConfig};

const REPO: &str = "org/tiny-llama";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token_123";
const FIXTURE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

#[derive(Default, Clone)]
struct Served {
    uri: String,
    authorization: Option<String>,
    range: Option<String>,
}

#[derive(Default)]
struct Repo {
    files: BTreeMap<String, Vec<u8>>,
    /// Listed in the API but answered 404 by `resolve`.
    listed_only: Vec<String>,
    /// Requests that must carry this bearer token (401 otherwise).
    token: Option<String>,
    /// The first download of this file breaks after this many bytes.
    cut: Option<(String, usize)>,
    /// Downloads of this file start only after a pause.
    slow: Option<String>,
    log: Vec<Served>,
}

type Shared = Arc<Mutex<Repo>>;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture_dir().join(name)).expect("fixture file")
}

/// The llama fixture plus files a real repo carries that the worker must not fetch.
fn llama_repo() -> Repo {
    let mut files: BTreeMap<String, Vec<u8>> = FIXTURE_FILES
        .iter()
        .map(|f| (f.to_string(), fixture(f)))
        .collect();
    files.insert("pytorch_model.bin".into(), vec![7u8; 4096]);
    files.insert("onnx/model.onnx".into(), vec![8u8; 1024]);
    files.insert("README.md".into(), b"# tiny".to_vec());
    Repo {
        files,
        ..Repo::default()
    }
}

/// The same weights split across two shards named by `model.safetensors.index.json`.
fn sharded_repo() -> Repo {
    let mut repo = llama_repo();
    let weights = repo.files.remove("model.safetensors").expect("weights");
    let (a, b) = weights.split_at(weights.len() / 2);
    repo.files
        .insert("model-00001-of-00002.safetensors".into(), a.to_vec());
    repo.files
        .insert("model-00002-of-00002.safetensors".into(), b.to_vec());
    let index = serde_json::json!({
        "metadata": {"total_size": weights.len()},
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00002-of-00002.safetensors"
        }
    });
    repo.files.insert(
        "model.safetensors.index.json".into(),
        serde_json::to_vec(&index).expect("json"),
    );
    repo.files.insert(
        "pytorch_model.bin.index.json".into(),
        br#"{"weight_map":{"x":"pytorch_model.bin"}}"#.to_vec(),
    );
    repo
}

fn blob_id(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn listing(repo: &Repo) -> serde_json::Value {
    let mut siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(name, bytes)| {
            serde_json::json!({
                "rfilename": name,
                "size": bytes.len(),
                "blobId": blob_id(name),
                "lfs": if name.ends_with(".safetensors") {
                    serde_json::json!({"sha256": blob_id(name), "size": bytes.len()})
                } else {
                    serde_json::Value::Null
                },
            })
        })
        .collect();
    for name in &repo.listed_only {
        siblings.push(serde_json::json!({"rfilename": name, "size": 10, "blobId": blob_id(name)}));
    }
    serde_json::json!({"id": REPO, "sha": COMMIT, "siblings": siblings})
}

async fn handle(State(state): State<Shared>, req: Request) -> Response {
    let uri = req.uri().to_string();
    let path = req.uri().path().to_string();
    let headers: &HeaderMap = req.headers();
    let text = |h| {
        headers
            .get(h)
            .and_then(|v: &header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let served = Served {
        uri: uri.clone(),
        authorization: text(header::AUTHORIZATION),
        range: text(header::RANGE),
    };
    let mut repo = state.lock().expect("lock");
    repo.log.push(served.clone());
    if let Some(token) = &repo.token
        && served.authorization.as_deref() != Some(&format!("Bearer {token}"))
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if path == format!("/api/models/{REPO}/revision/main") {
        return axum::Json(listing(&repo)).into_response();
    }
    let Some(file) = path.strip_prefix(&format!("/{REPO}/resolve/{COMMIT}/")) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(bytes) = repo.files.get(file).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let start = served
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<usize>().ok());
    let cut = match &repo.cut {
        Some((name, at)) if name == file => {
            let at = *at;
            repo.cut = None;
            Some(at)
        }
        _ => None,
    };
    let slow = repo.slow.as_deref() == Some(file);
    drop(repo);
    let total = bytes.len();
    let (status, body) = match start {
        Some(s) if s >= total => return StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        Some(s) => (StatusCode::PARTIAL_CONTENT, bytes[s..].to_vec()),
        None => (StatusCode::OK, bytes),
    };
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, body.len());
    if let Some(s) = start {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {s}-{}/{total}", total - 1),
        );
    }
    let body = match cut {
        // Send a prefix, then fail the body: the client sees a broken transfer.
        Some(at) => {
            let prefix = body[..at.min(body.len())].to_vec();
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                vec![Ok(prefix), Err(std::io::Error::other("connection dropped"))];
            // The pause lets the prefix reach the client before the failure.
            let paced = futures::StreamExt::then(futures::stream::iter(chunks), |c| async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                c
            });
            Body::from_stream(paced)
        }
        // Hold the transfer back so that a second downloader arrives while it runs.
        None if slow => {
            let delayed = futures::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                Ok::<_, std::io::Error>(body)
            });
            Body::from_stream(delayed)
        }
        None => Body::from(body),
    };
    resp.body(body).expect("response")
}

struct Server {
    addr: SocketAddr,
    state: Shared,
}

impl Server {
    async fn start(repo: Repo) -> Self {
        let state: Shared = Arc::new(Mutex::new(repo));
        let app = Router::new().fallback(handle).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            axum::serve(listener, app).await.ok();
        });
        Self { addr, state }
    }

    fn hub(&self, token: Option<&str>, fallback: &Path) -> Hub {
        hub_at(&format!("http://{}", self.addr), token, fallback)
    }

    fn log(&self) -> Vec<Served> {
        self.state.lock().expect("lock").log.clone()
    }

    fn requested(&self, file: &str) -> Vec<Served> {
        let suffix = format!("/resolve/{COMMIT}/{file}");
        self.log()
            .into_iter()
            .filter(|s| s.uri.ends_with(&suffix))
            .collect()
    }
}

fn hub_at(endpoint: &str, token: Option<&str>, fallback: &Path) -> Hub {
    Hub::new(HubConfig {
        endpoint: endpoint.to_string(),
        token: token.map(str::to_string),
        offline: false,
        attempts: 4,
        backoff: Duration::from_millis(10),
        concurrency: 3,
        progress: false,
        fallback_cache: fallback.to_path_buf(),
    })
    .expect("hub")
}

fn model() -> FileSet {
    FileSet::Model { gguf_file: None }
}

fn snapshot_dir(base: &Path) -> PathBuf {
    base.join("huggingface-cache/hub/models--org--tiny-llama/snapshots")
        .join(COMMIT)
}

fn blobs_dir(base: &Path) -> PathBuf {
    base.join("huggingface-cache/hub/models--org--tiny-llama/blobs")
}

#[tokio::test]
async fn full_download_fetches_only_what_the_engine_loads_in_the_hub_layout() {
    let server = Server::start(llama_repo()).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");
    let hub = server.hub(None, fallback.path());

    let path = hub
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect("download");

    assert_eq!(path, snapshot_dir(base.path()));
    for file in FIXTURE_FILES {
        let got = std::fs::read(path.join(file)).expect("downloaded file");
        assert_eq!(got, fixture(file), "{file} differs");
        let link = std::fs::symlink_metadata(path.join(file)).expect("meta");
        assert!(
            link.file_type().is_symlink(),
            "{file} should link into blobs/"
        );
    }
    for skipped in ["pytorch_model.bin", "onnx/model.onnx", "README.md"] {
        assert!(!path.join(skipped).exists(), "{skipped} should be filtered");
        assert!(
            server.requested(skipped).is_empty(),
            "{skipped} was requested"
        );
    }
    let refs = base
        .path()
        .join("huggingface-cache/hub/models--org--tiny-llama/refs/main");
    assert_eq!(std::fs::read_to_string(refs).expect("ref"), COMMIT);
    let leftovers: Vec<_> = std::fs::read_dir(blobs_dir(base.path()))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "partial files left behind");
}

#[tokio::test]
async fn cached_snapshot_is_reused_without_the_network() {
    let server = Server::start(llama_repo()).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");
    let first = server
        .hub(None, fallback.path())
        .resolve(REPO, Some("main"), base.path(), &model())
        .await
        .expect("download");
    let requests = server.log().len();

    // Nothing listens here: any request would fail.
    let offline = hub_at("http://127.0.0.1:9", None, fallback.path());
    let again = offline
        .resolve(REPO, Some("main"), base.path(), &model())
        .await
        .expect("cached snapshot");
    assert_eq!(again, first);
    let by_commit = offline
        .resolve(REPO, Some(COMMIT), base.path(), &model())
        .await
        .expect("cached by commit");
    assert_eq!(by_commit, first);
    assert_eq!(server.log().len(), requests);

    // An incomplete snapshot (a shard gone) is not trusted: it is fetched again.
    std::fs::remove_file(first.join("model.safetensors")).expect("rm");
    let err = offline
        .resolve(REPO, Some("main"), base.path(), &model())
        .await
        .expect_err("must go to the network");
    assert!(
        format!("{err:#}").contains("127.0.0.1:9") || format!("{err:#}").contains("org/tiny-llama")
    );
}

#[tokio::test]
async fn partial_file_is_resumed_with_a_range_request() {
    let server = Server::start(llama_repo()).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");
    let weights = fixture("model.safetensors");
    let half = weights.len() / 2;
    std::fs::create_dir_all(blobs_dir(base.path())).expect("mkdir");
    let partial =
        blobs_dir(base.path()).join(format!("{}.incomplete", blob_id("model.safetensors")));
    std::fs::write(&partial, &weights[..half]).expect("partial");

    let path = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect("resumed download");

    assert_eq!(
        std::fs::read(path.join("model.safetensors")).expect("read"),
        weights
    );
    let requests = server.requested("model.safetensors");
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].range.as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    assert!(!partial.exists());
}

#[tokio::test]
async fn broken_transfer_is_retried_from_where_it_stopped() {
    let mut repo = llama_repo();
    repo.cut = Some(("model.safetensors".into(), 100_000));
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    let path = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect("download after a retry");

    assert_eq!(
        std::fs::read(path.join("model.safetensors")).expect("read"),
        fixture("model.safetensors")
    );
    let requests = server.requested("model.safetensors");
    assert_eq!(requests.len(), 2, "one broken transfer, one resumed");
    assert_eq!(requests[0].range, None);
    let resumed_at: usize = requests[1]
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .expect("a Range header");
    assert!(
        resumed_at > 0 && resumed_at <= 100_000,
        "resumed at {resumed_at}"
    );
}

#[tokio::test]
async fn concurrent_workers_on_one_volume_download_each_file_once() {
    let mut repo = llama_repo();
    repo.slow = Some("model.safetensors".into());
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");
    let (a, b) = (
        server.hub(None, fallback.path()),
        server.hub(None, fallback.path()),
    );

    let set = model();
    let (first, second) = tokio::join!(
        a.resolve(REPO, None, base.path(), &set),
        b.resolve(REPO, None, base.path(), &set),
    );

    let (first, second) = (first.expect("first worker"), second.expect("second worker"));
    assert_eq!(first, second);
    assert_eq!(
        std::fs::read(first.join("model.safetensors")).expect("weights"),
        fixture("model.safetensors")
    );
    let log: Vec<String> = server.log().into_iter().map(|s| s.uri).collect();
    assert_eq!(
        server.requested("model.safetensors").len(),
        1,
        "one download, one wait: {log:?}"
    );
    let locks = std::fs::read_dir(blobs_dir(base.path()))
        .expect("blobs")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".lock"))
        .count();
    assert_eq!(locks, 0, "locks released");
}

#[tokio::test]
async fn sharded_repo_downloads_the_index_shards_and_not_the_bin_index() {
    let server = Server::start(sharded_repo()).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    let path = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect("download");

    let weights = fixture("model.safetensors");
    let mut joined = std::fs::read(path.join("model-00001-of-00002.safetensors")).expect("shard 1");
    joined.extend(std::fs::read(path.join("model-00002-of-00002.safetensors")).expect("shard 2"));
    assert_eq!(joined, weights);
    assert!(path.join("model.safetensors.index.json").is_file());
    assert!(!path.join("pytorch_model.bin.index.json").exists());
    assert!(server.requested("pytorch_model.bin").is_empty());
}

#[tokio::test]
async fn shard_named_by_the_index_but_absent_is_reported_by_name() {
    let mut repo = sharded_repo();
    repo.files.remove("model-00002-of-00002.safetensors");
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    let err = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect_err("must fail");
    let msg = format!("{err:#}");
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
    assert!(!snapshot_dir(base.path())
        .join("model-00002-of-00002.safetensors")
        .exists());
    let refs = base
        .path()
        .join("huggingface-cache/hub/models--org--tiny-llama/refs/main");
    assert!(!refs.exists(), "an incomplete snapshot must not get a ref");
}

#[tokio::test]
async fn listed_file_that_cannot_be_fetched_is_reported_by_name() {
    let mut repo = sharded_repo();
    repo.files.remove("model-00002-of-00002.safetensors");
    repo.listed_only
        .push("model-00002-of-00002.safetensors".into());
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    let err = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect_err("must fail");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model-00002-of-00002.safetensors") && msg.contains("404"),
        "{msg}"
    );
    // A 404 is final: no retries.
    assert_eq!(
        server.requested("model-00002-of-00002.safetensors").len(),
        1
    );
}

#[tokio::test]
async fn token_travels_only_as_a_bearer_header() {
    let mut repo = llama_repo();
    repo.token = Some(TOKEN.into());
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    server
        .hub(Some(TOKEN), fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect("authorised download");

    let log = server.log();
    assert!(log.len() > FIXTURE_FILES.len());
    for served in &log {
        assert_eq!(
            served.authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert!(!served.uri.contains(TOKEN), "token in URL {}", served.uri);
    }
}

#[tokio::test]
async fn gated_repo_without_a_token_says_to_set_hf_token() {
    let mut repo = llama_repo();
    repo.token = Some(TOKEN.into());
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");

    let err = server
        .hub(None, fallback.path())
        .resolve(REPO, None, base.path(), &model())
        .await
        .expect_err("must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("HF_TOKEN") && msg.contains("401"), "{msg}");
    assert_eq!(server.log().len(), 1, "401 is final: no retries");
}

#[tokio::test]
async fn unwritable_base_path_falls_back_to_the_local_cache() {
    let server = Server::start(llama_repo()).await;
    let scratch = tempfile::tempdir().expect("tmp");
    // A path below a regular file can never be created, even by root.
    let file = scratch.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("file");
    let fallback = scratch.path().join("fallback");

    let path = server
        .hub(None, &fallback)
        .resolve(REPO, None, &file.join("volume"), &model())
        .await
        .expect("download into the fallback");

    assert!(path.starts_with(&fallback), "{}", path.display());
    assert!(path.join("config.json").is_file());
}

#[tokio::test]
async fn tokenizer_set_and_gguf_choice_select_their_files() {
    let mut repo = llama_repo();
    repo.files.insert("tiny.Q8_0.gguf".into(), vec![1u8; 2048]);
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let fallback = tempfile::tempdir().expect("tmp");
    let hub = server.hub(None, fallback.path());

    let tok = hub
        .resolve(REPO, None, base.path(), &FileSet::Tokenizer)
        .await
        .expect("tokenizer");
    assert!(tok.join("tokenizer.json").is_file());
    assert!(server.requested("model.safetensors").is_empty());

    let gguf = FileSet::Model {
        gguf_file: Some("tiny.Q8_0.gguf".into()),
    };
    let dir = hub
        .resolve(REPO, None, base.path(), &gguf)
        .await
        .expect("gguf");
    assert_eq!(
        std::fs::read(dir.join("tiny.Q8_0.gguf")).expect("gguf"),
        vec![1u8; 2048]
    );
    assert!(
        server.requested("model.safetensors").is_empty(),
        "safetensors skipped for GGUF"
    );
}

#[tokio::test]
async fn local_folder_resolves_to_itself_and_a_missing_path_is_an_error() {
    let fallback = tempfile::tempdir().expect("tmp");
    let hub = hub_at("http://127.0.0.1:9", None, fallback.path());
    let dir = fixture_dir();
    let got = hub
        .resolve(dir.to_str().expect("utf8"), None, fallback.path(), &model())
        .await
        .expect("local");
    assert_eq!(got, dir.canonicalize().expect("canon"));

    let err = hub
        .resolve("/no/such/model", None, fallback.path(), &model())
        .await
        .expect_err("missing path");
    assert!(format!("{err:#}").contains("/no/such/model"));
}

fn worker_command(server: &Server, base: &Path) -> std::process::Command {
    command(env!("CARGO_BIN_EXE_worker-candle"), server, base)
}

fn command(
    program: impl AsRef<std::ffi::OsStr>,
    server: &Server,
    base: &Path,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", base)
        .env("HF_ENDPOINT", format!("http://{}", server.addr))
        .env("MODEL_NAME", REPO)
        .env("BASE_PATH", base)
        .env("RUST_LOG", "info");
    cmd
}

#[tokio::test]
async fn image_build_step_bakes_the_model_with_the_secret_token() {
    let mut repo = llama_repo();
    repo.token = Some(TOKEN.into());
    let server = Server::start(repo).await;
    let base = tempfile::tempdir().expect("tmp");
    let secret = base.path().join("HF_TOKEN");
    std::fs::write(&secret, TOKEN).expect("secret");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("builder/download-model.sh");

    let mut cmd = command("sh", &server, base.path());
    cmd.arg(&script)
        .env("HF_TOKEN_SECRET_FILE", &secret)
        .env("WORKER_BIN", env!("CARGO_BIN_EXE_worker-candle"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run builder");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "builder failed: {stdout}\n{stderr}");
    let snapshot = snapshot_dir(base.path());
    assert!(stdout.contains(&snapshot.display().to_string()), "{stdout}");
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).expect("weights"),
        fixture("model.safetensors")
    );
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "the token leaked into the build log"
    );
    assert!(server.log().iter().all(|s| !s.uri.contains(TOKEN)));
}

#[tokio::test]
async fn image_build_step_without_model_name_builds_the_generic_worker() {
    let base = tempfile::tempdir().expect("tmp");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("builder/download-model.sh");
    let out = std::process::Command::new("sh")
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("BASE_PATH", base.path())
        // Never run: the step must not call the worker at all.
        .env("WORKER_BIN", "/nonexistent/worker-candle")
        .output()
        .expect("run builder");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("generic worker"));
    assert_eq!(
        std::fs::read_dir(base.path()).expect("dir").count(),
        0,
        "nothing downloaded"
    );
}

/// The cold start resolves MODEL_NAME through the same downloader, then serves the job on it.
#[tokio::test]
async fn cold_start_downloads_the_repo_then_serves_a_job() {
    let server = Server::start(llama_repo()).await;
    let base = tempfile::tempdir().expect("tmp");
    let mut cmd = worker_command(&server, base.path());
    cmd.env("LOG_FORMAT", "json").arg("--test-input").arg(
        r#"{"input": {"prompt": "Hello", "sampling_params": {"max_tokens": 3, "temperature": 0}}}"#,
    );
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the job failed:\n{stdout}\n{stderr}");
    let snapshot = snapshot_dir(base.path());
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).expect("downloaded weights"),
        fixture("model.safetensors")
    );
    assert!(server.requested("pytorch_model.bin").is_empty());
    let ready = stderr
        .find("model snapshot ready")
        .expect("download logged");
    let loading = stderr
        .find("loading the model")
        .expect("engine start logged");
    assert!(
        ready < loading,
        "the model must be resolved before it loads:\n{stderr}"
    );
}
