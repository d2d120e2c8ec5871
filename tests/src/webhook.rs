//! A webhook receiver for tests: an HTTP server on a free loopback port that keeps every
//! body POSTed to `/hook` with its `X-Cim-Signature` header. Stopped when dropped.

use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post, Router};
use serde_json::Value;
use std::sync::{Arc, Mutex};

type Got = Arc<Mutex<Vec<(Bytes, String)>>>;

pub struct WebhookReceiver {
    url: String,
    got: Got,
    task: tokio::task::JoinHandle<()>,
}

async fn hook(State(got): State<Got>, headers: HeaderMap, body: Bytes) -> &'static str {
    let sig = headers
        .get("x-cim-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    got.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((body, sig));
    "ok"
}

impl WebhookReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let got: Got = Arc::default();
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(got.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, got, task })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Every event received so far, in order (the `events` of each body).
    pub fn events(&self) -> Vec<Value> {
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|(body, _)| {
                let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                v["events"].as_array().cloned().unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}
