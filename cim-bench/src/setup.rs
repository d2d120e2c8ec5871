//! Everything a scenario needs before it measures: the cluster's backends, the live servers
//! and routes, bench accounts with their login slots and connect tokens, and opening logged-in
//! connections.

use anyhow::Context;
use cim_common::{
    backend::{BackendConfig, Backends},
    registry::{ServiceInfo, ServiceKind},
    store::ClaimOutcome,
    token::{ConnectClaims, TokenSigner},
};
use cim_sdk::{
    conn::{ConnError, ConnectOptions, Connection, Transport},
    pb::{frame::Body, Frame, Ping},
    ClientTls,
};
use futures_util::{stream, StreamExt};
use std::{net::IpAddr, sync::Arc, time::Duration};

/// Store calls in flight while preparing users (Redis answers each in well under a
/// millisecond; more in flight would only queue).
const STORE_CONCURRENCY: usize = 64;

/// Connections being opened at once by [`Setup::open_all`].
const OPEN_CONCURRENCY: usize = 256;

/// Deadline of one connect + login.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(15);

/// Deadline of a polite close.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest write of one receiver's acks: a server that does not read them for this long
/// lost the connection.
const ACK_DEADLINE: Duration = Duration::from_secs(5);

/// The password hash of bench accounts: not a valid argon2 hash, so no password verifies and
/// the accounts cannot be logged in to through a route.
const NO_PASSWORD: &str = "-";

/// A connection to the cluster under test: its Redis and etcd, the cluster secret, and an
/// HTTP client for the `/healthz` probes.
pub struct Setup {
    pub(crate) backends: Backends,
    pub(crate) signer: TokenSigner,
    pub(crate) redis_url: String,
    pub(crate) http: reqwest::Client,
    pub(crate) progress: bool,
    /// Connect over TLS (servers' `tls_addr` / `wss_addr`), trusting this.
    pub(crate) tls: Option<ClientTls>,
}

/// One bench user, ready to connect: its login slot is claimed and its token signed.
#[derive(Debug, Clone)]
pub struct BenchUser {
    /// Position in the scenario's user list (`name` is `bench-{user_offset + index}`).
    pub index: usize,
    pub id: u64,
    pub name: String,
    pub session: String,
    pub server: Arc<ServiceInfo>,
    pub connect_token: String,
}

impl BenchUser {
    /// The server address for `transport` (plain).
    pub fn addr(&self, transport: Transport) -> &str {
        self.addr_for(transport, false)
    }

    /// The server address for `transport`, the TLS one when `tls` (empty when the server
    /// offers none).
    pub fn addr_for(&self, transport: Transport, tls: bool) -> &str {
        match (transport, tls) {
            (Transport::Tcp, false) => &self.server.tcp_addr,
            (Transport::Tcp, true) => &self.server.tls_addr,
            (Transport::WsBinary | Transport::WsJson, false) => &self.server.ws_addr,
            (Transport::WsBinary | Transport::WsJson, true) => &self.server.wss_addr,
        }
    }
}

/// Users prepared for a scenario, and the reasons why the others could not be.
pub struct Prepared {
    pub users: Vec<BenchUser>,
    pub failures: Vec<String>,
}

/// A logged-in connection and the heartbeat interval its server asked for.
pub struct Opened {
    pub user: BenchUser,
    pub conn: Connection,
    pub heartbeat: Duration,
}

impl Setup {
    /// Connects to the cluster's Redis and etcd. `secret` is the cluster secret (it signs the
    /// connect tokens).
    pub async fn connect(config: &BackendConfig, secret: &str) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let backends = Backends::connect(config)
            .await
            .map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            backends,
            signer: TokenSigner::new(secret),
            redis_url: config.redis_url.clone(),
            http,
            progress: false,
            tls: None,
        })
    }

    /// Prints a progress line to stderr every second while a scenario runs (off by default).
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    /// Connects over TLS (the servers' `tls_addr` / `wss_addr`), trusting what `tls` trusts.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// What TLS connections trust, if the bench connects over TLS.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// The live members of `kind`, sorted by id.
    pub async fn members(&self, kind: ServiceKind) -> anyhow::Result<Vec<ServiceInfo>> {
        let rx = self
            .backends
            .registry
            .watch(kind)
            .await
            .with_context(|| format!("reading the live {} from the registry", kind.as_str()))?;
        let members = rx.borrow().as_ref().clone();
        Ok(members)
    }

    /// The live connection servers (at least one, or an error).
    pub async fn servers(&self) -> anyhow::Result<Vec<ServiceInfo>> {
        let servers = self.members(ServiceKind::Server).await?;
        if servers.is_empty() {
            anyhow::bail!("no live connection server in the registry (wrong --prefix or --etcd?)");
        }
        Ok(servers)
    }

    /// The id of account `name`, created when missing.
    async fn user_id(&self, name: &str) -> anyhow::Result<u64> {
        let store = &self.backends.store;
        if let Some(user) = store.user_by_name(name).await? {
            return Ok(user.id);
        }
        if let Some(id) = store.create_user(name, NO_PASSWORD).await? {
            return Ok(id);
        }
        // Created concurrently by someone else (another bench process) between the two calls.
        Ok(store
            .user_by_name(name)
            .await?
            .with_context(|| format!("account {name} vanished"))?
            .id)
    }

    /// Prepares users `bench-{offset}` … `bench-{offset + n - 1}`: creates missing accounts,
    /// claims each login slot (pending for `ttl`, the time the caller needs to connect them
    /// all) and signs a connect token for the server `place(index)` returns.
    pub async fn prepare_users(
        &self,
        offset: u64,
        n: usize,
        ttl: Duration,
        place: impl Fn(usize) -> Arc<ServiceInfo>,
    ) -> anyhow::Result<Prepared> {
        let live: Vec<String> = self
            .members(ServiceKind::Server)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        let results: Vec<anyhow::Result<Result<BenchUser, String>>> =
            stream::iter((0..n).map(|index| {
                let server = place(index);
                let live = &live;
                async move {
                    let name = format!("bench-{}", offset + index as u64);
                    let id = self.user_id(&name).await?;
                    // One session name per user, the same in every run: a run that died
                    // between claiming and connecting left a pending slot under this name,
                    // which the next run can release instead of waiting for it to expire.
                    let session = format!("bench-{id}");
                    let mut outcome = self.claim(id, &session, ttl, live).await?;
                    if outcome == ClaimOutcome::Contended {
                        self.backends.store.release_login(id, &session).await?;
                        outcome = self.claim(id, &session, ttl, live).await?;
                    }
                    match outcome {
                        ClaimOutcome::Claimed => {}
                        ClaimOutcome::Held { .. } => {
                            return Ok(Err("already_logged_in (connected)".to_string()))
                        }
                        ClaimOutcome::Contended => {
                            return Ok(Err("already_logged_in (pending)".to_string()))
                        }
                    }
                    let exp_ms = cim_common::time::now_ms()
                        + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
                    let connect_token = self.signer.sign_connect(&ConnectClaims {
                        user_id: id,
                        user_name: name.clone(),
                        server_id: server.id.clone(),
                        session: session.clone(),
                        exp_ms,
                    });
                    Ok(Ok(BenchUser {
                        index,
                        id,
                        name,
                        session,
                        server,
                        connect_token,
                    }))
                }
            }))
            .buffered(STORE_CONCURRENCY)
            .collect()
            .await;
        let mut prepared = Prepared {
            users: Vec::with_capacity(n),
            failures: Vec::new(),
        };
        for result in results {
            match result.context("preparing bench users in the store")? {
                Ok(user) => prepared.users.push(user),
                Err(reason) => prepared.failures.push(reason),
            }
        }
        Ok(prepared)
    }

    async fn claim(
        &self,
        id: u64,
        session: &str,
        ttl: Duration,
        live: &[String],
    ) -> anyhow::Result<ClaimOutcome> {
        Ok(self
            .backends
            .store
            .claim_login(id, session, ttl, &|s| live.iter().any(|l| l == s))
            .await?)
    }

    /// Frees the login slots of `users` that are still theirs (users whose connection closed
    /// are already free: the server detached them; this catches those that never connected).
    pub async fn release(&self, users: impl IntoIterator<Item = &BenchUser>) {
        let store = &self.backends.store;
        stream::iter(users)
            .for_each_concurrent(STORE_CONCURRENCY, |u| async move {
                if let Err(e) = store.release_login(u.id, &u.session).await {
                    eprintln!("cim-bench: releasing the login slot of {}: {e}", u.name);
                }
            })
            .await;
    }

    /// Waits until none of `users` is routed to a server any more (servers detach closed
    /// connections in the background), at most 10 s: the next scenario of a baseline must not
    /// find this one's users online. Only Redis knows, and it sends no event: poll it.
    pub async fn settle(&self, users: &[BenchUser]) {
        let ids: Vec<u64> = users.iter().map(|u| u.id).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut online = 0;
            for chunk in ids.chunks(1000) {
                match self.backends.store.routes(chunk).await {
                    Ok(routes) => online += routes.iter().flatten().count(),
                    Err(e) => {
                        eprintln!("cim-bench: checking that the bench users went offline: {e}");
                        return;
                    }
                }
            }
            if online == 0 {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                eprintln!("cim-bench: {online} bench users are still online after closing");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens and logs in every user's connection, failing (after closing the ones that did
    /// open) if any cannot: the message and fan-out scenarios need every user online. With
    /// `source_ips`, connections bind to them in turn (more ephemeral ports than one local
    /// address has).
    pub async fn open_all(
        &self,
        users: &[BenchUser],
        transport: Transport,
        buffer_size: Option<usize>,
        source_ips: &[IpAddr],
    ) -> anyhow::Result<Vec<Opened>> {
        let results: Vec<Result<Opened, String>> = stream::iter(users.iter().cloned())
            .map(|user| {
                let local_ip = source_ip(source_ips, user.index);
                open(user, transport, local_ip, buffer_size, self.tls.clone())
            })
            .buffered(OPEN_CONCURRENCY)
            .collect()
            .await;
        let (opened, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        let opened: Vec<Opened> = opened.into_iter().filter_map(Result::ok).collect();
        if failed.is_empty() {
            return Ok(opened);
        }
        close_all(opened.into_iter().map(|o| o.conn)).await;
        let failures = crate::report::Failures::default();
        failed
            .into_iter()
            .filter_map(Result::err)
            .for_each(|reason| failures.add(reason));
        anyhow::bail!(
            "{} of {} connections could not log in: {}",
            failures.total(),
            users.len(),
            crate::report::failures_line(&failures.snapshot())
        )
    }
}

/// The local address of the `index`th connection: `source_ips` in turn (none: the system's
/// choice).
pub(crate) fn source_ip(source_ips: &[IpAddr], index: usize) -> Option<IpAddr> {
    (!source_ips.is_empty()).then(|| source_ips[index % source_ips.len()])
}

/// Connects `user` to its server (over TLS with `tls`) and logs in. The error is a short
/// reason for the report.
pub async fn open(
    user: BenchUser,
    transport: Transport,
    local_ip: Option<IpAddr>,
    buffer_size: Option<usize>,
    tls: Option<ClientTls>,
) -> Result<Opened, String> {
    let options = ConnectOptions {
        local_ip,
        buffer_size,
    };
    let addr = user.addr_for(transport, tls.is_some());
    if addr.is_empty() {
        return Err("server offers no TLS address".into());
    }
    let attempt = async {
        let mut conn = match &tls {
            None => Connection::connect_with(addr, transport, options).await?,
            Some(tls) => Connection::connect_tls(addr, transport, options, tls).await?,
        };
        let result = conn.login(&user.connect_token).await?;
        Ok::<_, ConnError>((conn, result))
    };
    match tokio::time::timeout(OPEN_DEADLINE, attempt).await {
        Ok(Ok((conn, result))) => {
            let heartbeat = match result.heartbeat_interval_ms {
                0 => Duration::from_secs(10),
                ms => Duration::from_millis(ms.into()),
            };
            Ok(Opened {
                user,
                conn,
                heartbeat,
            })
        }
        Ok(Err(e)) => Err(reason(&e)),
        Err(_) => Err("timeout".into()),
    }
}

/// A short, stable failure reason for `e` (the report counts failures by it).
pub fn reason(e: &ConnError) -> String {
    match e {
        ConnError::Connect { source, .. } => format!("connect: {source}"),
        ConnError::Tls { source, .. } => format!("tls: {source}"),
        ConnError::LoginRefused { code, .. } => format!(
            "login: {}",
            code.map_or_else(|| "refused".into(), |c| crate::report::code_name(c as i32))
        ),
        ConnError::Timeout => "timeout".into(),
        ConnError::Closed => "closed by the server".into(),
        ConnError::Ws(e) => format!("websocket: {e}"),
        ConnError::Codec(_) | ConnError::Decode(_) => "protocol error".into(),
    }
}

/// Closes connections politely (each within [`CLOSE_DEADLINE`]), many at a time.
pub async fn close_all(conns: impl IntoIterator<Item = Connection>) {
    stream::iter(conns)
        .for_each_concurrent(OPEN_CONCURRENCY, |conn| async move {
            let _ = tokio::time::timeout(CLOSE_DEADLINE, conn.close()).await;
        })
        .await;
}

/// The heartbeat timer of a connection: first tick one interval from now.
pub(crate) fn heartbeat(interval: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

pub(crate) fn ping() -> Frame {
    Frame::new(Body::Ping(Ping { nonce: 0 }))
}

/// One receiving connection: pings at the server's interval, hands every live pushed batch to
/// `on_push` and then acknowledges its stored messages (one `Ack` per push, as the SDK does,
/// so the receivers' inboxes do not fill up), until `stop` (then closes) or until the
/// connection is lost (counted in `failures`). A replayed push (the inbox at login: messages
/// left unacknowledged by an earlier run) is acknowledged but not handed on: its messages
/// belong to that run.
pub(crate) async fn receive_pushes(
    receiver: Opened,
    stop: tokio_util::sync::CancellationToken,
    failures: &crate::report::Failures,
    mut on_push: impl FnMut(&[cim_sdk::pb::Message]),
) {
    let Opened {
        mut conn,
        heartbeat: interval,
        ..
    } = receiver;
    let mut tick = heartbeat(interval);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                if conn.send(&ping()).await.is_err() {
                    failures.add("receiver connection lost");
                    return;
                }
            }
            frame = conn.recv() => match frame {
                Ok(Some(Frame { body: Some(Body::Push(push)) })) => {
                    if !push.replay {
                        on_push(&push.messages);
                    }
                    let ack = cim_sdk::conn::ack_ids(&push);
                    let acked = tokio::time::timeout(ACK_DEADLINE, conn.ack(ack)).await;
                    if !matches!(acked, Ok(Ok(()))) {
                        failures.add("receiver connection lost");
                        return;
                    }
                }
                Ok(Some(_)) => {}
                _ => {
                    failures.add("receiver connection lost");
                    return;
                }
            }
        }
    }
    close_all([conn]).await;
}
