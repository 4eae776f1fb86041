//! The status page, loaded in headless Chromium.

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;

use crate::fixtures::handler_bytes;
use crate::server::{wait_for, Server};

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("chromium is not installed: the status-page test needs it (scripts/test.sh installs Debian's `chromium` package)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_handlers_and_dead_letters() {
    let browser = chromium();
    let server = Server::start().await;
    let client = server.client();
    client
        .put_bytes("/v1/handlers/counter?topic=ui", handler_bytes("counter"))
        .await
        .expect("deploy");
    let batch = json!([
        {"key": "good", "payload": "{\"seq\":1}"},
        {"key": "good", "payload": "{\"seq\":2}"},
        {"key": "poison", "payload": "{\"seq\":1,\"fail\":\"permanent\"}"},
    ]);
    client.produce("ui", &batch).await.expect("produce");
    wait_for(&client, "counter", "processed", |h| {
        h["processed"] == 2 && h["dead_lettered"] == 1
    })
    .await;

    let profile = tempfile::tempdir().expect("profile dir");
    let out = tokio::task::spawn_blocking({
        let url = format!("{}/ui", server.base_url());
        let profile = profile.path().to_path_buf();
        move || {
            Command::new(browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--virtual-time-budget=5000",
                ])
                .arg(format!("--user-data-dir={}", profile.display()))
                .arg("--dump-dom")
                .arg(url)
                .output()
                .expect("run chromium")
        }
    })
    .await
    .expect("chromium task");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-loaded=\"true\""),
        "page did not load its data; chromium stderr: {}\nDOM: {dom}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The handler row: name, version 1, processed 2, one dead letter, one parked key.
    let row = dom
        .split("<tr>")
        .find(|r| r.contains(">counter<") && r.contains(">running<"))
        .unwrap_or_else(|| panic!("no handler row in {dom}"));
    let cells: Vec<&str> = row
        .split("<td")
        .skip(1)
        .map(|c| {
            c.split('>')
                .nth(1)
                .unwrap_or("")
                .split('<')
                .next()
                .unwrap_or("")
        })
        .collect();
    assert_eq!(cells[0], "counter", "{cells:?}");
    assert_eq!(cells[1], "1", "{cells:?}");
    assert_eq!(cells[6], "2", "processed: {cells:?}");
    assert_eq!(cells[9], "1", "dead letters: {cells:?}");
    assert_eq!(cells[11], "1", "parked keys: {cells:?}");
    assert!(dom.contains("asked to fail (permanent)"), "{dom}");
    assert!(dom.contains("poison (parked)"), "{dom}");
    assert!(dom.contains(">healthy<"), "{dom}");
}
