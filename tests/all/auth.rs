//! Admin token: every `/v1` call needs it when set; non-loopback binding
//! without one is refused.

use std::process::Command;

use ordo::cli::client::Client;
use serde_json::json;

use crate::fixtures::handler_bytes;
use crate::server::Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_call_needs_the_token_when_set() {
    let server = Server::start_with_env(&[], &[("ORDO_ADMIN_TOKEN", "s3cret-token")]).await;
    let base = server.base_url();
    let http = reqwest::Client::new();
    let calls = [
        http.get(format!("{base}/v1/status")),
        http.post(format!("{base}/v1/topics/t/messages"))
            .body(r#"{"key":"k","payload":"p"}"#),
        http.put(format!("{base}/v1/handlers/counter?topic=t"))
            .body(handler_bytes("counter")),
        http.get(format!("{base}/v1/dlq")),
        http.get(format!("{base}/v1/audit")),
    ];
    for call in calls {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret-token"),
            Some("Bearer s3cret-tokeN"),
        ] {
            let req = call.try_clone().expect("clone request");
            let req = match auth {
                Some(a) => req.header("authorization", a),
                None => req,
            };
            let resp = req.send().await.expect("request");
            assert_eq!(resp.status().as_u16(), 401, "{auth:?}");
            let body: serde_json::Value = resp.json().await.expect("json error");
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    // Health and metrics stay open (probes, scrapers).
    assert!(http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .expect("health")
        .status()
        .is_success());
    assert!(http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .status()
        .is_success());

    // With the token everything works, and nothing was appended before.
    let client = Client::new(&base, Some("s3cret-token".into())).expect("client");
    let offsets = client
        .produce("t", &json!({"key": "k", "payload": "p"}))
        .await
        .expect("produce");
    assert_eq!(offsets, vec![0]);
    client
        .put_bytes("/v1/handlers/counter?topic=t", handler_bytes("counter"))
        .await
        .expect("deploy");
    // The CLI reads the token from the environment.
    let out = Command::new(Server::binary())
        .args(["status", "--json"])
        .env("ORDO_SERVER", &base)
        .env("ORDO_ADMIN_TOKEN", "s3cret-token")
        .output()
        .expect("run ordo status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"counter\""));
    let out = Command::new(Server::binary())
        .args(["status"])
        .env("ORDO_SERVER", &base)
        .env_remove("ORDO_ADMIN_TOKEN")
        .output()
        .expect("run ordo status");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn non_loopback_listen_without_token_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(Server::binary())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("ORDO_ADMIN_TOKEN")
        .output()
        .expect("run ordo serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without an admin token") && stderr.contains("ORDO_ADMIN_TOKEN"),
        "{stderr}"
    );
    let out = Command::new(Server::binary())
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("ORDO_ADMIN_TOKEN", "  ")
        .output()
        .expect("run ordo serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
}
