//! Runs the real `worker-candle` binary with a chosen environment and collects what it prints.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Variables a test's worker must not inherit from the developer's shell.
const SCRUBBED_PREFIXES: &[&str] = &["RUNPOD_", "MODEL_", "TOKENIZER_", "API_KEY", "HF_"];

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_worker-candle")
}

/// A fixture model folder under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn command(envs: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    for (key, _) in std::env::vars() {
        if SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
        .env("DEVICE", "cpu")
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .args(args);
    cmd
}

/// Runs to completion with a time limit.
pub fn run(envs: &[(String, String)], args: &[&str], limit: Duration) -> Output {
    let mut child = command(envs, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start worker-candle");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "worker-candle did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running worker that is killed when dropped.
pub struct Running {
    pub child: Child,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn start(envs: &[(String, String)], args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = command(envs, args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start worker-candle");
        Self {
            child,
            stderr_path,
            _dir: dir,
        }
    }

    /// Panics with the worker's log if it has exited (so a test does not wait for a dead worker).
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "worker-candle exited early ({status}); stderr:\n{}",
                self.stderr()
            );
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for `serve`'s "listening on http://ADDR" line; the base URL.
    pub fn wait_listening(&mut self, limit: Duration) -> String {
        let stdout = self.child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(limit) {
            Ok(url) => url,
            Err(_) => panic!("serve did not start; stderr:\n{}", self.stderr()),
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the exit status, killing the process after `limit`.
    pub fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "worker-candle did not exit within {limit:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
