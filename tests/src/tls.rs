//! Certificates for TLS tests, made at test time (rcgen, ring): a CA of the test's own and a
//! server certificate it signed for `localhost` and `127.0.0.1`, as PEM files in a temporary
//! directory that lives as long as the [`TestPki`]. Every TLS test uses this one helper.
//!
//! ```no_run
//! let pki = cim_tests::tls::TestPki::new();
//! let mut server = cim_server::ServerConfig::default();
//! server.tls_listen = Some("127.0.0.1:0".into());
//! server.tls = pki.tls_config(); // [tls] cert_file, key_file
//! let trust = pki.client_tls(); // trusts the test CA (and the system's roots)
//! # drop((server, trust));
//! ```

use cim_common::tls::TlsConfig;
use cim_sdk::ClientTls;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The names the server certificates are for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

/// A test CA and the server certificate files it signed.
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
    dir: TempDir,
    /// The CA certificate (PEM): what clients are told to trust.
    pub ca_file: PathBuf,
    /// The server's certificate chain (PEM): `[tls] cert_file`.
    pub cert_file: PathBuf,
    /// The server's private key (PEM): `[tls] key_file`.
    pub key_file: PathBuf,
    /// The server certificate in the files now (DER), to compare with what a client sees.
    pub server_der: Vec<u8>,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    CertifiedIssuer::self_signed(params, key).expect("CA certificate")
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader (the server's
/// reload) sees the old file or the new one, never half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write a test PEM file");
    std::fs::rename(&tmp, path).expect("rename a test PEM file");
}

impl TestPki {
    /// A new CA and a server certificate for [`SERVER_NAMES`], written to files.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for test certificates");
        let ca = ca("cim test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write the CA file");
        let mut pki = Self {
            ca,
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
            ca_file,
            dir,
            server_der: Vec::new(),
        };
        pki.reissue();
        pki
    }

    /// A new key and server certificate (same CA, same names) replace the files; returns
    /// the new certificate (DER), also kept in [`TestPki::server_der`].
    pub fn reissue(&mut self) -> Vec<u8> {
        let mut params =
            CertificateParams::new(SERVER_NAMES.map(String::from).to_vec()).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "cim test server");
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.ca)
            .expect("server certificate");
        // Key first: until the certificate follows, a reload sees a mismatched pair and
        // keeps the old one (what a careless operator's copy does, too).
        write_atomically(&self.key_file, &key.serialize_pem());
        write_atomically(&self.cert_file, &cert.pem());
        self.server_der = cert.der().to_vec();
        self.server_der.clone()
    }

    /// The `[tls]` section naming the files.
    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert_file: Some(self.cert_file.clone()),
            key_file: Some(self.key_file.clone()),
        }
    }

    /// A client trusting this CA (besides the system's roots).
    pub fn client_tls(&self) -> ClientTls {
        ClientTls::new(Some(&self.ca_file)).expect("client TLS with the test CA")
    }

    /// A CA file of another CA, which signed none of these certificates.
    pub fn other_ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("other-ca.pem");
        std::fs::write(&path, ca("another CA").pem()).expect("write the other CA file");
        path
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}
