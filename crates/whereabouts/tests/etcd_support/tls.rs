//! Per-run PKI for TLS tests: a CA, a server certificate for 127.0.0.1/localhost and a client
//! certificate, all generated with rcgen (ECDSA P-256, ring) into the cluster's temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PEM files of one generated PKI.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate (what clients trust, and what etcd checks client certificates against).
    pub ca: PathBuf,
    /// The server certificate: SANs IP 127.0.0.1 and DNS localhost; EKU serverAuth and clientAuth
    /// (etcd's gRPC gateway dials etcd itself with it).
    pub server_cert: PathBuf,
    /// The server's private key (PKCS#8).
    pub server_key: PathBuf,
    /// The client certificate, CN `whereabouts-etcd-test-client`, EKU clientAuth.
    pub client_cert: PathBuf,
    /// The client's private key (PKCS#8).
    pub client_key: PathBuf,
    /// A second CA, unrelated to the first, with a client certificate signed by it: a client
    /// presenting this one must be refused.
    pub foreign_ca: PathBuf,
    /// A client certificate signed by `foreign_ca`.
    pub foreign_client_cert: PathBuf,
    /// Its key.
    pub foreign_client_key: PathBuf,
}

/// The common name of the client certificate (etcd maps it to a user name when auth is on and
/// the client sends no token).
pub const CLIENT_CN: &str = "whereabouts-etcd-test-client";

/// Generates the PKI into `dir` (which must exist).
pub fn generate(dir: &Path) -> TlsFiles {
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        fs::write(&path, pem).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    };

    let (ca_pem, ca) = new_ca("whereabouts etcd test CA");
    let (server_pem, server_key) = new_leaf(
        &ca,
        &["127.0.0.1", "localhost"],
        "127.0.0.1",
        &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    );
    let (client_pem, client_key) = new_leaf(&ca, &[], CLIENT_CN, &[ExtendedKeyUsagePurpose::ClientAuth]);

    let (foreign_ca_pem, foreign_ca) = new_ca("unrelated test CA");
    let (foreign_pem, foreign_key) =
        new_leaf(&foreign_ca, &[], CLIENT_CN, &[ExtendedKeyUsagePurpose::ClientAuth]);

    TlsFiles {
        ca: write("ca.pem", ca_pem),
        server_cert: write("server.pem", server_pem),
        server_key: write("server-key.pem", server_key),
        client_cert: write("client.pem", client_pem),
        client_key: write("client-key.pem", client_key),
        foreign_ca: write("foreign-ca.pem", foreign_ca_pem),
        foreign_client_cert: write("foreign-client.pem", foreign_pem),
        foreign_client_key: write("foreign-client-key.pem", foreign_key),
    }
}

/// A self-signed CA: its certificate PEM and the issuer that signs leaves with it.
fn new_ca(common_name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-signing the CA");
    (cert.pem(), Issuer::new(params, key))
}

/// A leaf certificate signed by `issuer`: its certificate PEM and private key PEM.
fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    subject_alt_names: &[&str],
    common_name: &str,
    extended_key_usages: &[ExtendedKeyUsagePurpose],
) -> (String, String) {
    let sans: Vec<String> = subject_alt_names.iter().map(ToString::to_string).collect();
    let mut params = CertificateParams::new(sans).expect("leaf parameters");
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = extended_key_usages.to_vec();
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("signing a leaf certificate");
    (cert.pem(), key.serialize_pem())
}
