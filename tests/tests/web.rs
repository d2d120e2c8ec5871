//! The web client (`cim-route/web`, served by the route at `/`) in a real headless Chromium
//! against a real cluster (etcd, Redis, two servers, a route): `tests/web/e2e.mjs` drives two
//! browser pages through private chat (unread badge, "seen", typing), the group of everyone
//! online, a stored group created from the page, channel chat, a message full of markup, a
//! reload (the conversation list and history come back from the route) with offline replay, a server shutdown the page must survive (it asks this test to shut the
//! server down over a line protocol: `CONTROL shutdown-server <id>` on its stdout, `ok` on its
//! stdin), an administrator's kick (no reconnect after it) and a logout.
//!
//! Needs Debian's `chromium`, node and `tests/web/node_modules` (playwright-core):
//! `deploy/install-deps.sh --tests` (what ./test.sh runs) installs them; without them this test fails and says so.
//! Screenshots go to `target/web-client/` (also those of a failure: `failure-<name>.png`);
//! with `CIM_UPDATE_SCREENSHOTS=1` to `docs/` (`web-client.png`, `web-client-phone.png`,
//! shown by the README).

use anyhow::Context;
use cim_tests::cluster::Cluster;
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin, Command},
    task::JoinHandle,
};

/// A key of the business API, for the script's administrator kick.
const API_KEY: &str = "web-test-api-key-0123456789";

/// The whole browser scenario, cluster already running (it takes ~30 s).
const DEADLINE: Duration = Duration::from_secs(150);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

/// What is missing to run the browser test, if anything.
fn missing_prerequisites(root: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !chromium().exists() {
        missing.push(format!(
            "{} (Debian package chromium)",
            chromium().display()
        ));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        missing.push("node (Debian package nodejs)".into());
    }
    let playwright = root.join("tests/web/node_modules/playwright-core/package.json");
    if !playwright.exists() {
        missing.push(format!(
            "{} (npm ci in tests/web)",
            playwright.parent().unwrap_or(&playwright).display()
        ));
    }
    missing
}

/// Output of the script, kept for the failure message.
#[derive(Clone, Default)]
struct Transcript(Arc<Mutex<String>>);

impl Transcript {
    fn push(&self, line: &str) {
        let mut text = self.0.lock().unwrap_or_else(|e| e.into_inner());
        text.push_str(line);
        text.push('\n');
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads `stream` line by line into the transcript until it ends.
    fn collect(&self, stream: impl AsyncRead + Unpin + Send + 'static) -> JoinHandle<()> {
        let transcript = self.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                transcript.push(&line);
            }
        })
    }
}

/// Runs the script to its end, answering its control requests on `cluster`.
async fn drive(
    cluster: &mut Cluster,
    child: &mut Child,
    transcript: &Transcript,
) -> anyhow::Result<std::process::ExitStatus> {
    let stdout = child.stdout.take().context("script stdout")?;
    let mut stdin: ChildStdin = child.stdin.take().context("script stdin")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        transcript.push(&line);
        let Some(command) = line.strip_prefix("CONTROL ") else {
            continue;
        };
        let answer = match command.split_once(' ') {
            Some(("shutdown-server", id)) => match cluster.take_server(id) {
                Some(server) => {
                    server.shutdown().await?;
                    "ok".to_string()
                }
                None => format!("no server {id}"),
            },
            _ => format!("unknown command {command}"),
        };
        transcript.push(&format!("[test] {command}: {answer}"));
        stdin.write_all(format!("{answer}\n").as_bytes()).await?;
        stdin.flush().await?;
    }
    Ok(child.wait().await?)
}

#[tokio::test]
async fn web_client_chats_in_a_real_browser() -> anyhow::Result<()> {
    let root = repo_root();
    let missing = missing_prerequisites(&root);
    assert!(
        missing.is_empty(),
        "the browser test needs {}; run deploy/install-deps.sh --tests (as root or with sudo), \
         which installs them",
        missing.join(", ")
    );

    let mut cluster = Cluster::builder()
        .route_config(|c| c.api_keys = vec![API_KEY.into()])
        .start()
        .await?;
    let url = cluster.routes[0].url();

    let artifacts = root.join("target/web-client");
    let shots = if std::env::var_os("CIM_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs")
    } else {
        artifacts.clone()
    };
    std::fs::create_dir_all(&shots)?;
    std::fs::create_dir_all(&artifacts)?;
    let mut child = Command::new("node")
        .arg(root.join("tests/web/e2e.mjs"))
        .arg(&url)
        .arg("--screenshot")
        .arg(shots.join("web-client.png"))
        .arg("--phone-screenshot")
        .arg(shots.join("web-client-phone.png"))
        .args(["--require-two-servers", "--control", "--api-key", API_KEY])
        .arg("--artifacts")
        .arg(&artifacts)
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting node")?;
    let transcript = Transcript::default();
    let stderr = transcript.collect(child.stderr.take().context("script stderr")?);

    let outcome =
        tokio::time::timeout(DEADLINE, drive(&mut cluster, &mut child, &transcript)).await;
    let status = match outcome {
        Ok(status) => status?,
        Err(_) => {
            child.kill().await.ok();
            panic!(
                "the browser test did not finish within {DEADLINE:?}; its output:\n{}",
                transcript.text()
            );
        }
    };
    // The script has exited: its stderr ends (a browser it left behind could hold it open).
    let _ = tokio::time::timeout(Duration::from_secs(5), stderr).await;
    assert!(
        status.success(),
        "the browser test failed ({status}); its output:\n{}",
        transcript.text()
    );
    eprintln!("{}", transcript.text());
    Ok(())
}
