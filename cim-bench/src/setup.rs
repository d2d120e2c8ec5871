//! Everything a scenario needs before it measures: the live servers and routes (from etcd),
//! bench accounts, their logins through the route's business API ([`crate::api`]), and
//! opening logged-in connections.

use crate::api::{CallError, RouteApi};
use anyhow::Context;
use cim_common::registry::{EtcdRegistry, Registry, ServiceInfo, ServiceKind};
use cim_sdk::{
    conn::{self, ConnError, ConnectOptions, Connection, Transport},
    pb::{frame::Body, Frame, Ping},
    ClientTls,
};
use futures_util::{stream, StreamExt};
use std::{net::IpAddr, sync::Arc, time::Duration};

/// Admin connect calls in flight while logging a batch in (each is a route request with a few
/// Redis calls behind it; more in flight would only queue).
const LOGIN_CONCURRENCY: usize = 64;

/// Users logged in at once before their connections open: connect tokens live 30 s
/// (`connect_token_ttl`), and a batch logs in and opens within a few seconds.
pub const LOGIN_BATCH: usize = 1000;

/// Connections being opened at once by [`Setup::open_all`].
const OPEN_CONCURRENCY: usize = 256;

/// Deadline of one connect + login.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(15);

/// Deadline of a polite close.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest write of one receiver's acks: a server that does not read them for this long
/// lost the connection.
const ACK_DEADLINE: Duration = Duration::from_secs(5);

/// Deadline of every etcd call.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);

/// The cluster under test, as the bench reaches it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Base URL of a route (its business API logs the bench users in).
    pub route: String,
    /// One of the route's `api_keys`.
    pub api_key: String,
    /// etcd endpoints: where the live servers and routes are listed.
    pub etcd_endpoints: Vec<String>,
    /// The cluster's key prefix (etcd keys `/{prefix}/...`).
    pub prefix: String,
}

/// A connection to the cluster under test: its etcd, its route's business API, and an HTTP
/// client for the `/healthz` probes.
pub struct Setup {
    pub(crate) registry: Arc<dyn Registry>,
    pub(crate) api: RouteApi,
    pub(crate) http: reqwest::Client,
    pub(crate) progress: bool,
    /// Connect over TLS (servers' `tls_addr` / `wss_addr`), trusting this.
    pub(crate) tls: Option<ClientTls>,
    /// The pids of Redis on this machine (one per node of a cluster), for its CPU time
    /// (none: not measured).
    pub(crate) redis_pids: Vec<u32>,
}

/// One bench user: its account exists and its server is chosen; `connect_token` is set once
/// it is logged in ([`Setup::login`]).
#[derive(Debug, Clone)]
pub struct BenchUser {
    /// Position in the scenario's user list (`name` is `bench-{user_offset + index}`).
    pub index: usize,
    pub id: u64,
    pub name: String,
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

/// Users of one batch logged in, and the reasons why the others could not be.
pub struct LoggedIn {
    pub users: Vec<BenchUser>,
    pub failures: Vec<String>,
    /// How many of the failures are users logged in elsewhere.
    pub elsewhere: usize,
}

/// A logged-in connection and the heartbeat interval its server asked for.
pub struct Opened {
    pub user: BenchUser,
    pub conn: Connection,
    pub heartbeat: Duration,
}

impl Setup {
    /// Connects to the cluster's etcd and checks nothing else: the route is first called when
    /// the accounts are prepared.
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        let registry = EtcdRegistry::connect(
            &target.etcd_endpoints,
            &format!("/{}", target.prefix),
            ETCD_TIMEOUT,
        )
        .await
        .map_err(|e| anyhow::anyhow!("etcd at {:?}: {e}", target.etcd_endpoints))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            registry: Arc::new(registry),
            api: RouteApi::new(&target.route, &target.api_key)?,
            http,
            progress: false,
            tls: None,
            redis_pids: Vec::new(),
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

    /// Measures Redis's CPU time from `/proc/{pid}` of each pid, summed (Redis must run on
    /// this machine); without any the reports' `redis_ms` is null.
    pub fn with_redis_pids(mut self, pids: Vec<u32>) -> Self {
        self.redis_pids = pids;
        self
    }

    /// What TLS connections trust, if the bench connects over TLS.
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    /// The live members of `kind`, sorted by id.
    pub async fn members(&self, kind: ServiceKind) -> anyhow::Result<Vec<ServiceInfo>> {
        let rx = self
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

    /// Prepares users `bench-{offset}` … `bench-{offset + n - 1}`: creates the missing
    /// accounts (connect-only, through the route) and assigns each the server `place(index)`
    /// returns. Nobody is logged in yet: [`Setup::login`] does that per batch, just before
    /// the batch connects, because connect tokens expire.
    pub async fn prepare_users(
        &self,
        offset: u64,
        n: usize,
        place: impl Fn(usize) -> Arc<ServiceInfo>,
    ) -> anyhow::Result<Vec<BenchUser>> {
        let names: Vec<String> = (0..n)
            .map(|index| format!("bench-{}", offset + index as u64))
            .collect();
        let ids = self.api.bulk_users(&names).await?;
        Ok(names
            .into_iter()
            .zip(ids)
            .enumerate()
            .map(|(index, (name, id))| BenchUser {
                index,
                id,
                name,
                server: place(index),
                connect_token: String::new(),
            })
            .collect())
    }

    /// Logs `users` in through the admin connect call, each on its assigned server, and
    /// returns them with their connect tokens. A user whose earlier login nobody connected
    /// with (a run that died) is simply logged in again: the route takes a pending slot over.
    pub async fn login(&self, users: &[BenchUser]) -> LoggedIn {
        let results: Vec<Result<BenchUser, CallError>> = stream::iter(users.iter().cloned())
            .map(|mut user| async move {
                let session = self.api.connect(user.id, &user.server.id).await?;
                debug_assert_eq!(session.server.id, user.server.id);
                user.connect_token = session.connect_token;
                Ok(user)
            })
            .buffered(LOGIN_CONCURRENCY)
            .collect()
            .await;
        let mut out = LoggedIn {
            users: Vec::with_capacity(users.len()),
            failures: Vec::new(),
            elsewhere: 0,
        };
        for result in results {
            match result {
                Ok(user) => out.users.push(user),
                Err(e) => {
                    out.elsewhere += usize::from(e.is_logged_in_elsewhere());
                    out.failures.push(e.reason());
                }
            }
        }
        out
    }

    /// Waits until none of `users` is online any more (servers detach closed connections in
    /// the background), at most 10 s: the next scenario of a baseline must not find this
    /// one's users online. The route's presence call knows, and it sends no event: poll it.
    ///
    /// Nothing needs releasing afterwards: the login slots of users that never connected
    /// are pending ones, which expire with their connect tokens and which the next login of
    /// the same user takes over anyway.
    pub async fn settle(&self, users: &[BenchUser]) {
        let ids: Vec<u64> = users.iter().map(|u| u.id).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let online = match self.api.online_of(&ids).await {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("cim-bench: checking that the bench users went offline: {e:#}");
                    return;
                }
            };
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

    /// How many of `ids` are online.
    pub async fn online_of(&self, ids: &[u64]) -> anyhow::Result<usize> {
        self.api.online_of(ids).await
    }

    /// Logged-in connections on all live servers.
    pub async fn online_count(&self) -> anyhow::Result<u64> {
        self.api.online_count().await
    }

    /// Logs in and opens every user's connection, [`LOGIN_BATCH`] at a time, failing (after
    /// closing the ones that did open) if any cannot: the message and fan-out scenarios need
    /// every user online. With `source_ips`, connections bind to them in turn (more
    /// ephemeral ports than one local address has).
    pub async fn open_all(
        &self,
        users: &[BenchUser],
        transport: Transport,
        buffer_size: Option<usize>,
        source_ips: &[IpAddr],
    ) -> anyhow::Result<Vec<Opened>> {
        let mut opened = Vec::with_capacity(users.len());
        let mut failed = Vec::new();
        let mut elsewhere = 0;
        for batch in users.chunks(LOGIN_BATCH) {
            let logged = self.login(batch).await;
            elsewhere += logged.elsewhere;
            failed.extend(logged.failures);
            let results: Vec<Result<Opened, String>> = stream::iter(logged.users)
                .map(|user| {
                    let local_ip = source_ip(source_ips, user.index);
                    open(user, transport, local_ip, buffer_size, self.tls.clone())
                })
                .buffered(OPEN_CONCURRENCY)
                .collect()
                .await;
            for result in results {
                match result {
                    Ok(o) => opened.push(o),
                    Err(reason) => failed.push(reason),
                }
            }
            if !failed.is_empty() {
                break;
            }
        }
        if failed.is_empty() {
            return Ok(opened);
        }
        close_all(opened.into_iter().map(|o| o.conn)).await;
        let failures = crate::report::Failures::default();
        failed
            .iter()
            .for_each(|reason| failures.add(reason.as_str()));
        let summary = crate::report::failures_line(&failures.snapshot());
        if elsewhere > 0 {
            anyhow::bail!(
                "{elsewhere} bench users are logged in already (another cim-bench on the same \
                 --user-offset range?): {summary}"
            );
        }
        anyhow::bail!(
            "{} of {} connections could not log in: {summary}",
            failures.total(),
            users.len(),
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
/// `on_push` and then acknowledges its stored messages and its stored groups' positions (one
/// write of `Ack`s per push, as the SDK does, so the receivers' inboxes do not fill up and a
/// later login does not catch up again), until `stop` (then closes) or until the
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
                    let (ids, groups) = (conn::ack_ids(&push), conn::group_positions(&push));
                    let acked = tokio::time::timeout(ACK_DEADLINE, conn.ack_all(ids, groups)).await;
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
