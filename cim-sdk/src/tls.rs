//! The client side of TLS: [`ClientTls`] trusts the system's roots (rustls-native-certs, read
//! once per process) plus an optional extra CA file (PEM), for clusters with certificates of
//! their own CA; [`server_name`] is the name checked against a server's certificate. rustls on
//! the ring provider, as the listeners (`cim_proto::tls`).

use cim_proto::tls::{certificates, provider, read};
use rustls::{
    pki_types::{CertificateDer, ServerName},
    RootCertStore,
};
use std::{
    io,
    path::Path,
    sync::{Arc, OnceLock},
};
use tokio::io::{AsyncRead, AsyncWrite};

pub use cim_proto::tls::TlsError;
pub use tokio_rustls::client::TlsStream as ClientTlsStream;

/// The system's trusted roots, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "reading the system's certificates");
        }
        found.certs
    })
}

/// The client side of TLS: which certificates to trust. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the system's roots, plus the CA certificates in `ca_file` (PEM) if given.
    pub fn new(ca_file: Option<&Path>) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        // Certificates the parser refuses are skipped: one odd entry in the system store
        // must not make every TLS connection impossible.
        let (added, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
        tracing::debug!(added, ignored, "system roots");
        if let Some(path) = ca_file {
            let pem = read("CA file", path)?;
            for cert in certificates("CA file", path, &pem)? {
                roots.add(cert).map_err(|e| TlsError::Pem {
                    what: "CA file",
                    path: path.to_path_buf(),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Client)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// The rustls settings (e.g. for an HTTP client's `use_preconfigured_tls`).
    pub fn rustls_config(&self) -> rustls::ClientConfig {
        (*self.config).clone()
    }

    /// Runs the client handshake on `stream` with a server reached as `addr`
    /// (`host:port`; the host is checked against the certificate: a name or an IP).
    pub async fn connect<S>(&self, addr: &str, stream: S) -> io::Result<ClientTlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = server_name(addr)?;
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, stream)
            .await
    }
}

/// The name to verify for `addr` (`host:port`, `[v6]:port` or a bare host).
pub fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a TLS server name: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_from_addresses() {
        assert_eq!(
            server_name("localhost:9443").unwrap(),
            ServerName::try_from("localhost").unwrap()
        );
        assert_eq!(
            server_name("127.0.0.1:9443").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:9443").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert_eq!(
            server_name("im.example.org").unwrap(),
            ServerName::try_from("im.example.org").unwrap()
        );
        assert!(server_name("bad name:1").is_err());
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let dir = std::env::temp_dir().join(format!("cim-sdk-tls-unit-{}", std::process::id()));
        let err = ClientTls::new(Some(&dir.join("absent-ca.pem")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent-ca.pem"), "{err}");
    }
}
