//! TLS for the client-facing listeners: rustls on the ring provider, keys and certificates
//! from PEM files. (The client side is `cim_sdk::ClientTls`; what both share, the provider,
//! PEM reading and [`TlsError`], is `cim_proto::tls`.)
//!
//! - [`TlsConfig`]: the `[tls]` section of a config file (`cert_file`, `key_file`).
//! - [`ServerTls`]: the server side. Loads the certificate chain and key into a rustls
//!   `ServerConfig` held in an [`ArcSwap`], so it can be replaced while the process runs:
//!   [`ServerTls::watch`] reloads on SIGHUP and when the files change (their contents are
//!   compared every few seconds). A reload that fails (unreadable file, key not matching the
//!   certificate, a half-written file) logs an error and keeps the certificate in use; every
//!   connection accepted afterwards uses whatever was loaded last. [`ServerTls::accept`] runs
//!   a handshake under a deadline, so a client speaking plain TCP (or nothing) to a TLS port
//!   gets a closed connection, never a hang.
//! - [`TlsListener`]: an `axum::serve::Listener` of TLS connections (HTTPS): handshakes run
//!   concurrently under the deadline, failed ones are logged at debug and skipped, never
//!   ending the accept loop.
//!
//! Only the listeners clients reach use TLS. Internal listeners (servers' and routes' internal
//! APIs) stay plain HTTP on private networks, authenticated by the cluster secret.

use arc_swap::ArcSwap;
use cim_proto::tls::{certificates, provider, read};
use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch, Semaphore},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use cim_proto::tls::TlsError;
pub use tokio_rustls::server::TlsStream;

/// How often [`ServerTls::watch`] compares the files with what it loaded.
pub const RELOAD_POLL: Duration = Duration::from_secs(3);

/// Handshakes a [`TlsListener`] runs at once; past it, accepting waits.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Pause after a failed accept before the next one (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The `[tls]` section: where the certificate chain and its private key are (PEM files).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM: the server's certificate first, then intermediates.
    pub cert_file: Option<PathBuf>,
    /// Private key of the first certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Whether any of the two files is given.
    pub fn is_set(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }

    /// Checks the section: both files or neither; both when `needed_by` names a setting that
    /// needs TLS (e.g. `"tls_listen"`). The message names what is missing.
    pub fn validate(&self, needed_by: Option<&str>) -> Result<(), String> {
        let needed = needed_by.map(|by| format!(" (needed by {by})"));
        match (&self.cert_file, &self.key_file) {
            (Some(_), Some(_)) => Ok(()),
            (None, None) => match needed {
                None => Ok(()),
                Some(why) => Err(format!("[tls] cert_file and key_file are required{why}")),
            },
            (Some(_), None) => Err(format!(
                "[tls] key_file is required with cert_file{}",
                needed.unwrap_or_default()
            )),
            (None, Some(_)) => Err(format!(
                "[tls] cert_file is required with key_file{}",
                needed.unwrap_or_default()
            )),
        }
    }
}

/// The rustls server settings for a certificate chain and key (PEM bytes).
fn server_config(
    paths: (&Path, &Path),
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cert_path, key_path) = paths;
    let certs = certificates("cert_file", cert_path, cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
        what: "key_file",
        path: key_path.to_path_buf(),
        message: format!("no private key: {e}"),
    })?;
    let refused = |source| TlsError::Refused {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        source,
    };
    // `with_single_cert` checks that the key belongs to the first certificate.
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(refused)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map(Arc::new)
        .map_err(refused)
}

/// The server side of TLS: the current certificate, replaceable while running. See the
/// module docs.
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<rustls::ServerConfig>,
    /// The file contents of the last reload attempt (successful or not), so a broken file
    /// is reported once, not at every poll.
    attempted: Mutex<(Vec<u8>, Vec<u8>)>,
    /// Counts successful reloads (0: as loaded at start).
    reloads: watch::Sender<u64>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("reloads", &*self.reloads.borrow())
            .finish()
    }
}

impl ServerTls {
    /// Loads the files of `config`; fails, naming the file, when either is missing or
    /// unusable.
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Err(TlsError::NotConfigured);
        };
        let cert_pem = read("cert_file", cert_file)?;
        let key_pem = read("key_file", key_file)?;
        let current = server_config((cert_file, key_file), &cert_pem, &key_pem)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.clone(),
            key_file: key_file.clone(),
            current: ArcSwap::new(current),
            attempted: Mutex::new((cert_pem, key_pem)),
            reloads: watch::Sender::new(0),
        }))
    }

    /// An acceptor with the current certificate.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Reads the files again and, when they changed since the last attempt (or `force`),
    /// loads them. `Ok(true)`: a new certificate is in use. On error the previous one stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let cert_pem = read("cert_file", &self.cert_file)?;
        let key_pem = read("key_file", &self.key_file)?;
        {
            let mut attempted = self.attempted.lock().unwrap_or_else(|e| e.into_inner());
            if !force && attempted.0 == cert_pem && attempted.1 == key_pem {
                return Ok(false);
            }
            *attempted = (cert_pem.clone(), key_pem.clone());
        }
        let config = server_config((&self.cert_file, &self.key_file), &cert_pem, &key_pem)?;
        self.current.store(config);
        self.reloads.send_modify(|n| *n += 1);
        Ok(true)
    }

    /// Successful reloads so far, as a watch (tests await a change; 0 = the start's files).
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Reloads on SIGHUP and whenever the files' contents change (compared every `poll`),
    /// until `cancel`. Logs each new certificate at info and each failure at error (the
    /// certificate in use stays).
    ///
    /// The SIGHUP handler is installed by this call, before the returned future first runs
    /// (call it within a tokio runtime): once `start` has returned, a SIGHUP reloads, it
    /// never falls to the default action (which ends the process).
    pub fn watch(
        self: Arc<Self>,
        poll: Duration,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS files reload on change only");
                None
            }
        };
        async move {
            loop {
                #[cfg(unix)]
                let signalled = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                #[cfg(not(unix))]
                let signalled = std::future::pending::<Option<()>>();
                let force = tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = signalled => true,
                    () = tokio::time::sleep(poll) => false,
                };
                let cert = self.cert_file.display();
                match self.reload(force) {
                    Ok(true) => tracing::info!(cert_file = %cert, "TLS certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(
                        error = %e,
                        "TLS reload failed: still using the previous certificate"
                    ),
                }
            }
        }
    }

    /// Runs the server handshake on `stream` with the current certificate, within
    /// `deadline`. A peer that is not a TLS client fails it at once (its first bytes are not
    /// a TLS record) or at the deadline (it sends nothing).
    pub async fn accept<S>(&self, stream: S, deadline: Duration) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(deadline, self.acceptor().accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An `axum::serve::Listener` of TLS connections: accepts on a TCP listener, runs each
/// handshake in its own task under a deadline, and hands out the connections that
/// completed it. Failed handshakes are logged at debug and skipped.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: io::Result<SocketAddr>,
    _accepting: AbortOnDrop,
}

impl TlsListener {
    /// Serves TLS on `listener` with the certificate of `tls`, handshakes within `deadline`.
    /// Call from within a tokio runtime.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>, deadline: Duration) -> Self {
        let local_addr = listener.local_addr();
        let (tx, ready) = mpsc::channel(64);
        let accepting = tokio::spawn(accept_loop(listener, tls, deadline, tx));
        Self {
            ready,
            local_addr,
            _accepting: AbortOnDrop(accepting),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    deadline: Duration,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let Ok(permit) = pending.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, tx) = (tls.clone(), tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls.accept(stream, deadline).await {
                Ok(stream) => {
                    let _ = tx.send((stream, peer)).await;
                }
                Err(e) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        match &self.local_addr {
            Ok(addr) => Ok(*addr),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_wants_both_files_or_none() {
        let none = TlsConfig::default();
        assert!(!none.is_set());
        none.validate(None).unwrap();
        let err = none.validate(Some("tls_listen")).unwrap_err();
        assert!(
            err.contains("cert_file and key_file") && err.contains("tls_listen"),
            "{err}"
        );
        let cert_only = TlsConfig {
            cert_file: Some("c.pem".into()),
            key_file: None,
        };
        assert!(cert_only.is_set());
        let err = cert_only.validate(None).unwrap_err();
        assert!(err.contains("key_file"), "{err}");
        let both = TlsConfig {
            key_file: Some("k.pem".into()),
            ..cert_only
        };
        both.validate(Some("wss_listen")).unwrap();
    }

    #[test]
    fn missing_or_broken_files_are_named() {
        let dir = std::env::temp_dir().join(format!("cim-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let config = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(dir.join("absent.pem")),
        };
        let err = ServerTls::load(&config).unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");
        let config = TlsConfig {
            cert_file: Some(cert),
            key_file: Some(key),
        };
        let err = ServerTls::load(&config).unwrap_err().to_string();
        assert!(
            err.contains("cert.pem") && err.contains("CERTIFICATE"),
            "{err}"
        );
        assert!(matches!(
            ServerTls::load(&TlsConfig::default()),
            Err(TlsError::NotConfigured)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
