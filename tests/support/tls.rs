//! A throwaway certificate authority for HTTPS stand-ins on loopback.
//!
//! The stand-ins present a certificate for `127.0.0.1`/`localhost` issued by a CA made
//! for this test run. The client trusts it only when told to, through the standard
//! `SSL_CERT_FILE` variable, so the tests exercise the real certificate checks: with the
//! variable the download works, without it the handshake is refused.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

pub struct TestCa {
    /// The CA certificate as PEM: `SSL_CERT_FILE` pointed here trusts the stand-ins.
    pub ca_pem: PathBuf,
    /// Server-side TLS for a stand-in, with the leaf certificate and its chain.
    pub acceptor: TlsAcceptor,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "stage3 test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &*ca)
            .unwrap();

        let crypto = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(crypto)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .unwrap();
        // The stand-ins speak HTTP/1.1 only; say so, or an HTTP/2 client would try h2.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];

        let dir = tempfile::tempdir().unwrap();
        let ca_pem = dir.path().join("stage3-test-ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        TestCa {
            ca_pem,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            _dir: dir,
        }
    }
}
