//! Running the real `ordo` binary as a child process.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ordo::cli::client::Client;

/// A running `ordo serve` on a free loopback port with its own data dir.
pub struct Server {
    child: Option<Child>,
    port: u16,
    /// The data directory (kept across restarts).
    pub data_dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Server {
    /// Starts a server on a new data dir.
    pub async fn start() -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            data_dir: tempfile::tempdir().expect("tempdir"),
        };
        server.spawn().await;
        server
    }

    fn binary() -> PathBuf {
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

    async fn spawn(&mut self) {
        let child = Command::new(Self::binary())
            .args(["serve", "--data-dir"])
            .arg(self.data_dir.path())
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .env("ORDO_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ordo serve");
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
            assert!(
                Instant::now() < deadline,
                "ordo serve did not become healthy"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Base URL.
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
