//! Admission caps against a real `cim-server` process: sockets that connect and never log in
//! cannot push the server past `max_pending_logins`, are refused at once beyond it with a
//! reason, and do not stop logged-in users from chatting. The server's resident memory and
//! open files are read from `/proc` before and after (printed; bounded loosely).

use cim_proto::codec::FrameCodec;
use cim_sdk::{
    pb::{frame::Body, ErrorCode, Frame},
    Transport,
};
use cim_tests::{cluster::Cluster, ServerProcess};
use futures_util::{stream::FuturesUnordered, StreamExt};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::codec::FramedRead;

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_cim-server");
/// Sockets opened that never log in.
const FLOOD: usize = 2_000;
/// The server's cap on connections logging in.
const PENDING_CAP: usize = 500;
/// All refusals arrive within this (they are answered at accept).
const REFUSALS_WITHIN: Duration = Duration::from_secs(30);

/// VmRSS in KiB and the number of open descriptors of process `pid`.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// What a refused socket reads: the one frame before the server closes.
async fn first_frame(stream: TcpStream) -> Option<Frame> {
    let mut frames = FramedRead::new(stream, FrameCodec::default());
    frames.next().await.and_then(Result::ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_log_in_stay_within_the_pending_cap() -> anyhow::Result<()> {
    let cluster = Cluster::builder().servers(0).routes(1).start().await?;
    let config = cluster.server_config(&|c| {
        c.max_pending_logins = PENDING_CAP;
        // The flood's admitted sockets stay for the whole test.
        c.login_timeout_ms = 120_000;
    });
    let server = ServerProcess::start(SERVER_BIN, config).await?;
    let pid = server.pid().expect("running");
    let route = cluster.route();
    cim_tests::wait_until(
        "the route to see the server",
        Duration::from_secs(10),
        || {
            let route = route.clone();
            async move { route.servers().await.is_ok_and(|s| s.len() == 1) }
        },
    )
    .await?;
    let mut alice = cluster.user("alice", Transport::Tcp).await?;
    let mut bob = cluster.user("bob", Transport::Tcp).await?;
    let before = usage(pid);

    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(server.tcp_addr()).await?);
    }
    // Every socket past the cap is answered at once and closed; those admitted wait for a
    // Login frame that never comes.
    let mut reads: FuturesUnordered<_> = flood.into_iter().map(first_frame).collect();
    let mut refused = 0;
    let deadline = tokio::time::Instant::now() + REFUSALS_WITHIN;
    while refused < FLOOD - PENDING_CAP {
        let frame = tokio::time::timeout_at(deadline, reads.next())
            .await
            .map_err(|_| anyhow::anyhow!("only {refused} refusals arrived"))?
            .expect("sockets left");
        match frame.and_then(|f| f.body) {
            Some(Body::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Overloaded as i32, "{e:?}");
                assert!(e.message.contains("logging in"), "{}", e.message);
                refused += 1;
            }
            other => panic!("a flood socket read {other:?}"),
        }
    }
    let health: serde_json::Value =
        reqwest::get(format!("http://{}/healthz", server.internal_addr()))
            .await?
            .json()
            .await?;
    assert_eq!(health["pending_logins"], PENDING_CAP, "{health}");
    assert_eq!(health["connections"], PENDING_CAP + 2, "{health}");

    // Logged-in users go on chatting.
    bob.send_private(alice.id(), "still here").await?;
    assert_eq!(alice.next_message().await?.body, "still here");
    // A new login to this server waits for room like any connection: refused now.
    let login = cluster.register_and_login("carol").await?;
    let stream = TcpStream::connect(&login.server.tcp_addr).await?;
    match first_frame(stream).await.and_then(|f| f.body) {
        Some(Body::Error(e)) => assert_eq!(e.code, ErrorCode::Overloaded as i32),
        other => panic!("carol read {other:?}"),
    }

    let after = usage(pid);
    eprintln!(
        "server before the flood: {} KiB resident, {} open files; with {PENDING_CAP} pending \
         and {} refused: {} KiB, {} open files",
        before.0,
        before.1,
        FLOOD - PENDING_CAP,
        after.0,
        after.1
    );
    // Only the admitted sockets hold descriptors; their memory is small (no frame read yet).
    assert!(
        after.1 <= before.1 + PENDING_CAP + 16,
        "open files {} -> {}",
        before.1,
        after.1
    );
    assert!(
        after.0 < before.0 + 64 * 1024,
        "resident {} -> {} KiB",
        before.0,
        after.0
    );
    drop(reads);
    Ok(())
}
