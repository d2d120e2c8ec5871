//! [`Registry`] on etcd: `{prefix}/{servers|routes}/{id}` → JSON [`ServiceInfo`], attached to a
//! lease kept alive at a third of its TTL. A broken keep-alive stream or an unanswered
//! renewal (a member died, an election) renews the same lease again on a new stream; only a
//! lease etcd reports expired (etcd restarted, a long pause) makes the keeper grant a new one
//! and put the key again. A call that fails without reaching etcd (with several endpoints,
//! etcd-client keeps handing calls to a dead member, which fail at once) is tried again.
//!
//! Every failed etcd call, in the calls of the trait and in the background tasks (keep-alive,
//! watch), adds one to the registry's error counter (`cim_backend_errors_total{backend="etcd"}`,
//! see [`EtcdRegistry::with_errors`]).

use super::*;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use prometheus_client::metrics::counter::Counter;
use std::collections::BTreeMap;
use tokio_util::sync::CancellationToken;

/// Tries of one call that fails without reaching etcd (see [`unreachable`]).
const ATTEMPTS: usize = 3;

/// Whether the call never reached a member: with several endpoints the client's balancer
/// keeps handing calls to a dead member (its lazy connection reports itself ready, then
/// fails each call at once with `Unavailable`), so the same call tried again goes elsewhere.
fn unreachable(e: &etcd_client::Error) -> bool {
    // tonic::Code::Unavailable (14): the request was not sent.
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 14)
}

/// `call`, tried again (up to [`ATTEMPTS`]) while it fails without reaching etcd.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tried = 1;
    loop {
        match call().await {
            Err(e) if tried < ATTEMPTS && unreachable(&e) => tried += 1,
            result => return result,
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

/// etcd-backed registry.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    /// Failed etcd calls (shared with the background tasks).
    errors: Counter,
}

impl EtcdRegistry {
    /// Connects to the endpoints (`host:port` or `http://host:port`). Calls time out after
    /// `timeout`.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        timeout: Duration,
    ) -> RegistryResult<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), timeout);
        let client = tokio::time::timeout(timeout * 2, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| unavailable(format!("connecting to etcd {endpoints:?} timed out")))?
            .map_err(unavailable)?;
        // Fail at start-up, not at first use, when etcd is not there.
        let probe = retrying(|| {
            let mut probe = client.clone();
            async move { probe.get("cim-probe", None).await }
        });
        tokio::time::timeout(timeout, probe)
            .await
            .map_err(|_| unavailable(format!("etcd {endpoints:?} did not answer")))?
            .map_err(unavailable)?;
        Ok(Self {
            client,
            prefix: prefix.trim_end_matches('/').to_string(),
            errors: Counter::default(),
        })
    }

    /// Counts every failed etcd call in `errors` from now on (default: a counter of its own).
    #[must_use]
    pub fn with_errors(mut self, errors: Counter) -> Self {
        self.errors = errors;
        self
    }

    /// The error counter, for `map_err` chains: counts `e` and passes it on.
    fn counted<E>(&self) -> impl Fn(E) -> E + '_ {
        |e| {
            self.errors.inc();
            e
        }
    }

    fn kind_prefix(&self, kind: ServiceKind) -> String {
        format!("{}/{}/", self.prefix, kind.as_str())
    }
}

struct EtcdRegistration {
    client: Client,
    errors: Counter,
    lease: Arc<std::sync::atomic::AtomicI64>,
    stop: CancellationToken,
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for EtcdRegistration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[async_trait]
impl Registration for EtcdRegistration {
    async fn deregister(mut self: Box<Self>) -> RegistryResult<()> {
        self.stop.cancel();
        // Wait for the keeper so no re-registration races the revoke (bounded: a keeper in
        // the middle of a re-grant finishes within the call timeouts).
        if let Some(keeper) = self.keeper.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), keeper).await;
        }
        let lease = self.lease.load(std::sync::atomic::Ordering::SeqCst);
        retrying(|| {
            let mut client = self.client.clone();
            async move { client.lease_revoke(lease).await }
        })
        .await
        .inspect_err(|_| {
            self.errors.inc();
        })
        .map_err(unavailable)?;
        Ok(())
    }
}

async fn grant_and_put(
    client: &mut Client,
    key: &str,
    value: &str,
    ttl: Duration,
) -> Result<i64, etcd_client::Error> {
    let secs = ttl.as_secs().max(1) as i64;
    let lease = retrying(|| {
        let mut client = client.clone();
        async move { client.lease_grant(secs, None).await }
    })
    .await?
    .id();
    retrying(|| {
        let mut client = client.clone();
        async move {
            let options = PutOptions::new().with_lease(lease);
            client.put(key, value, Some(options)).await
        }
    })
    .await?;
    Ok(lease)
}

/// What a renewal answered with TTL 0 reports: the lease is gone, only a new one helps.
const LEASE_EXPIRED: &str = "lease expired";

/// Renews `lease` every ttl/3 until `stop`; re-registers when the lease is lost.
async fn keep_alive(
    mut client: Client,
    key: String,
    value: String,
    ttl: Duration,
    lease: Arc<std::sync::atomic::AtomicI64>,
    stop: CancellationToken,
    errors: Counter,
) {
    use std::sync::atomic::Ordering;
    let period = (ttl / 3).max(Duration::from_millis(200));
    loop {
        let id = lease.load(Ordering::SeqCst);
        let attempt = async {
            let (mut keeper, mut stream) = retrying(|| {
                let mut client = client.clone();
                async move { client.lease_keep_alive(id).await }
            })
            .await?;
            loop {
                keeper.keep_alive().await?;
                match tokio::time::timeout(period, stream.message()).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                    Ok(Ok(_)) => {
                        return Err(etcd_client::Error::LeaseKeepAliveError(
                            LEASE_EXPIRED.into(),
                        ))
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {
                        return Err(etcd_client::Error::LeaseKeepAliveError(
                            "keep-alive timed out".into(),
                        ))
                    }
                }
                tokio::time::sleep(period).await;
            }
        };
        let result: Result<(), etcd_client::Error> =
            stop.run_until_cancelled(attempt).await.unwrap_or(Ok(()));
        if stop.is_cancelled() {
            return;
        }
        let expired = matches!(
            &result,
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == LEASE_EXPIRED
        );
        if let Err(e) = result {
            errors.inc();
            tracing::warn!(key, error = %e, expired, "registry keep-alive broke");
        }
        if !expired {
            // A broken stream or an unanswered renewal (a member died, an election) does not
            // end the lease: renew it again on a new stream (after a pause) before it runs out.
            if stop
                .run_until_cancelled(tokio::time::sleep(period))
                .await
                .is_none()
            {
                return;
            }
            continue;
        }
        // Back off a little, then try to re-register with a fresh lease.
        loop {
            if stop
                .run_until_cancelled(tokio::time::sleep(period))
                .await
                .is_none()
            {
                return;
            }
            // Not cancellable half-way: a key put under a new lease must have that lease
            // recorded, so that `deregister` (which waits for this task) revokes it.
            match grant_and_put(&mut client, &key, &value, ttl).await {
                Ok(new_lease) => {
                    lease.store(new_lease, Ordering::SeqCst);
                    tracing::info!(key, "registered again");
                    break;
                }
                Err(e) => {
                    errors.inc();
                    tracing::warn!(key, error = %e, "re-registration failed");
                }
            }
        }
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(
        &self,
        kind: ServiceKind,
        info: &ServiceInfo,
        ttl: Duration,
    ) -> RegistryResult<Box<dyn Registration>> {
        let key = format!("{}{}", self.kind_prefix(kind), info.id);
        let value = serde_json::to_string(info).map_err(unavailable)?;
        let mut client = self.client.clone();
        let lease = grant_and_put(&mut client, &key, &value, ttl)
            .await
            .map_err(self.counted())
            .map_err(unavailable)?;
        let lease = Arc::new(std::sync::atomic::AtomicI64::new(lease));
        let stop = CancellationToken::new();
        let keeper = tokio::spawn(keep_alive(
            client.clone(),
            key,
            value,
            ttl,
            lease.clone(),
            stop.clone(),
            self.errors.clone(),
        ));
        Ok(Box::new(EtcdRegistration {
            client,
            errors: self.errors.clone(),
            lease,
            stop,
            keeper: Some(keeper),
        }))
    }

    async fn watch(&self, kind: ServiceKind) -> RegistryResult<MembersRx> {
        let prefix = self.kind_prefix(kind);
        let mut client = self.client.clone();
        let (members, revision) = load(&mut client, &prefix)
            .await
            .map_err(self.counted())
            .map_err(unavailable)?;
        let (tx, rx) = watch::channel(snapshot(&members));
        tokio::spawn(follow(
            client,
            prefix,
            members,
            revision,
            tx,
            self.errors.clone(),
        ));
        Ok(rx)
    }
}

type MemberMap = BTreeMap<String, ServiceInfo>;

fn snapshot(members: &MemberMap) -> Members {
    // BTreeMap keys are `{prefix}{id}` with one prefix, so values come out sorted by id.
    Arc::new(members.values().cloned().collect())
}

fn parse(value: &[u8]) -> Option<ServiceInfo> {
    serde_json::from_slice(value).ok()
}

async fn load(client: &mut Client, prefix: &str) -> Result<(MemberMap, i64), etcd_client::Error> {
    let resp = retrying(|| {
        let mut client = client.clone();
        async move {
            client
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let members = resp
        .kvs()
        .iter()
        .filter_map(|kv| Some((kv.key_str().ok()?.to_string(), parse(kv.value())?)))
        .collect();
    Ok((members, revision))
}

/// Applies watch events to the list until every receiver is gone; on a broken watch, reloads
/// the whole list and watches again.
async fn follow(
    mut client: Client,
    prefix: String,
    mut members: MemberMap,
    mut revision: i64,
    tx: watch::Sender<Members>,
    errors: Counter,
) {
    loop {
        let run = async {
            let options = WatchOptions::new()
                .with_prefix()
                .with_start_revision(revision + 1);
            let mut stream = retrying(|| {
                let mut client = client.clone();
                let options = options.clone();
                let prefix = prefix.as_str();
                async move { client.watch(prefix, Some(options)).await }
            })
            .await?;
            while let Some(resp) = stream.message().await? {
                if resp.canceled() {
                    break;
                }
                let mut changed = false;
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    revision = revision.max(kv.mod_revision());
                    let Ok(key) = kv.key_str() else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            if let Some(info) = parse(kv.value()) {
                                members.insert(key.to_string(), info);
                                changed = true;
                            }
                        }
                        EventType::Delete => changed |= members.remove(key).is_some(),
                    }
                }
                if changed {
                    tx.send_replace(snapshot(&members));
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        tokio::select! {
            _ = tx.closed() => return,
            result = run => {
                if let Err(e) = result {
                    errors.inc();
                    tracing::warn!(prefix, error = %e, "registry watch broke, reloading");
                }
            }
        }
        // Reload: the watch may have missed events (compaction, etcd restart).
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            match load(&mut client, &prefix).await {
                Ok((m, rev)) => {
                    members = m;
                    revision = rev;
                    tx.send_replace(snapshot(&members));
                    break;
                }
                Err(e) => {
                    errors.inc();
                    tracing::warn!(prefix, error = %e, "registry reload failed");
                }
            }
        }
    }
}
