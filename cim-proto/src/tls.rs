//! What the two sides of TLS share (feature `tls`): the crypto provider (ring, the only one),
//! reading PEM files, and the error type. The server side is `cim_common::tls`, the client side
//! `cim_sdk::ClientTls`; this is the one place both reach without the SDK depending on the
//! cluster's crates. Not the wire contract itself, but what a client must agree on to reach a
//! TLS listener, and small (rustls only): off by default, so a crate that only wants the
//! types pays nothing for it.

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer},
};
use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[tls] is not configured (cert_file and key_file)")]
    NotConfigured,
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} {path}: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("certificate {cert} with key {key} refused: {source}")]
    Refused {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS client setup: {0}")]
    Client(rustls::Error),
}

/// The one crypto provider cim uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM text (at least one).
pub fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE in the file".into()));
    }
    Ok(certs)
}
