//! TLS for the servers, with rustls: a certificate and key, optionally a client CA that makes
//! it mTLS. The files are checked again (at most once a second, on the next connection) and
//! reloaded when they change, so a rotated certificate — a cert-manager renewal, a new
//! Kubernetes secret — is served without a restart. A reload that fails keeps the old
//! configuration and says why in the log.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to complete the TLS handshake before the connection is closed
/// (a client that opens a socket and says nothing must not hold it forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const RECHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The files of a server's TLS configuration.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// A server TLS configuration that follows its files.
pub struct ServerTls {
    files: TlsFiles,
    state: Mutex<State>,
}

struct State {
    config: Arc<ServerConfig>,
    stamp: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
}

impl ServerTls {
    /// Loads the files now: a bad certificate or key fails the start with the file named.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let config = build_config(&files)?;
        let stamp = stamp(&files);
        Ok(Arc::new(Self {
            files,
            state: Mutex::new(State {
                config: Arc::new(config),
                stamp,
                checked: Instant::now(),
            }),
        }))
    }

    pub fn is_mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for the next connection, reloaded first if the files changed.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut state = self.state.lock().expect("tls state lock");
        if state.checked.elapsed() >= RECHECK_EVERY {
            state.checked = Instant::now();
            let now = stamp(&self.files);
            if now != state.stamp {
                state.stamp = now;
                match build_config(&self.files) {
                    Ok(config) => {
                        tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                        state.config = Arc::new(config);
                    }
                    Err(error) => {
                        tracing::error!(%error, "TLS files changed but cannot be loaded; still serving the previous certificate");
                    }
                }
            }
        }
        state.config.clone()
    }
}

fn stamp(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
    .collect()
}

fn build_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("certificate (--tls-cert)", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|error| {
        TlsError(format!(
            "TLS key (--tls-key) {}: {error}",
            files.key.display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError(format!("TLS: {error}")))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("client CA (--tls-client-ca)", path)? {
                roots.add(cert).map_err(|error| {
                    TlsError(format!(
                        "client CA (--tls-client-ca) {}: {error}",
                        path.display()
                    ))
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| {
                    TlsError(format!(
                        "client CA (--tls-client-ca) {}: {error}",
                        path.display()
                    ))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|error| {
        TlsError(format!(
            "TLS certificate {} and key {} do not go together: {error}",
            files.cert.display(),
            files.key.display()
        ))
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|error| TlsError(format!("TLS {what} {}: {error}", path.display())))?
        .collect();
    let certs =
        certs.map_err(|error| TlsError(format!("TLS {what} {}: {error}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "TLS {what} {}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// Accepted connections after their TLS handshake. Handshakes run concurrently (a slow client
/// does not hold up the others) and are cut after [`HANDSHAKE_TIMEOUT`]; failed ones are logged
/// and dropped. The stream ends when the server stops reading it.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // No Nagle (see `serve`): small messages go out at once.
            if let Err(error) = socket.set_nodelay(true) {
                tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
            }
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%peer, %error, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
