//! The real `cim-standalone` binary, end to end: started on free ports (port 0, addresses
//! read back from its stdout) with backend settings that point nowhere, then a whole chat
//! through the client SDK (register, login, TCP and WebSocket JSON connections, private
//! messages both ways, a group message, online users, logout), then SIGTERM and a clean exit.
//! No etcd or Redis is started: the process must need neither.

use anyhow::{anyhow, bail, Context};
use cim_sdk::{
    pb::{self, frame::Body, Frame, KickReason, MessageKind, SendStatus},
    Connection, RouteClient, Transport,
};
use std::{path::PathBuf, process::Stdio, time::Duration};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout, Command},
};

/// Every wait of this test: generous for a loaded 2-core machine, never a guess at timing.
const DEADLINE: Duration = Duration::from_secs(20);

/// Backend settings of a cluster deployment that lead nowhere (port 1 refuses, 1 ms
/// deadline): if standalone tried to reach Redis or etcd, its start would fail.
const CONFIG: &str = r#"
[route]
connect_token_ttl_ms = 20000

[route.backend]
redis_url = "redis://127.0.0.1:1/0"
etcd_endpoints = ["http://127.0.0.1:1"]
timeout_ms = 1

[server.backend]
redis_url = "redis://127.0.0.1:1/0"
etcd_endpoints = ["http://127.0.0.1:1"]
timeout_ms = 1
"#;

/// The running binary. Killed on drop (also when the test fails); its stderr (the logs) goes
/// to a file that a failing test prints.
struct Process {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    _dir: tempfile::TempDir,
    log: PathBuf,
    route_url: String,
    tcp: String,
    ws: String,
    metrics: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- cim-standalone log ---\n{log}");
        }
    }
}

impl Process {
    async fn start() -> anyhow::Result<Process> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("standalone.toml");
        std::fs::write(&config, CONFIG)?;
        let log = dir.path().join("stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_cim-standalone"))
            .args(["--config".as_ref(), config.as_os_str()])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(["--tcp-listen", "127.0.0.1:0"])
            .args(["--ws-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            // Nothing from the caller's environment (CIM_* settings, a RUST_LOG) leaks in.
            .env_clear()
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning cim-standalone")?;
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));

        // The banner's `route:`, `tcp:`, `ws:` and `metrics:` lines carry the bound ports.
        let (mut route_url, mut tcp, mut ws, mut metrics) = (None, None, None, None);
        let read = async {
            let mut line = String::new();
            while route_url.is_none() || tcp.is_none() || ws.is_none() || metrics.is_none() {
                line.clear();
                if stdout.read_line(&mut line).await? == 0 {
                    bail!("cim-standalone closed stdout before printing its addresses");
                }
                let line = line.trim_end();
                if let Some(v) = line.strip_prefix("route: ") {
                    route_url = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("tcp: ") {
                    tcp = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("ws: ") {
                    ws = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("metrics: ") {
                    metrics = Some(v.to_string());
                }
            }
            Ok(())
        };
        let started = tokio::time::timeout(DEADLINE, read).await;
        let failure = match started {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(anyhow!("no addresses on stdout within {DEADLINE:?}")),
        };
        if let Some(e) = failure {
            let _ = child.kill().await;
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(e.context(format!("cim-standalone did not start; its log:\n{log}")));
        }
        Ok(Process {
            child,
            _stdout: stdout,
            _dir: dir,
            log,
            route_url: route_url.unwrap(),
            tcp: tcp.unwrap(),
            ws: ws.unwrap(),
            metrics: metrics.unwrap(),
        })
    }
}

/// The next frame matching `pick` (others, e.g. a Pong, are skipped), within the deadline.
async fn next_frame<T>(
    conn: &mut Connection,
    what: &str,
    mut pick: impl FnMut(Frame) -> Option<T>,
) -> anyhow::Result<T> {
    let wait = async {
        loop {
            match conn.recv().await? {
                Some(frame) => {
                    if let Some(found) = pick(frame) {
                        return Ok(found);
                    }
                }
                None => bail!("connection closed while waiting for {what}"),
            }
        }
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))?
}

/// Polls `check` every 20 ms until it holds, within the deadline: for a change inside the
/// other process that no event reports to us (a server detaches a closed connection in the
/// background).
async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let poll = async {
        while !check().await? {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    };
    tokio::time::timeout(DEADLINE, poll)
        .await
        .map_err(|_| anyhow!("timed out waiting for {what}"))?
}

async fn next_message(conn: &mut Connection) -> anyhow::Result<pb::Message> {
    let mut batch = next_frame(conn, "a pushed message", |f| match f.body {
        Some(Body::Push(p)) if !p.messages.is_empty() => Some(p.messages),
        _ => None,
    })
    .await?;
    assert_eq!(batch.len(), 1, "one message at a time here: {batch:?}");
    Ok(batch.remove(0))
}

async fn send(conn: &mut Connection, send: pb::Send) -> anyhow::Result<pb::SendResult> {
    let client_id = send.client_id;
    conn.send(&Frame::new(Body::Send(send))).await?;
    next_frame(conn, "the send result", |f| match f.body {
        Some(Body::SendResult(r)) if r.client_id == client_id => Some(r),
        _ => None,
    })
    .await
}

/// `GET` of an `http://host:port/path` URL over a plain TCP connection: the body.
async fn http_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("an http URL")?;
    let (host, path) = rest.split_once('/').context("a path")?;
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    let (head, body) = answer.split_once("\r\n\r\n").context("an HTTP answer")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_string())
}

/// Registers `name`, logs in and connects over `transport`.
async fn user(
    route: &RouteClient,
    name: &str,
    transport: Transport,
) -> anyhow::Result<(cim_sdk::LoginInfo, Connection)> {
    route.register(name, "secret-pw").await?;
    let login = route.login(name, "secret-pw").await?;
    let addr = match transport {
        Transport::Tcp => &login.server.tcp_addr,
        _ => &login.server.ws_addr,
    };
    let mut conn = Connection::connect(addr, transport).await?;
    let result = conn.login(&login.connect_token).await?;
    assert_eq!(result.user_id, login.user_id);
    assert_eq!(result.user_name, name);
    Ok((login, conn))
}

#[tokio::test]
async fn a_whole_chat_through_one_standalone_process() -> anyhow::Result<()> {
    let mut process = Process::start().await?;
    let route = RouteClient::new(&process.route_url);
    assert!(
        process.route_url.starts_with("http://127.0.0.1:"),
        "{}",
        process.route_url
    );

    // One server, the one printed, live in the in-memory registry.
    let servers = route.servers().await?;
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0].tcp_addr, process.tcp);
    assert_eq!(format!("ws://{}/ws", servers[0].ws_addr), process.ws);

    let (alice, mut alice_conn) = user(&route, "alice", Transport::Tcp).await?;
    let (bob, mut bob_conn) = user(&route, "bob", Transport::WsJson).await?;
    assert_eq!(alice.server.tcp_addr, process.tcp);
    assert_ne!(alice.user_id, bob.user_id);

    // Private, by id, TCP → WebSocket JSON.
    let r = send(
        &mut alice_conn,
        pb::Send {
            client_id: 1,
            kind: MessageKind::Private as i32,
            to_user_id: bob.user_id,
            body: "hi bob".into(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let m = next_message(&mut bob_conn).await?;
    assert_eq!((m.body.as_str(), m.sender_id), ("hi bob", alice.user_id));
    assert_eq!(
        (m.id.as_str(), m.kind()),
        (r.message_id.as_str(), MessageKind::Private)
    );

    // Private, by name, the other way.
    let r = send(
        &mut bob_conn,
        pb::Send {
            client_id: 2,
            kind: MessageKind::Private as i32,
            to_user_name: "alice".into(),
            body: "hello alice ✓".into(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(r.status(), SendStatus::Delivered, "{r:?}");
    let m = next_message(&mut alice_conn).await?;
    assert_eq!(
        (m.body.as_str(), m.sender_name.as_str()),
        ("hello alice ✓", "bob")
    );

    // Group: everyone online but the sender.
    let r = send(
        &mut alice_conn,
        pb::Send {
            client_id: 3,
            kind: MessageKind::Group as i32,
            body: "hello all".into(),
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(
        (r.status(), r.delivered),
        (SendStatus::Delivered, 1),
        "{r:?}"
    );
    let m = next_message(&mut bob_conn).await?;
    assert_eq!(
        (m.body.as_str(), m.kind()),
        ("hello all", MessageKind::Group)
    );

    // Online users.
    let online = route.online(&bob.session_token, None, None, None).await?;
    let names: Vec<&str> = online.users.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(online.users.iter().all(|u| u.server_id == alice.server.id));

    // Logout: alice's connection is kicked and closed, she leaves the online list, and a
    // message to her is stored for her next login.
    route.logout(&alice.session_token).await?;
    let reason = next_frame(&mut alice_conn, "the logout kick", |f| match f.body {
        Some(Body::Kick(k)) => Some(k.reason()),
        _ => None,
    })
    .await?;
    assert_eq!(reason, KickReason::LoggedOut);
    let closed = tokio::time::timeout(DEADLINE, async {
        while alice_conn.recv().await?.is_some() {}
        Ok::<_, cim_sdk::conn::ConnError>(())
    })
    .await;
    assert!(matches!(closed, Ok(Ok(()))), "{closed:?}");
    drop(alice_conn);
    eventually("alice to leave the online list", || async {
        let online = route.online(&bob.session_token, None, None, None).await?;
        let names: Vec<String> = online.users.into_iter().map(|u| u.name).collect();
        Ok(names == ["bob"])
    })
    .await?;
    let sent = route
        .send_private(&bob.session_token, alice.user_id, "are you there?")
        .await?;
    assert_eq!(sent.status, "stored");

    // Both roles' metrics in one answer: the route's, the server's, the process's. The
    // connections gauge and the disconnect are updated as the session ends, which the
    // online list above already saw; wait for the counter anyway (the ends race).
    eventually("alice's disconnect in the metrics", || async {
        let text = http_get(&process.metrics).await?;
        let reason = [("reason", "logged_out")];
        Ok(
            cim_common::metrics::sample(&text, "cim_server_disconnects_total", &reason)
                == Some(1.0),
        )
    })
    .await?;
    let text = http_get(&process.metrics).await?;
    assert_eq!(
        cim_common::metrics::sample(&text, "cim_route_logins_total", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        cim_common::metrics::sample(&text, "cim_server_logins_total", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        cim_common::metrics::sample(&text, "cim_server_connections", &[("transport", "tcp")]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        cim_common::metrics::sample(&text, "cim_server_connections", &[("transport", "ws")]),
        Some(1.0),
        "{text}"
    );
    let routed = |kind: &str, outcome: &str| {
        cim_common::metrics::sample(
            &text,
            "cim_route_messages_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    assert_eq!(routed("private", "delivered"), Some(2.0), "{text}");
    assert_eq!(routed("private", "stored"), Some(1.0), "{text}");
    assert_eq!(routed("group", "delivered"), Some(1.0), "{text}");
    assert_eq!(
        cim_common::metrics::sample(
            &text,
            "cim_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let samples = cim_common::metrics::parse_text(&text);
    assert!(
        samples.iter().all(|s| s.0 != "cim_backend_errors_total"),
        "memory backends never fail: no error series: {text}"
    );

    // SIGTERM: bob is told the server shuts down, and the process exits cleanly.
    let pid = process.child.id().context("the process is running")?;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    assert!(status.success());
    let reason = next_frame(&mut bob_conn, "the shutdown kick", |f| match f.body {
        Some(Body::Kick(k)) => Some(k.reason()),
        _ => None,
    })
    .await?;
    assert_eq!(reason, KickReason::ServerShutdown);
    drop(bob_conn);
    let exit = tokio::time::timeout(DEADLINE, process.child.wait()).await??;
    assert!(exit.success(), "exit status {exit}");
    let log = std::fs::read_to_string(&process.log)?;
    assert!(log.contains("SIGTERM received"), "{log}");
    assert!(
        !log.contains("development secret"),
        "a generated secret needs no warning: {log}"
    );
    Ok(())
}

/// README's first walkthrough ("Trying it by hand"), pasted line by line into one shell
/// against a standalone process (the README's fixed ports replaced by this test's free ones):
/// every command succeeds and prints what the README shows under it; afterwards alice can
/// log in at once (the walkthrough gave her login slot back, so the terminal client that the
/// README starts next is not refused) and bob gets the message it sent.
#[tokio::test]
async fn readme_walkthrough_works_when_pasted_line_by_line() -> anyhow::Result<()> {
    use cim_tests::docs::{markdown_code, run_shell_steps, shell_steps};
    use std::collections::BTreeMap;

    let process = Process::start().await?;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let steps: Vec<_> = shell_steps(&markdown_code(&readme, "## Trying it by hand"))
        .into_iter()
        // The process this test started stands for `./start.sh` (or the cluster).
        .filter(|s| !s.command.starts_with("./start.sh"))
        .collect();
    assert!(steps.len() >= 4, "the walkthrough has commands: {steps:?}");
    let route_addr = process.route_url.trim_start_matches("http://");
    let ws_addr = process
        .ws
        .trim_start_matches("ws://")
        .trim_end_matches("/ws");
    let replace = BTreeMap::from([
        ("localhost:8080".to_string(), route_addr.to_string()),
        ("127.0.0.1:9000".to_string(), process.tcp.clone()),
        ("127.0.0.1:9001".to_string(), ws_addr.to_string()),
    ]);
    let outputs = run_shell_steps(&steps, &replace, DEADLINE).await?;
    for out in &outputs {
        let command = &out.step.command;
        assert_eq!(out.status, 0, "`{command}` failed: {}", out.stdout);
        assert!(
            !out.stdout.contains("\"error\""),
            "`{command}` answered an error: {}",
            out.stdout
        );
        for fragment in out.step.expected_fragments() {
            let fragment = replace
                .iter()
                .fold(fragment, |f, (from, to)| f.replace(from, to));
            assert!(
                out.stdout.contains(&fragment),
                "`{command}` printed {}, README promises {fragment}",
                out.stdout
            );
        }
    }
    // What README promised is there: a stored message for bob.
    assert!(
        outputs
            .iter()
            .any(|o| o.stdout.contains("\"status\":\"stored\"")),
        "{outputs:?}"
    );

    let route = RouteClient::new(&process.route_url);
    let alice = route
        .login("alice", "secret1")
        .await
        .context("alice logs in right after the walkthrough")?;
    let mut alice_conn = Connection::connect(&alice.server.tcp_addr, Transport::Tcp).await?;
    alice_conn.login(&alice.connect_token).await?;
    let bob = route.login("bob", "secret2").await?;
    let mut bob_conn = Connection::connect(&bob.server.tcp_addr, Transport::Tcp).await?;
    bob_conn.login(&bob.connect_token).await?;
    let m = next_message(&mut bob_conn).await?;
    assert_eq!((m.sender_name.as_str(), m.body.as_str()), ("alice", "hi"));
    Ok(())
}
