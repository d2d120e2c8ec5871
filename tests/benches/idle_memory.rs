//! Server memory per idle, logged-in connection, TCP and WebSocket, against a real cluster
//! (real Redis and etcd, one connection server in this process).
//!
//! `cargo bench -p cim-tests --bench idle_memory` opens 8,000 connections per transport
//! (two descriptors each in this one process, under the 20,000-file limit), waits until the
//! server counts them, and reports the growth of this process's resident memory divided by
//! the number of connections. Clients are plain blocking sockets on their own threads, so
//! the client side adds no user-space memory worth counting; login cost is kept out of the
//! measurement by claiming login slots and signing connect tokens directly (no HTTP, no
//! password hashing). Under `cargo test` it runs as a smoke test with 100 connections.

use cim_common::{
    pb::{frame::Body, Frame, Login},
    token::{ConnectClaims, TokenSigner},
};
use cim_tests::cluster::{Cluster, TEST_SECRET};
use prost::Message;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("statm resident field");
    pages * 4096
}

/// Opens a connection and logs in with `login`, over TCP or a minimal WebSocket client.
fn open(addr: SocketAddr, ws: bool, login: &Frame) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    let mut buf = [0u8; 1024];
    if ws {
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::Error::other("handshake refused"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(std::io::Error::other("upgrade refused"));
        }
        // One masked binary message (clients must mask).
        let payload = login.encode_to_vec();
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![0x82, 0x80 | 126];
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&out)?;
    } else {
        s.write_all(&cim_proto::codec::frame_to_bytes(login))?;
    }
    if s.read(&mut buf)? == 0 {
        return Err(std::io::Error::other("closed before LoginResult"));
    }
    Ok(s)
}

async fn measure(n: u64, ws: bool) -> anyhow::Result<f64> {
    let cluster = Cluster::builder().servers(1).routes(0).start().await?;
    let server = &cluster.servers[0];
    let backends =
        cim_common::backend::Backends::connect(&cluster.infra.backend_config(&cluster.prefix))
            .await
            .map_err(anyhow::Error::msg)?;
    let signer = TokenSigner::new(TEST_SECRET);
    let addr = if ws { server.ws_addr } else { server.tcp_addr };
    let mut logins = Vec::new();
    for user in 1..=n {
        let session = format!("s{user}");
        backends
            .store
            .claim_login(user, &session, Duration::from_secs(600), &|_| true)
            .await?;
        let token = signer.sign_connect(&ConnectClaims {
            user_id: user,
            user_name: format!("u{user}"),
            server_id: server.id.clone(),
            session,
            exp_ms: cim_common::time::now_ms() + 600_000,
        });
        logins.push(Frame::new(Body::Login(Login { token })));
    }
    let open_all = |logins: Vec<Frame>| {
        std::thread::spawn(move || {
            logins
                .iter()
                .map(|l| open(addr, ws, l))
                .collect::<std::io::Result<Vec<_>>>()
        })
    };
    // Warm the allocator and the server's tables with a first slice, then measure the rest.
    let warm_n = (n / 20).max(1) as usize;
    let rest = logins.split_off(warm_n);
    let warm = open_all(logins).join().expect("opener")?;
    let total = warm_n as u64;
    cim_tests::wait_until("warm-up connections", Duration::from_secs(60), || async {
        server.connection_count() as u64 == total
    })
    .await?;
    let before = rss_bytes();
    let chunks: Vec<Vec<Frame>> = rest
        .chunks(rest.len().div_ceil(4).max(1))
        .map(<[Frame]>::to_vec)
        .collect();
    let measured = rest.len() as u64;
    let mut sockets = Vec::new();
    for handle in chunks.into_iter().map(open_all).collect::<Vec<_>>() {
        sockets.extend(handle.join().expect("opener")?);
    }
    cim_tests::wait_until(
        "all connections counted",
        Duration::from_secs(120),
        || async { server.connection_count() as u64 == n },
    )
    .await?;
    let after = rss_bytes();
    drop((warm, sockets));
    Ok(after.saturating_sub(before) as f64 / measured as f64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not: run small then.
    let bench = std::env::args().any(|a| a == "--bench");
    let n = if bench { 8_000 } else { 100 };
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    for (ws, name) in [(false, "TCP"), (true, "WebSocket")] {
        let per = measure(n, ws).await?;
        println!("{name}: {per:.0} bytes of server memory per idle connection ({n} connections)");
    }
    Ok(())
}
