//! Running the real `ordo` binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ordo::cli::client::Client;
use serde_json::Value;

/// A running `ordo serve` on a free loopback port with its own data dir.
pub struct Server {
    child: Option<Child>,
    port: u16,
    /// The data directory (kept across restarts).
    pub data_dir: tempfile::TempDir,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
    /// `ORDO_LOG` filter and file the server's log (stderr) is appended to.
    log: Option<(String, PathBuf)>,
}

/// A loopback port for a server of this test process (see `ordo::ports`:
/// no connection the tests open can take it before the server binds it, or
/// while it restarts).
fn free_port() -> u16 {
    ordo::ports::free_loopback_port().expect("free port")
}

impl Server {
    /// Starts a server on a new data dir.
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts a server on a new data dir with extra `ordo serve` options.
    pub async fn start_with(args: &[&str]) -> Server {
        Self::start_with_env(args, &[]).await
    }

    /// Starts a server with extra options and environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            data_dir: tempfile::tempdir().expect("tempdir"),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: None,
        };
        server.spawn().await;
        server
    }

    /// Starts a server whose log goes to `file` (appended to, across
    /// restarts) with the `ORDO_LOG` filter `filter`.
    pub async fn start_logging(args: &[&str], filter: &str, file: &Path) -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            data_dir: tempfile::tempdir().expect("tempdir"),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            log: Some((filter.to_string(), file.to_path_buf())),
        };
        server.spawn().await;
        server
    }

    pub fn binary() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_ordo"))
    }

    /// SIGKILL, no waiting for anything but the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data dir and port.
    pub async fn respawn(&mut self) {
        self.spawn().await;
    }

    /// Sets (`Some`) or removes (`None`) an environment variable of the
    /// next spawn.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// Whether the process has exited by itself (e.g. at a crash point).
    pub fn exited(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                self.child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Waits up to `timeout` for the process to exit on its own. A peer sees
    /// its connections reset while the kernel is still tearing the process
    /// down, so `exited()` right after a failed request can race the reaper.
    pub async fn wait_exited(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(Self::binary());
        command
            .args(["serve", "--data-dir"])
            .arg(self.data_dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env(
                "ORDO_LOG",
                std::env::var("TEST_ORDO_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        if let Some((filter, file)) = &self.log {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(file)
                .unwrap_or_else(|e| panic!("opening log {}: {e}", file.display()));
            command.env("ORDO_LOG", filter).stderr(log);
        }
        let child = command.spawn().expect("spawn ordo serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http
                .get(format!("{}/healthz", self.base_url()))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            // A crash point may end it while it starts: the caller sees that
            // through `exited()`.
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ordo serve did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Base URL.
    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An API client.
    pub fn client(&self) -> Client {
        Client::new(&self.base_url(), None).expect("client")
    }

    /// SIGTERM, expect a clean exit (0), start again on the same data dir.
    pub async fn restart(&mut self) {
        self.terminate();
        self.spawn().await;
    }

    /// SIGTERM and wait; asserts exit status 0.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            let _ = Command::new("kill").args(["-TERM", &pid]).status();
            let status = child.wait().expect("wait");
            assert!(status.success(), "ordo serve exited with {status}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `GET /v1/status` until `handler`'s entry satisfies `done`; returns it.
pub async fn wait_for(
    client: &Client,
    handler: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let status = client.get_json("/v1/status").await.expect("status");
        let h = status["handlers"]
            .as_array()
            .and_then(|a| a.iter().find(|h| h["name"] == handler).cloned());
        if let Some(h) = h {
            if done(&h) {
                return h;
            }
        }
        assert!(
            Instant::now() < deadline,
            "handler {handler}: gave up waiting for {what}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `handler` has no lag and at least `processed` messages done.
pub async fn wait_drained(client: &Client, handler: &str, processed: u64) -> Value {
    wait_for(client, handler, "drained", |h| {
        h["lag"] == 0 && h["processed"].as_u64().unwrap_or(0) >= processed
    })
    .await
}

/// Scrapes `GET /metrics` and returns the value of one sample, given as it
/// appears in the exposition (`name{labels}`).
pub async fn metric(server: &Server, sample: &str) -> Option<f64> {
    let text = reqwest::get(format!("{}/metrics", server.base_url()))
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().expect("sample value"))
    })
}

/// A handler's state value as text.
pub async fn state(client: &Client, handler: &str, key: &str, state_key: &str) -> Option<String> {
    client
        .get_bytes(&format!("/v1/handlers/{handler}/state/{key}/{state_key}"))
        .await
        .expect("state get")
        .map(|b| String::from_utf8(b).expect("utf-8"))
}

/// Runs an `ordo` client command against this server; returns stdout, and
/// panics with stderr when it fails.
pub fn cli(server: &Server, args: &[&str]) -> String {
    let out = Command::new(Server::binary())
        .args(args)
        .env("ORDO_SERVER", server.base_url())
        .env_remove("ORDO_ADMIN_TOKEN")
        .output()
        .expect("run ordo");
    assert!(
        out.status.success(),
        "ordo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
