//! Throw-away certificates, made with rcgen, for benchmarks and tests of TLS: a CA, a server
//! certificate for `localhost` and 127.0.0.1 signed by it, a client certificate signed by it
//! (mTLS), and a client certificate from another CA (that a server must refuse). Not for
//! production: real deployments bring their own (cert-manager, a company CA).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// PEM files in a directory.
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate whose CA the server does not trust.
    pub stranger_cert: PathBuf,
    pub stranger_key: PathBuf,
}

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(CertifiedIssuer::self_signed(params, KeyPair::generate()?)?)
}

fn leaf(
    names: &[&str],
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> anyhow::Result<(String, String)> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names.clone())?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_default(),
    );
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl TestPki {
    /// Writes a fresh set into `dir`; `prefix` keeps several sets apart in one directory.
    pub fn create(dir: &Path, prefix: &str) -> anyhow::Result<Self> {
        let path = |name: &str| dir.join(format!("{prefix}{name}"));
        let authority = ca("dagmesh test CA")?;
        let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], &authority)?;
        let (client_cert, client_key) = leaf(&["test-client"], &authority)?;
        let stranger_authority = ca("someone else's CA")?;
        let (stranger_cert, stranger_key) = leaf(&["stranger"], &stranger_authority)?;
        let pki = Self {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
            stranger_cert: path("stranger.pem"),
            stranger_key: path("stranger.key"),
        };
        std::fs::write(&pki.ca, authority.pem())?;
        std::fs::write(&pki.server_cert, server_cert)?;
        std::fs::write(&pki.server_key, server_key)?;
        std::fs::write(&pki.client_cert, client_cert)?;
        std::fs::write(&pki.client_key, client_key)?;
        std::fs::write(&pki.stranger_cert, stranger_cert)?;
        std::fs::write(&pki.stranger_key, stranger_key)?;
        Ok(pki)
    }
}
