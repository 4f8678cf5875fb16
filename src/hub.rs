//! The one model downloader: Hugging Face hub snapshots into the hub cache layout.
//!
//! `MODEL_NAME` is either a local folder (used as is) or a hub repo id. A repo id resolves to
//! `<cache>/models--org--name/snapshots/<commit>/`, where `<cache>` is
//! `$BASE_PATH/huggingface-cache/hub` (the layout RunPod's network volumes and `huggingface_hub`
//! share), or a local cache dir when `BASE_PATH` is not writable. A complete cached snapshot is used
//! without touching the network; otherwise the snapshot is downloaded: only what the engine loads
//! (safetensors or one GGUF, configs, tokenizer files), resumable, retried, and verified against
//! `model.safetensors.index.json`. The image build (`worker-candle download`) and the cold start
//! both come here, so there is one code path.
//!
//! Written on `reqwest` rather than `hf-hub` 1.0: that crate cannot resume a partial file (it
//! truncates `.incomplete` files) and pulls in `hf-xet` and its large dependency tree.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{header, StatusCode, Url};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

pub(crate) const DEFAULT_REVISION: &str = "main";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Which files of a repository a caller needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSet {
    /// Weights (safetensors, or the named GGUF file instead), configs and tokenizer files.
    Model { gguf_file: Option<String> },
    /// Configs and tokenizer files only (`TOKENIZER_NAME`).
    Tokenizer,
    /// A PEFT LoRA adapter (`LORA_MODULES`): `adapter_config.json` and
    /// `adapter_model.safetensors`.
    Adapter,
}

#[derive(Clone)]
pub struct HubConfig {
    pub endpoint: String,
    /// Sent only as an `Authorization: Bearer` header.
    pub token: Option<String>,
    /// Never touch the network (`HF_HUB_OFFLINE=1`): only cached snapshots resolve.
    pub offline: bool,
    /// Attempts per file before giving up, and the first back-off (doubled each time, capped).
    pub attempts: u32,
    pub backoff: Duration,
    /// Files downloaded at once.
    pub concurrency: usize,
    /// Draw progress bars on a terminal (else log lines); `false` keeps tests quiet.
    pub progress: bool,
    /// Where to look and download when `BASE_PATH` is not writable.
    pub fallback_cache: PathBuf,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &redacted(&self.token))
            .field("offline", &self.offline)
            .field("attempts", &self.attempts)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// The token is a secret: never print it.
fn redacted(token: &Option<String>) -> &'static str {
    if token.is_some() {
        "Some(<redacted>)"
    } else {
        "None"
    }
}

/// Everything that names the model (and tokenizer) to resolve: `MODEL_NAME`, `MODEL_REVISION`,
/// `BASE_PATH`, `HF_TOKEN`, `TOKENIZER_NAME`, `TOKENIZER_REVISION`, `GGUF_FILE`.
#[derive(Clone, Default)]
pub struct ModelSource {
    pub name: String,
    pub revision: Option<String>,
    pub base_path: PathBuf,
    pub token: Option<String>,
    pub tokenizer_name: Option<String>,
    pub tokenizer_revision: Option<String>,
    pub gguf_file: Option<String>,
    /// `DOWNLOAD_DIR`: the hub cache to use instead of `$BASE_PATH/huggingface-cache/hub`.
    pub download_dir: Option<PathBuf>,
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("name", &self.name)
            .field("revision", &self.revision)
            .field("base_path", &self.base_path)
            .field("token", &redacted(&self.token))
            .field("tokenizer_name", &self.tokenizer_name)
            .field("tokenizer_revision", &self.tokenizer_revision)
            .field("gguf_file", &self.gguf_file)
            .field("download_dir", &self.download_dir)
            .finish()
    }
}

/// Local folders for the model and, when `TOKENIZER_NAME` is set, the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// `models--org--name`, the folder of a repo in the cache.
pub(crate) fn repo_folder(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// The hub cache under a `BASE_PATH`.
pub(crate) fn cache_dir(base_path: &Path) -> PathBuf {
    base_path.join("huggingface-cache").join("hub")
}

/// A repo id as the hub spells them: `name` or `org/name`, no path tricks.
pub(crate) fn validate_repo_id(id: &str) -> Result<()> {
    let parts: Vec<&str> = id.split('/').collect();
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        bail!("`{id}` is neither an existing local folder nor a Hugging Face repo id (org/name)");
    }
    Ok(())
}

/// A revision is a branch, tag or commit; it becomes a file name under `refs/`.
fn validate_revision(rev: &str) -> Result<()> {
    let bad = rev.is_empty()
        || rev.starts_with('/')
        || rev
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        || rev.chars().any(|c| c.is_control() || c == '\\');
    if bad {
        bail!("invalid revision `{rev}`");
    }
    Ok(())
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

fn looks_like_path(name: &str) -> bool {
    name.starts_with(['/', '.', '~']) || name.ends_with(".gguf") || name.split('/').count() > 2
}

/// The repo listing: `GET /api/models/{repo}/revision/{rev}?blobs=true`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RepoInfo {
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default, rename = "blobId")]
    pub blob_id: Option<String>,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Lfs {
    pub sha256: String,
    #[serde(default)]
    pub size: Option<u64>,
}

impl Sibling {
    fn size(&self) -> Option<u64> {
        self.lfs.as_ref().and_then(|l| l.size).or(self.size)
    }

    /// The blob's name in `blobs/`: the ETag the hub serves, i.e. the LFS sha256 or the git blob id.
    fn blob_name(&self, commit: &str) -> String {
        let name = self
            .lfs
            .as_ref()
            .map(|l| l.sha256.clone())
            .or_else(|| self.blob_id.clone());
        match name {
            Some(n) if n.chars().all(|c| c.is_ascii_alphanumeric()) && !n.is_empty() => n,
            // Listings without blob ids: name the blob by commit and path, still unique.
            _ => format!("{commit}-{}", self.rfilename.replace('/', "--")),
        }
    }
}

/// Sentence-transformers module folders (`1_Pooling/`, `2_Dense/`): the only subfolders we fetch.
fn in_module_dir(path: &str) -> bool {
    match path.split_once('/') {
        Some((dir, _)) => dir.split_once('_').is_some_and(|(n, rest)| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && !rest.is_empty()
        }),
        None => false,
    }
}

fn is_root(path: &str) -> bool {
    !path.contains('/')
}

/// Configs, tokenizer files and chat templates: small files the engine may read.
fn is_support_file(path: &str) -> bool {
    if !(is_root(path) || in_module_dir(path)) {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".index.json") {
        // Only the safetensors index; `pytorch_model.bin.index.json` and friends name duplicates.
        return lower.ends_with(".safetensors.index.json");
    }
    [".json", ".jinja", ".model", ".txt", ".tiktoken"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

fn is_safetensors(path: &str) -> bool {
    path.ends_with(".safetensors") && (is_root(path) || in_module_dir(path))
}

/// The weight files to fetch, given the listing and (if the repo has one) the parsed index.
fn select_weights(
    info: &RepoInfo,
    set: &FileSet,
    index: Option<&BTreeSet<String>>,
) -> Result<Vec<String>> {
    let listed: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let gguf_file = match set {
        FileSet::Tokenizer => return Ok(Vec::new()),
        FileSet::Adapter if listed.contains(ADAPTER_WEIGHTS) => {
            return Ok(vec![ADAPTER_WEIGHTS.to_string()]);
        }
        FileSet::Adapter => {
            bail!("the repository has no {ADAPTER_WEIGHTS}: it is not a PEFT LoRA adapter saved with safetensors")
        }
        FileSet::Model { gguf_file } => gguf_file.as_deref(),
    };
    if let Some(gguf) = gguf_file {
        if listed.contains(gguf) {
            return Ok(vec![gguf.to_string()]);
        }
        let available: Vec<&str> = listed
            .iter()
            .copied()
            .filter(|f| f.ends_with(".gguf"))
            .collect();
        bail!("GGUF_FILE `{gguf}` is not in the repository (GGUF files there: {available:?})");
    }
    let mut weights: Vec<String> = Vec::new();
    if let Some(index) = index {
        for file in index {
            if !listed.contains(file.as_str()) {
                bail!("{SAFETENSORS_INDEX} names `{file}`, which the repository does not have");
            }
            weights.push(file.clone());
        }
    } else if listed.contains("model.safetensors") {
        weights.push("model.safetensors".to_string());
    } else {
        weights.extend(
            listed
                .iter()
                .filter(|f| is_root(f) && is_safetensors(f))
                .map(|f| f.to_string()),
        );
    }
    // Sentence-transformers modules (e.g. `2_Dense/model.safetensors`) carry their own weights.
    weights.extend(
        listed
            .iter()
            .filter(|f| in_module_dir(f) && is_safetensors(f))
            .map(|f| f.to_string()),
    );
    if weights.is_empty() {
        let other: Vec<&str> = listed
            .iter()
            .copied()
            .filter(|f| {
                [".bin", ".pth", ".pt", ".gguf", ".h5", ".msgpack"]
                    .iter()
                    .any(|e| f.ends_with(e))
            })
            .collect();
        bail!(
            "the repository has no .safetensors weights (other weight files: {other:?}); \
             worker-candle loads safetensors, or one GGUF file named by GGUF_FILE"
        );
    }
    Ok(weights)
}

/// The shard names of a `model.safetensors.index.json`.
pub(crate) fn index_shards(index_json: &Path) -> Result<BTreeSet<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index_json)
        .with_context(|| format!("reading {}", index_json.display()))?;
    let index: Index =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index_json.display()))?;
    Ok(index.weight_map.into_values().collect())
}

/// Checks that a snapshot folder can be loaded: config present, and every shard named by the
/// index present. Used after a download and before trusting a cached snapshot.
pub(crate) fn verify_snapshot(dir: &Path, set: &FileSet) -> Result<()> {
    if matches!(set, FileSet::Adapter) {
        for f in ["adapter_config.json", ADAPTER_WEIGHTS] {
            if !dir.join(f).is_file() {
                bail!("snapshot {} has no {f}", dir.display());
            }
        }
        return Ok(());
    }
    let weights_needed = matches!(set, FileSet::Model { gguf_file: None });
    if let FileSet::Model { gguf_file: Some(g) } = set {
        if !dir.join(g).is_file() {
            bail!("snapshot {} is missing `{g}`", dir.display());
        }
        return Ok(());
    }
    if !weights_needed {
        return Ok(());
    }
    if !dir.join("config.json").is_file() {
        bail!("snapshot {} has no config.json", dir.display());
    }
    let index = dir.join(SAFETENSORS_INDEX);
    if index.is_file() {
        for shard in index_shards(&index)? {
            if !dir.join(&shard).is_file() {
                bail!(
                    "snapshot {} is incomplete: {SAFETENSORS_INDEX} names `{shard}`, which is missing",
                    dir.display()
                );
            }
        }
        return Ok(());
    }
    let has_weights = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors") && e.path().is_file());
    if !has_weights {
        bail!("snapshot {} has no .safetensors weights", dir.display());
    }
    Ok(())
}

/// A complete snapshot of `repo@revision` already in `cache`, found without the network.
pub(crate) fn cached_snapshot(
    cache: &Path,
    repo: &str,
    revision: &str,
    set: &FileSet,
) -> Option<PathBuf> {
    let repo_dir = cache.join(repo_folder(repo));
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    if !is_commit_hash(&commit) {
        return None;
    }
    let dir = repo_dir.join("snapshots").join(&commit);
    verify_snapshot(&dir, set).ok().map(|_| dir)
}

/// Can we create files under `dir` (creating it if needed)?
fn writable(dir: &Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".write-probe-{}", std::process::id()));
    let ok = std::fs::File::create(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// A PEFT adapter's weights file.
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The downloader.
pub struct Hub {
    config: HubConfig,
    client: reqwest::Client,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.config.endpoint)
            .field("token", &redacted(&self.config.token))
            .field("offline", &self.config.offline)
            .finish()
    }
}

/// Why one download attempt failed: worth another try or not.
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self> {
        Url::parse(&config.endpoint)
            .with_context(|| format!("HF_ENDPOINT `{}` is not a URL", config.endpoint))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("worker-candle/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(20))
            .read_timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { config, client })
    }

    /// Resolves the model and, if named, the tokenizer.
    pub async fn resolve_source(&self, source: &ModelSource) -> Result<Resolved> {
        let set = FileSet::Model {
            gguf_file: non_empty(source.gguf_file.as_deref()).map(str::to_string),
        };
        let revision = non_empty(source.revision.as_deref());
        let primary = source
            .download_dir
            .clone()
            .unwrap_or_else(|| cache_dir(&source.base_path));
        let model = self
            .resolve_in(&source.name, revision, primary.clone(), &set)
            .await?;
        let tokenizer = match non_empty(source.tokenizer_name.as_deref()) {
            None => None,
            Some(name) => {
                let rev = non_empty(source.tokenizer_revision.as_deref());
                let path = self
                    .resolve_in(name, rev, primary.clone(), &FileSet::Tokenizer)
                    .await
                    .with_context(|| format!("resolving TOKENIZER_NAME `{name}`"))?;
                Some(path)
            }
        };
        Ok(Resolved { model, tokenizer })
    }

    /// A LoRA adapter (`LORA_MODULES`): a local folder as is, a repository id from the model's cache
    /// (`DOWNLOAD_DIR`, else under `BASE_PATH`) or downloaded into it.
    pub async fn resolve_adapter(&self, source: &ModelSource, name: &str) -> Result<PathBuf> {
        let primary = source
            .download_dir
            .clone()
            .unwrap_or_else(|| cache_dir(&source.base_path));
        self.resolve_in(name, None, primary, &FileSet::Adapter)
            .await
            .with_context(|| format!("resolving the LoRA adapter `{name}`"))
    }

    /// Local path → itself; repo id → a cached snapshot or a fresh download.
    pub async fn resolve(
        &self,
        name: &str,
        revision: Option<&str>,
        base_path: &Path,
        set: &FileSet,
    ) -> Result<PathBuf> {
        self.resolve_in(name, revision, cache_dir(base_path), set)
            .await
    }

    /// [`Hub::resolve`] with the primary hub cache named (`DOWNLOAD_DIR`, else under `BASE_PATH`).
    async fn resolve_in(
        &self,
        name: &str,
        revision: Option<&str>,
        primary: PathBuf,
        set: &FileSet,
    ) -> Result<PathBuf> {
        let name = name.trim();
        let local = Path::new(name);
        if local.exists() {
            return local
                .canonicalize()
                .with_context(|| format!("resolving local model path {name}"));
        }
        if looks_like_path(name) {
            bail!("model path `{name}` does not exist");
        }
        validate_repo_id(name)?;
        let revision = revision
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .unwrap_or(DEFAULT_REVISION);
        validate_revision(revision)?;

        let fallback = self.config.fallback_cache.clone();
        for cache in [&primary, &fallback] {
            if let Some(dir) = cached_snapshot(cache, name, revision, set) {
                tracing::info!(repo = name, revision, path = %dir.display(), "using cached snapshot");
                return Ok(dir);
            }
        }
        if self.config.offline {
            bail!(
                "{name}@{revision} is not in the cache ({}) and HF_HUB_OFFLINE is set",
                primary.display()
            );
        }
        let cache = if writable(&primary) {
            primary
        } else {
            tracing::warn!(
                cache = %primary.display(),
                fallback = %fallback.display(),
                "the cache (BASE_PATH or DOWNLOAD_DIR) is not writable; downloading into the local cache"
            );
            fallback
        };
        self.download(name, revision, &cache, set).await
    }

    fn url(&self, segments: &[&str]) -> Result<Url> {
        let mut url = Url::parse(&self.config.endpoint)?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|_| anyhow!("HF_ENDPOINT cannot be a base URL"))?;
            path.pop_if_empty();
            for seg in segments {
                path.extend(seg.split('/'));
            }
        }
        Ok(url)
    }

    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        let req = self.client.get(url);
        match &self.config.token {
            Some(token) => req.bearer_auth(token),
            None => req,
        }
    }

    /// `GET /api/models/{repo}/revision/{rev}`: the commit and the file list.
    pub(crate) async fn repo_info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let mut url = self.url(&["api", "models", repo, "revision"])?;
        // The revision is one path segment even when it holds a slash (`refs/pr/1`).
        url.path_segments_mut()
            .map_err(|_| anyhow!("bad endpoint"))?
            .push(revision);
        url.set_query(Some("blobs=true"));
        let mut last = None;
        for attempt in 0..self.config.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            match self.request(url.clone()).send().await {
                Ok(resp) if resp.status().is_success() => {
                    let info: RepoInfo = resp
                        .json()
                        .await
                        .with_context(|| format!("parsing the listing of {repo}@{revision}"))?;
                    if !is_commit_hash(&info.sha) {
                        bail!(
                            "the hub returned an invalid commit `{}` for {repo}@{revision}",
                            info.sha
                        );
                    }
                    return Ok(info);
                }
                Ok(resp) => match classify(resp.status(), repo, revision, None) {
                    Failure::Fatal(e) => return Err(e),
                    Failure::Retry(e) => last = Some(e),
                },
                Err(e) => last = Some(anyhow!(e).context(format!("listing {repo}@{revision}"))),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("listing {repo}@{revision} failed")))
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(8));
        (self.config.backoff * factor).min(Duration::from_secs(30))
    }

    /// Downloads `repo@revision` into `cache` and returns the snapshot folder.
    pub(crate) async fn download(
        &self,
        repo: &str,
        revision: &str,
        cache: &Path,
        set: &FileSet,
    ) -> Result<PathBuf> {
        let info = self.repo_info(repo, revision).await?;
        let repo_dir = cache.join(repo_folder(repo));
        let snapshot = repo_dir.join("snapshots").join(&info.sha);
        let progress = Progress::new(self.config.progress);
        tracing::info!(repo, revision, commit = %info.sha, cache = %cache.display(), "downloading model snapshot");

        // Small files first: the index among them decides which weight files to fetch.
        let mut support: Vec<&Sibling> = info
            .siblings
            .iter()
            .filter(|s| is_support_file(&s.rfilename))
            .collect();
        if matches!(set, FileSet::Model { gguf_file: Some(_) }) {
            support.retain(|s| s.rfilename != SAFETENSORS_INDEX);
        }
        self.fetch_all(repo, &info, &repo_dir, &snapshot, &support, &progress)
            .await?;

        let index_path = snapshot.join(SAFETENSORS_INDEX);
        let index = if support.iter().any(|s| s.rfilename == SAFETENSORS_INDEX) {
            Some(index_shards(&index_path)?)
        } else {
            None
        };
        let weights = select_weights(&info, set, index.as_ref())?;
        let weight_siblings: Vec<&Sibling> = info
            .siblings
            .iter()
            .filter(|s| weights.contains(&s.rfilename))
            .collect();
        self.fetch_all(
            repo,
            &info,
            &repo_dir,
            &snapshot,
            &weight_siblings,
            &progress,
        )
        .await?;
        progress.finish();

        verify_snapshot(&snapshot, set)?;
        if revision != info.sha {
            let refs = repo_dir.join("refs").join(revision);
            if let Some(parent) = refs.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&refs, &info.sha)
                .with_context(|| format!("writing {}", refs.display()))?;
        }
        tracing::info!(path = %snapshot.display(), "model snapshot ready");
        Ok(snapshot)
    }

    async fn fetch_all(
        &self,
        repo: &str,
        info: &RepoInfo,
        repo_dir: &Path,
        snapshot: &Path,
        files: &[&Sibling],
        progress: &Progress,
    ) -> Result<()> {
        futures::stream::iter(files.iter().map(|s| Ok::<_, anyhow::Error>(*s)))
            .try_for_each_concurrent(self.config.concurrency.max(1), |sibling| async move {
                let blob = self
                    .fetch_blob(repo, info, repo_dir, sibling, progress)
                    .await?;
                link_into_snapshot(&blob, snapshot, &sibling.rfilename)
            })
            .await
    }

    /// Makes `blobs/<etag>` complete, resuming a `.incomplete` file and retrying with back-off.
    async fn fetch_blob(
        &self,
        repo: &str,
        info: &RepoInfo,
        repo_dir: &Path,
        sibling: &Sibling,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let blobs = repo_dir.join("blobs");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let blob = blobs.join(sibling.blob_name(&info.sha));
        let size = sibling.size();
        if let Ok(meta) = std::fs::metadata(&blob)
            && size.is_none_or(|s| s == meta.len())
        {
            return Ok(blob);
        }
        let partial = blobs.join(format!("{}.incomplete", sibling.blob_name(&info.sha)));
        let lock = blobs.join(format!("{}.lock", sibling.blob_name(&info.sha)));
        let name = &sibling.rfilename;
        // Workers sharing a network volume start together: one downloads, the others wait.
        let _guard = match acquire_blob_lock(&lock, &blob, &partial, size, name).await? {
            Acquired::Done => return Ok(blob),
            Acquired::Lock(guard) => guard,
        };
        let url = self.url(&[repo, "resolve", &info.sha, &sibling.rfilename])?;
        let bar = progress.file(name, size);
        let mut last = None;
        for attempt in 0..self.config.attempts.max(1) {
            if attempt > 0 {
                let wait = self.backoff(attempt);
                tracing::warn!(file = %name, attempt, ?wait, "retrying download");
                tokio::time::sleep(wait).await;
            }
            match self
                .fetch_once(&url, &partial, size, repo, &info.sha, name, &bar)
                .await
            {
                Ok(()) => {
                    std::fs::rename(&partial, &blob)
                        .with_context(|| format!("moving {} into place", blob.display()))?;
                    bar.done();
                    return Ok(blob);
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(e)) => last = Some(e),
            }
        }
        let err = last.unwrap_or_else(|| anyhow!("no attempt made"));
        Err(err.context(format!(
            "downloading `{name}` failed after {} attempts",
            self.config.attempts
        )))
    }

    /// One attempt: append to the partial file from where it stops (HTTP Range).
    #[allow(clippy::too_many_arguments)]
    async fn fetch_once(
        &self,
        url: &Url,
        partial: &Path,
        size: Option<u64>,
        repo: &str,
        commit: &str,
        name: &str,
        bar: &FileBar,
    ) -> std::result::Result<(), Failure> {
        let io = |e: std::io::Error| {
            Failure::Fatal(anyhow!(e).context(format!("writing {}", partial.display())))
        };
        let mut have = tokio::fs::metadata(partial)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if size.is_some_and(|s| have > s) {
            have = 0;
        }
        if size.is_some_and(|s| have == s && s > 0) {
            return Ok(());
        }
        let mut req = self.request(url.clone());
        if have > 0 {
            req = req.header(header::RANGE, format!("bytes={have}-"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::Retry(anyhow!(e).context(format!("requesting `{name}`"))))?;
        let status = resp.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT if have > 0 && content_range_start(&resp) == Some(have) => {
                true
            }
            StatusCode::PARTIAL_CONTENT => {
                // A range we did not ask for: start over.
                tokio::fs::remove_file(partial).await.ok();
                return Err(Failure::Retry(anyhow!(
                    "unexpected partial content for `{name}`"
                )));
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                tokio::fs::remove_file(partial).await.ok();
                return Err(Failure::Retry(anyhow!(
                    "stale partial download of `{name}`"
                )));
            }
            s if s.is_success() => false,
            s => return Err(classify(s, repo, commit, Some(name))),
        };
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .await
            .map_err(io)?;
        let mut written = if append { have } else { 0 };
        bar.set_position(written, size);
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    file.flush().await.map_err(io)?;
                    return Err(Failure::Retry(
                        anyhow!(e).context(format!("reading `{name}`")),
                    ));
                }
            };
            file.write_all(&chunk).await.map_err(io)?;
            written += chunk.len() as u64;
            bar.set_position(written, size);
        }
        file.flush().await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        match size {
            Some(s) if written != s => Err(Failure::Retry(anyhow!(
                "`{name}` ended after {written} of {s} bytes"
            ))),
            _ => Ok(()),
        }
    }
}

/// A holder that has neither created nor grown the partial file for this long is presumed dead.
const LOCK_STALE: Duration = Duration::from_secs(60);
const LOCK_POLL: Duration = Duration::from_millis(200);

/// Ownership of one blob's download across processes (and workers on a shared volume): a lock
/// file created exclusively, removed when the download ends.
struct BlobLock(PathBuf);

impl Drop for BlobLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

enum Acquired {
    Lock(BlobLock),
    /// Someone else finished the blob while we waited.
    Done,
}

fn blob_complete(blob: &Path, size: Option<u64>) -> bool {
    std::fs::metadata(blob).is_ok_and(|m| size.is_none_or(|s| s == m.len()))
}

fn age(path: &Path) -> Option<Duration> {
    std::fs::metadata(path)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()
}

async fn acquire_blob_lock(
    lock: &Path,
    blob: &Path,
    partial: &Path,
    size: Option<u64>,
    name: &str,
) -> Result<Acquired> {
    let mut last_note = Instant::now();
    loop {
        if blob_complete(blob, size) {
            return Ok(Acquired::Done);
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(lock)
        {
            Ok(mut file) => {
                use std::io::Write;
                let _ = writeln!(file, "{}", std::process::id());
                return Ok(Acquired::Lock(BlobLock(lock.to_path_buf())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let lock_age = age(lock).unwrap_or_default();
                let progress_age = age(partial).unwrap_or(lock_age);
                if lock_age > LOCK_STALE && progress_age > LOCK_STALE {
                    tracing::warn!(file = name, "taking over a stale download lock");
                    let _ = std::fs::remove_file(lock);
                    continue;
                }
                if last_note.elapsed() > Duration::from_secs(10) {
                    last_note = Instant::now();
                    tracing::info!(
                        file = name,
                        "waiting for another worker downloading this file"
                    );
                }
                tokio::time::sleep(LOCK_POLL).await;
            }
            Err(e) => return Err(anyhow!(e).context(format!("creating {}", lock.display()))),
        }
    }
}

fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let value = resp.headers().get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

/// Maps an HTTP error status to a clear message, and whether trying again can help.
fn classify(status: StatusCode, repo: &str, revision: &str, file: Option<&str>) -> Failure {
    let what = match file {
        Some(f) => format!("`{f}` in {repo}@{revision}"),
        None => format!("{repo}@{revision}"),
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Failure::Fatal(anyhow!(
            "access to {what} denied (HTTP {status}): the repository is private or gated; \
             set HF_TOKEN to a token that may read it"
        )),
        StatusCode::NOT_FOUND => Failure::Fatal(anyhow!("{what} not found (HTTP 404)")),
        s if s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT
            || s.is_server_error() =>
        {
            Failure::Retry(anyhow!("{what}: HTTP {status}"))
        }
        s => Failure::Fatal(anyhow!("{what}: HTTP {s}")),
    }
}

/// `snapshots/<commit>/<file>` → `../../blobs/<etag>` (a relative symlink, else a copy).
fn link_into_snapshot(blob: &Path, snapshot: &Path, rfilename: &str) -> Result<()> {
    let target = snapshot.join(rfilename);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if target.is_file() {
        return Ok(());
    }
    let _ = std::fs::remove_file(&target); // a dangling link
    let depth = rfilename.split('/').count() + 1; // snapshots/<commit>/[dirs/]file
    let mut relative = PathBuf::new();
    for _ in 0..depth {
        relative.push("..");
    }
    relative.push("blobs");
    relative.push(blob.file_name().ok_or_else(|| anyhow!("bad blob path"))?);
    #[cfg(unix)]
    if std::os::unix::fs::symlink(&relative, &target).is_ok() {
        return Ok(());
    }
    std::fs::copy(blob, &target)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", blob.display(), target.display()))
}

/// Progress: bars on a terminal, log lines otherwise (docker build logs, RunPod logs).
struct Progress {
    bars: Option<MultiProgress>,
    log: bool,
}

impl Progress {
    fn new(enabled: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bars =
            (enabled && tty).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self {
            bars,
            log: enabled && !tty,
        }
    }

    fn file(&self, name: &str, size: Option<u64>) -> FileBar {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(size.unwrap_or(0)));
            let style = ProgressStyle::with_template(
                "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(name.to_string());
            bar
        });
        if self.log {
            tracing::info!(file = name, bytes = size, "downloading");
        }
        FileBar {
            bar,
            log: self.log,
            name: name.to_string(),
            started: Instant::now(),
            last_log: std::sync::Mutex::new(Instant::now()),
            position: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn finish(&self) {
        if let Some(m) = &self.bars {
            let _ = m.clear();
        }
    }
}

struct FileBar {
    bar: Option<ProgressBar>,
    log: bool,
    name: String,
    started: Instant,
    last_log: std::sync::Mutex<Instant>,
    position: std::sync::atomic::AtomicU64,
}

impl FileBar {
    fn set_position(&self, pos: u64, size: Option<u64>) {
        self.position
            .store(pos, std::sync::atomic::Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            if let Some(s) = size {
                bar.set_length(s);
            }
            bar.set_position(pos);
        }
        if self.log {
            let Ok(mut last) = self.last_log.lock() else {
                return;
            };
            if last.elapsed() >= Duration::from_secs(10) {
                *last = Instant::now();
                let pct = size.filter(|s| *s > 0).map(|s| pos * 100 / s);
                tracing::info!(file = %self.name, bytes = pos, percent = pct, "downloading");
            }
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.log {
            let bytes = self.position.load(std::sync::atomic::Ordering::Relaxed);
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let mb_s = bytes as f64 / secs / 1e6;
            tracing::info!(file = %self.name, bytes, mb_per_s = format!("{mb_s:.1}"), "downloaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(name: &str) -> Sibling {
        Sibling {
            rfilename: name.to_string(),
            size: None,
            blob_id: None,
            lfs: None,
        }
    }

    fn info(files: &[&str]) -> RepoInfo {
        RepoInfo {
            sha: "a".repeat(40),
            siblings: files.iter().map(|f| sib(f)).collect(),
        }
    }

    #[test]
    fn support_files_skip_duplicates_and_foreign_formats() {
        for keep in [
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "merges.txt",
            "chat_template.jinja",
            "model.safetensors.index.json",
            "1_Pooling/config.json",
        ] {
            assert!(is_support_file(keep), "{keep}");
        }
        for skip in [
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
            "onnx/config.json",
            "original/params.json",
            "README.md",
            "flax_model.msgpack",
            "model.safetensors",
        ] {
            assert!(!is_support_file(skip), "{skip}");
        }
    }

    #[test]
    fn weights_prefer_the_index_then_model_safetensors() {
        let listing = info(&[
            "model.safetensors",
            "consolidated.safetensors",
            "pytorch_model.bin",
        ]);
        let model = FileSet::Model { gguf_file: None };
        assert_eq!(
            select_weights(&listing, &model, None).unwrap(),
            vec!["model.safetensors"]
        );

        let sharded = info(&["a.safetensors", "b.safetensors", "consolidated.safetensors"]);
        let index: BTreeSet<String> = ["a.safetensors", "b.safetensors"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            select_weights(&sharded, &model, Some(&index)).unwrap(),
            vec!["a.safetensors", "b.safetensors"]
        );

        let missing: BTreeSet<String> = ["c.safetensors"].iter().map(|s| s.to_string()).collect();
        let err = select_weights(&sharded, &model, Some(&missing))
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.safetensors"), "{err}");
    }

    #[test]
    fn bin_only_repos_and_missing_gguf_are_clear_errors() {
        let model = FileSet::Model { gguf_file: None };
        let err = select_weights(&info(&["pytorch_model.bin"]), &model, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no .safetensors") && err.contains("pytorch_model.bin"),
            "{err}"
        );

        let gguf = FileSet::Model {
            gguf_file: Some("x.Q8_0.gguf".into()),
        };
        let err = select_weights(&info(&["x.Q4_0.gguf"]), &gguf, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.Q8_0.gguf") && err.contains("x.Q4_0.gguf"),
            "{err}"
        );
        assert_eq!(
            select_weights(
                &info(&["x.Q4_0.gguf", "model.safetensors"]),
                &FileSet::Model {
                    gguf_file: Some("x.Q4_0.gguf".into())
                },
                None
            )
            .unwrap(),
            vec!["x.Q4_0.gguf"]
        );
        assert!(
            select_weights(&info(&["model.safetensors"]), &FileSet::Tokenizer, None)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn repo_ids_and_revisions_are_validated() {
        for ok in ["gpt2", "org/name", "Qwen/Qwen2.5-0.5B-Instruct", "a_b/c.d"] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/b/c", "../x", "a/..", "org/na--me", "-a/b", "a b"] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
        assert!(validate_revision("refs/pr/1").is_ok());
        for bad in ["", "/abs", "../../etc", "a//b"] {
            assert!(validate_revision(bad).is_err(), "{bad}");
        }
        assert_eq!(repo_folder("org/name"), "models--org--name");
        assert_eq!(repo_folder("gpt2"), "models--gpt2");
    }

    #[test]
    fn blob_names_come_from_lfs_or_blob_id() {
        let mut s = sib("model.safetensors");
        s.lfs = Some(Lfs {
            sha256: "ab12".into(),
            size: Some(3),
        });
        s.blob_id = Some("ff00".into());
        assert_eq!(s.blob_name("c"), "ab12");
        s.lfs = None;
        assert_eq!(s.blob_name("c"), "ff00");
        s.blob_id = Some("../evil".into());
        assert_eq!(s.blob_name("c"), "c-model.safetensors");
    }

    #[test]
    fn debug_output_hides_the_token() {
        let config = HubConfig {
            endpoint: "http://127.0.0.1:1".into(),
            token: Some("hf_secret".into()),
            offline: false,
            attempts: 1,
            backoff: Duration::from_millis(1),
            concurrency: 1,
            progress: false,
            fallback_cache: std::env::temp_dir(),
        };
        let hub = Hub::new(config).unwrap();
        let shown = format!("{hub:?} {:?}", hub.config);
        assert!(
            !shown.contains("hf_secret") && shown.contains("redacted"),
            "{shown}"
        );
    }
}
