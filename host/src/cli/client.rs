//! A small client for the admin/ingest HTTP API, used by the CLI commands.

use anyhow::{bail, Context};
use serde_json::Value;

/// Talks to one `ordo serve` over HTTP.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for the server at `base` (e.g. `http://127.0.0.1:7070`).
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .context("building HTTP client")?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{}", self.base, path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        req.send().await.with_context(|| {
            format!(
                "cannot reach ordo at {} (is `ordo serve` running? set --server or ORDO_SERVER)",
                self.base
            )
        })
    }

    async fn json(&self, resp: reqwest::Response) -> anyhow::Result<Value> {
        let status = resp.status();
        let body = resp.bytes().await.context("reading response")?;
        let value: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("server answered {status}: {msg}");
        }
        Ok(value)
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        self.json(resp).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?;
        self.json(resp).await
    }

    /// `DELETE path`, JSON answer.
    pub async fn delete_json(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .send(self.request(reqwest::Method::DELETE, path))
            .await?;
        self.json(resp).await
    }

    /// `PUT path` with raw bytes.
    pub async fn put_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<Value> {
        let resp = self
            .send(self.request(reqwest::Method::PUT, path).body(bytes))
            .await?;
        self.json(resp).await
    }

    /// `GET path` as raw bytes; `None` on 404.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!("server answered {status}: {text}");
        }
        Ok(Some(
            resp.bytes().await.context("reading response")?.to_vec(),
        ))
    }

    /// Appends messages to a topic; returns their offsets.
    pub async fn produce(&self, topic: &str, batch: &Value) -> anyhow::Result<Vec<u64>> {
        let value = self
            .post_json(&format!("/v1/topics/{}/messages", encode(topic)), batch)
            .await?;
        let offsets = value
            .get("offsets")
            .and_then(Value::as_array)
            .context("response has no `offsets`")?;
        Ok(offsets.iter().filter_map(Value::as_u64).collect())
    }
}

/// Percent-encodes one path segment.
pub fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
