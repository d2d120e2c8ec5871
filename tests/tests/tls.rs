//! TLS end to end, on a real cluster (etcd, Redis) with certificates made at test time
//! (`cim_tests::tls::TestPki`): logging in over an HTTPS route and chatting over TLS TCP and
//! `wss://`; a plain client on a TLS port failing within the handshake deadline; a client
//! trusting another CA refused; certificates replaced while the server runs (SIGHUP, and a
//! change of the files) and a failed reload keeping the certificate in use.

use anyhow::Context;
use cim_common::tls::{ServerTls, TlsConfig};
use cim_sdk::{
    conn::{ConnError, ConnectOptions},
    pb::SendStatus,
    Client, ClientConfig, ClientError, ClientTls, ConnState, Connection, Event, Events, TlsMode,
    Transport,
};
use cim_tests::{
    cluster::{Cluster, TestUser},
    tls::TestPki,
};
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const EVENT_DEADLINE: Duration = Duration::from_secs(20);
/// The servers' login (and handshake) deadline in these tests.
const LOGIN_TIMEOUT_MS: u64 = 1_000;

/// One server with `tls_listen` and `wss_listen`, and one route; the route serves HTTPS
/// when `https`. The route's test clients trust the test CA.
async fn cluster(pki: &TestPki, https: bool) -> anyhow::Result<Cluster> {
    let (server_tls, route_tls) = (pki.tls_config(), pki.tls_config());
    Cluster::builder()
        .servers(1)
        .server_config(move |c| {
            c.tls_listen = Some("127.0.0.1:0".into());
            c.wss_listen = Some("127.0.0.1:0".into());
            c.tls = server_tls.clone();
            c.login_timeout_ms = LOGIN_TIMEOUT_MS;
        })
        .route_config(move |c| {
            if https {
                c.tls = route_tls.clone();
            }
        })
        .client_tls(pki.client_tls())
        .start()
        .await
}

fn password(name: &str) -> String {
    format!("password-{name}")
}

fn config(cluster: &Cluster, pki: &TestPki, name: &str, transport: Transport) -> ClientConfig {
    ClientConfig {
        transport,
        ca_file: Some(pki.ca_file.clone()),
        ..ClientConfig::new(&cluster.route_url(), name, &password(name))
    }
}

async fn next_event(events: &mut Events) -> anyhow::Result<Event> {
    tokio::time::timeout(EVENT_DEADLINE, events.next())
        .await
        .context("no event in time")?
        .context("events ended")
}

/// Registers and connects `name`; returns the client, its events and the address it
/// connected to.
async fn user(config: ClientConfig) -> anyhow::Result<(Client, Events, String)> {
    Client::register_with(&config).await?;
    let (client, mut events) = Client::connect(config).await?;
    match next_event(&mut events).await? {
        Event::State(ConnState::Connected { addr, .. }) => Ok((client, events, addr)),
        other => anyhow::bail!("first event {other:?}"),
    }
}

/// `alice` sends `bob` a message; bob's events show it.
async fn chat(alice: &Client, bob: &Client, bob_events: &mut Events) -> anyhow::Result<()> {
    let body = format!("secret hello {}", rand_suffix());
    let sent = alice.send(bob.info().user_id.into(), &body).await?;
    assert_eq!(sent.status, SendStatus::Delivered);
    loop {
        if let Event::Message { message, .. } = next_event(bob_events).await? {
            assert_eq!(message.body, body);
            assert_eq!(message.sender_id, alice.info().user_id);
            return Ok(());
        }
    }
}

/// `cim_server_connections` of the cluster's first server, by transport.
async fn connections(cluster: &Cluster, transport: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!(
        "http://{}/metrics",
        cluster.servers[0].internal_addr
    ))
    .await?
    .text()
    .await?;
    cim_common::metrics::sample(&text, "cim_server_connections", &[("transport", transport)])
        .context("no cim_server_connections series")
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[tokio::test]
async fn login_over_https_then_chat_over_tls_tcp() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let cluster = cluster(&pki, true).await?;
    assert!(
        cluster.route_url().starts_with("https://"),
        "{}",
        cluster.route_url()
    );
    let tls_addr = cluster.servers[0].tls_addr.context("tls listener")?;
    // What the login offers: the TLS addresses beside the plain ones.
    let login = cluster.register_and_login("carol").await?;
    assert_eq!(login.server.tls_addr, Some(tls_addr.to_string()));
    let wss = cluster.servers[0].wss_addr.context("wss listener")?;
    assert_eq!(login.server.wss_addr, Some(wss.to_string()));
    assert_eq!(
        login.server.tcp_addr,
        cluster.servers[0].tcp_addr.to_string()
    );
    cluster.route().logout(&login.session_token).await?;

    // `--tls auto` with an https route: the TLS address.
    let (alice, _alice_events, alice_addr) =
        user(config(&cluster, &pki, "alice", Transport::Tcp)).await?;
    let bob_config = ClientConfig {
        tls: TlsMode::On,
        ..config(&cluster, &pki, "bob", Transport::Tcp)
    };
    let (bob, mut bob_events, bob_addr) = user(bob_config).await?;
    assert_eq!(alice_addr, tls_addr.to_string());
    assert_eq!(bob_addr, tls_addr.to_string());
    chat(&alice, &bob, &mut bob_events).await?;
    chat(&alice, &bob, &mut bob_events).await?;

    // `--tls off`: the plain listener still serves, behind the same https route.
    let (dave, _dave_events, dave_addr) = user(ClientConfig {
        tls: TlsMode::Off,
        ..config(&cluster, &pki, "dave", Transport::Tcp)
    })
    .await?;
    assert_eq!(dave_addr, cluster.servers[0].tcp_addr.to_string());
    chat(&dave, &bob, &mut bob_events).await?;
    // The metrics tell the transports apart: alice and bob over TLS, dave over plain TCP.
    assert_eq!(connections(&cluster, "tls").await?, 2.0);
    assert_eq!(connections(&cluster, "tcp").await?, 1.0);
    assert_eq!(connections(&cluster, "wss").await?, 0.0);
    Ok(())
}

#[tokio::test]
async fn chat_over_wss() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let cluster = cluster(&pki, true).await?;
    let wss = cluster.servers[0].wss_addr.context("wss listener")?;
    let (alice, _alice_events, alice_addr) =
        user(config(&cluster, &pki, "alice", Transport::WsBinary)).await?;
    let (bob, mut bob_events, bob_addr) =
        user(config(&cluster, &pki, "bob", Transport::WsJson)).await?;
    assert_eq!(alice_addr, wss.to_string());
    assert_eq!(bob_addr, wss.to_string());
    chat(&alice, &bob, &mut bob_events).await?;

    // The raw protocol over wss:// too, next to a plain WebSocket user.
    let tls = pki.client_tls();
    let mut erin = TestUser::connect_with(
        cluster.register_and_login("erin").await?,
        Transport::WsBinary,
        Some(&tls),
    )
    .await?;
    let mut frank = TestUser::connect(
        cluster.register_and_login("frank").await?,
        Transport::WsBinary,
    )
    .await?;
    let result = erin.send_private(frank.id(), "over wss").await?;
    assert_eq!(result.status, SendStatus::Delivered as i32);
    let push = frank.next_push().await?;
    assert_eq!(push.messages[0].body, "over wss");
    // alice, bob and erin over wss, frank over plain WebSocket.
    assert_eq!(connections(&cluster, "wss").await?, 3.0);
    assert_eq!(connections(&cluster, "ws").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn an_http_route_with_tls_servers_stays_plain_unless_asked() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let cluster = cluster(&pki, false).await?;
    assert!(cluster.route_url().starts_with("http://"));
    let server = &cluster.servers[0];
    // Auto with an http route: plain, although TLS is offered.
    let (alice, _a, alice_addr) = user(config(&cluster, &pki, "alice", Transport::Tcp)).await?;
    assert_eq!(alice_addr, server.tcp_addr.to_string());
    // On: TLS to the server, whatever the route's scheme.
    let (bob, mut bob_events, bob_addr) = user(ClientConfig {
        tls: TlsMode::On,
        ..config(&cluster, &pki, "bob", Transport::Tcp)
    })
    .await?;
    assert_eq!(bob_addr, server.tls_addr.context("tls")?.to_string());
    chat(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// Reads until the server closes (or resets) the connection; the time it took.
async fn closed_within(mut stream: TcpStream, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .context("the server kept the connection open")?;
    Ok(started.elapsed())
}

#[tokio::test]
async fn a_plain_client_on_a_tls_port_fails_cleanly_within_the_deadline() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let cluster = cluster(&pki, true).await?;
    let server = &cluster.servers[0];
    let tls_addr = server.tls_addr.context("tls")?;
    let wss_addr = server.wss_addr.context("wss")?;
    let limit = Duration::from_millis(LOGIN_TIMEOUT_MS) + Duration::from_secs(2);

    // A plain cim client that logs in: its Login frame is no TLS record; an error, at once.
    let login = cluster.register_and_login("alice").await?;
    let started = Instant::now();
    let mut conn = Connection::connect(&tls_addr.to_string(), Transport::Tcp).await?;
    let refused = tokio::time::timeout(limit, conn.login(&login.connect_token))
        .await
        .context("a plain login on the TLS port hung")?;
    assert!(refused.is_err(), "{refused:?}");
    assert!(started.elapsed() < limit);
    // A plain WebSocket client on the wss port: the handshake fails the same way.
    let ws = tokio::time::timeout(
        limit,
        Connection::connect(&wss_addr.to_string(), Transport::WsBinary),
    )
    .await
    .context("a plain WebSocket handshake on the wss port hung")?;
    assert!(ws.is_err(), "a ws:// handshake on the wss port succeeded");

    // A client that says nothing at all is closed at the handshake deadline.
    let silent = TcpStream::connect(tls_addr).await?;
    let took = closed_within(silent, limit).await?;
    assert!(
        took >= Duration::from_millis(LOGIN_TIMEOUT_MS / 2),
        "closed after {took:?}, before the deadline"
    );

    // Plain HTTP to the HTTPS route: refused, and the route's accept loop goes on.
    let route_addr = cluster.routes[0].http_addr;
    let mut plain = TcpStream::connect(route_addr).await?;
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, plain.read_to_end(&mut answer))
        .await
        .context("plain HTTP on the HTTPS port hung")?;
    assert!(
        !answer.starts_with(b"HTTP/1.1 200"),
        "plain HTTP was served: {}",
        String::from_utf8_lossy(&answer)
    );

    // Everything still serves TLS clients (the login slot of the failed attempt has expired
    // or is taken over: log in as someone else).
    let (_bob, _events, bob_addr) = user(config(&cluster, &pki, "bob", Transport::Tcp)).await?;
    assert_eq!(bob_addr, tls_addr.to_string());
    Ok(())
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused() -> anyhow::Result<()> {
    let pki = TestPki::new();
    let cluster = cluster(&pki, true).await?;
    let tls_addr = cluster.servers[0].tls_addr.context("tls")?.to_string();
    let wss_addr = cluster.servers[0].wss_addr.context("wss")?.to_string();
    let other = ClientTls::new(Some(&pki.other_ca_file()))?;

    for (addr, transport) in [
        (&tls_addr, Transport::Tcp),
        (&wss_addr, Transport::WsBinary),
    ] {
        match Connection::connect_tls(addr, transport, ConnectOptions::default(), &other).await {
            Err(ConnError::Tls { source, .. }) => {
                let text = source.to_string();
                assert!(text.contains("certificate"), "{transport:?}: {text}");
            }
            Err(other) => panic!("{transport:?}: not a TLS refusal: {other}"),
            Ok(_) => panic!("{transport:?}: connected trusting another CA"),
        }
        // Trusting the right CA, but calling the server by a name the certificate lacks.
        let stream = TcpStream::connect(addr.as_str()).await?;
        let err = pki
            .client_tls()
            .connect("im.example.org:1", stream)
            .await
            .err()
            .context("a certificate for localhost passed for im.example.org")?;
        assert!(err.to_string().contains("certificate"), "{err}");
    }

    // The SDK with the other CA: the HTTPS route is refused before any login.
    let mut config = config(&cluster, &pki, "alice", Transport::Tcp);
    config.ca_file = Some(pki.other_ca_file());
    match Client::register_with(&config).await {
        Err(e @ ClientError::Route(_)) => assert!(e.is_transport(), "{e}"),
        other => panic!("registered through a route it cannot trust: {other:?}"),
    }
    // And a CA file that is not one is an error of its own, not a refused connection.
    config.ca_file = Some(pki.dir().join("absent.pem"));
    match Client::connect(config).await {
        Err(ClientError::Tls(message)) => assert!(message.contains("absent.pem"), "{message}"),
        other => panic!("{other:?}"),
    }
    Ok(())
}

/// The certificate a TLS client is shown at `addr`.
async fn presented(addr: SocketAddr, tls: &ClientTls) -> anyhow::Result<Vec<u8>> {
    let stream = TcpStream::connect(addr).await?;
    let stream = tls.connect(&addr.to_string(), stream).await?;
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .context("no peer certificate")?;
    Ok(certs[0].to_vec())
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_connections() -> anyhow::Result<()> {
    let mut pki = TestPki::new();
    let cluster = cluster(&pki, false).await?;
    let server = &cluster.servers[0];
    let tls_addr = server.tls_addr.context("tls")?;
    let tls = pki.client_tls();
    let first = pki.server_der.clone();
    assert_eq!(presented(tls_addr, &tls).await?, first);
    // A connection opened before the reload keeps working after it.
    let mut before = TestUser::connect_with(
        cluster.register_and_login("alice").await?,
        Transport::Tcp,
        Some(&tls),
    )
    .await?;

    let mut reloads = server.tls_reloads.clone().context("reload watch")?;
    let seen = *reloads.borrow_and_update();
    let second = pki.reissue();
    assert_ne!(first, second);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    assert!(status.success(), "kill -HUP failed");
    tokio::time::timeout(EVENT_DEADLINE, reloads.wait_for(|n| *n > seen))
        .await
        .context("no reload after SIGHUP")??;
    assert_eq!(presented(tls_addr, &tls).await?, second);
    assert_eq!(
        presented(server.wss_addr.context("wss")?, &tls).await?,
        second,
        "the wss listener shares the certificate"
    );

    let bob = cluster.register_and_login("bob").await?;
    let mut after = TestUser::connect_with(bob, Transport::Tcp, Some(&tls)).await?;
    let result = before.send_private(after.id(), "across the reload").await?;
    assert_eq!(result.status, SendStatus::Delivered as i32);
    assert_eq!(
        after.next_push().await?.messages[0].body,
        "across the reload"
    );
    Ok(())
}

/// A `ServerTls` on its own listener: each accepted connection gets a handshake.
async fn serve(tls: std::sync::Arc<ServerTls>) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                if let Ok(mut stream) = tls.accept(stream, Duration::from_secs(5)).await {
                    let _ = stream.write_all(b"hi").await;
                    let _ = stream.shutdown().await;
                }
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn changed_files_are_reloaded_and_a_broken_reload_keeps_the_old_certificate(
) -> anyhow::Result<()> {
    let mut pki = TestPki::new();
    let tls = ServerTls::load(&pki.tls_config())?;
    let addr = serve(tls.clone()).await?;
    let client = pki.client_tls();
    let first = pki.server_der.clone();
    assert_eq!(presented(addr, &client).await?, first);

    // Broken files: the reload fails, naming the file, and the old certificate stays.
    let original_cert = std::fs::read(&pki.cert_file)?;
    std::fs::write(&pki.cert_file, "-----BEGIN CERTIFICATE-----\nnot base64\n")?;
    let err = tls
        .reload(false)
        .expect_err("a broken certificate was loaded");
    assert!(err.to_string().contains("cert.pem"), "{err}");
    assert_eq!(presented(addr, &client).await?, first);
    // A new key beside the old certificate (a half-done copy): refused too.
    let second = pki.reissue();
    std::fs::write(&pki.cert_file, &original_cert)?;
    let err = tls
        .reload(true)
        .expect_err("a key of another certificate was loaded");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(presented(addr, &client).await?, first);
    assert_eq!(*tls.reloads().borrow(), 0, "no reload succeeded");

    // The watcher notices changed files by itself (no signal).
    let mut reloads = tls.reloads();
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(tls.clone().watch(Duration::from_millis(50), cancel.clone()));
    let third = pki.reissue();
    assert_ne!(second, third);
    tokio::time::timeout(EVENT_DEADLINE, reloads.wait_for(|n| *n >= 1))
        .await
        .context("changed files were not reloaded")??;
    assert_eq!(presented(addr, &client).await?, third);
    cancel.cancel();

    // Unchanged files are not reloaded again.
    assert!(!tls.reload(false)?, "reloaded unchanged files");
    assert!(matches!(
        ServerTls::load(&TlsConfig::default()),
        Err(cim_common::tls::TlsError::NotConfigured)
    ));
    Ok(())
}
