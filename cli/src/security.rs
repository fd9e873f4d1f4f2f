//! The servers' security settings: TLS files, authentication on or off, the services' shared
//! internal token, the check that refuses an unprotected non-loopback listener, and the admin
//! token `dagmesh up` leaves in its data directory for a newcomer's CLI.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use dagmesh_auth::jwt::{JwtConfig, JwtVerifier};
use dagmesh_auth::{AuthLayer, Authenticator, tokens};
use dagmesh_metastore::{MetadataStore, StoreError};
use dagmesh_proto::connect::ClientSettings;
use dagmesh_proto::v1::{CreateTokenRequest, Scope};
use dagmesh_runtime::ServeOptions;
use dagmesh_runtime::tls::{ServerTls, TlsFiles};

/// The name of the admin token file in `dagmesh up`'s data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Flags every server command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityFlags {
    /// PEM certificate (chain) this server presents: serve TLS. Reloaded when the file changes.
    #[arg(long, env = "DAGMESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DAGMESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to: require mTLS.
    #[arg(long, env = "DAGMESH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve without authentication: every caller may do everything. Allowed on a loopback
    /// address; elsewhere only with --insecure.
    #[arg(long, env = "DAGMESH_NO_AUTH")]
    pub no_auth: bool,
    /// Allow a non-loopback listen address without TLS or without authentication (when
    /// something else protects the network, e.g. a service mesh with mTLS).
    #[arg(long, env = "DAGMESH_INSECURE")]
    pub insecure: bool,
    /// The services' shared secret (split mode): calls carrying it act as the internal
    /// principal (the metadata store API needs it), and the executor and scheduler present it
    /// to the metastore and the executor.
    #[arg(long, env = "DAGMESH_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Also accept JWTs of an identity provider whose keys are in this JWKS file (re-read when
    /// it changes). Needs --jwt-issuer and --jwt-audience.
    #[arg(long, env = "DAGMESH_JWT_JWKS", requires_all = ["jwt_issuer", "jwt_audience"])]
    pub jwt_jwks: Option<PathBuf>,
    /// Required `iss` of JWTs.
    #[arg(long, env = "DAGMESH_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` of JWTs.
    #[arg(long, env = "DAGMESH_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The JWT claim that holds the scopes (space-separated or an array: worker, submit, read,
    /// operate, admin).
    #[arg(long, env = "DAGMESH_JWT_SCOPES_CLAIM", default_value = "scope")]
    pub jwt_scopes_claim: String,
    /// The JWT claim that holds a worker's task-type patterns.
    #[arg(long, env = "DAGMESH_JWT_TASKS_CLAIM", default_value = "dagmesh_tasks")]
    pub jwt_tasks_claim: String,
}

impl SecurityFlags {
    pub fn tls(&self) -> anyhow::Result<Option<Arc<ServerTls>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.tls_client_ca.clone(),
        };
        Ok(Some(ServerTls::load(files)?))
    }

    /// JWT verification, when a JWKS is configured.
    pub fn jwt(&self) -> Option<JwtConfig> {
        Some(JwtConfig {
            jwks: self.jwt_jwks.clone()?,
            issuer: self.jwt_issuer.clone().unwrap_or_default(),
            audience: self.jwt_audience.clone().unwrap_or_default(),
            scopes_claim: self.jwt_scopes_claim.clone(),
            tasks_claim: self.jwt_tasks_claim.clone(),
        })
    }

    /// The authenticator for a server whose tokens live in `store`; None with --no-auth.
    pub fn authenticator(
        &self,
        store: Arc<dyn MetadataStore>,
    ) -> anyhow::Result<Option<Arc<Authenticator>>> {
        if self.no_auth {
            return Ok(None);
        }
        Ok(Some(Arc::new(build_authenticator(
            store,
            self.internal_token.as_deref(),
            self.jwt(),
        )?)))
    }

    pub fn serve_options(
        &self,
        authenticator: Option<Arc<Authenticator>>,
        tls: Option<Arc<ServerTls>>,
    ) -> ServeOptions {
        ServeOptions {
            auth: authenticator.map_or_else(AuthLayer::disabled, AuthLayer::new),
            tls,
        }
    }

    /// How this service reaches another one (the metastore, the executor): the client TLS
    /// settings (`--tls-ca`, `--tls-client-cert`/`--tls-client-key`, `--tls-server-name` or
    /// their `DAGMESH_TLS_*` variables), and the internal token as its credentials.
    pub fn peer_settings(&self, client: &ClientSettings) -> ClientSettings {
        match &self.internal_token {
            Some(token) => ClientSettings {
                token: Some(token.clone()),
                token_file: None,
                ..client.clone()
            },
            None => client.clone(),
        }
    }

    /// Refuses to serve an unprotected non-loopback address unless --insecure.
    pub fn check_listen(&self, addr: SocketAddr) -> anyhow::Result<()> {
        if addr.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        let missing = match (self.tls_cert.is_some(), !self.no_auth) {
            (true, true) => return Ok(()),
            (false, true) => {
                "without TLS (--tls-cert/--tls-key): tokens and run data would cross the network in clear text"
            }
            (true, false) => {
                "without authentication (--no-auth): anyone who can reach it could read and run everything"
            }
            (false, false) => {
                "without TLS and without authentication: anyone who can reach it could read and run everything"
            }
        };
        anyhow::bail!(
            "refusing to listen on {addr} {missing}. Serve TLS with authentication on, listen on \
             127.0.0.1, or pass --insecure if something else protects this network (e.g. a \
             service mesh with mTLS)"
        )
    }
}

/// Says in the log whether the PostgreSQL connection is encrypted (`sslmode=require` or
/// `verify-full` in the URL), so an operator can see it without reading the URL.
pub async fn log_database_tls(store: &dyn dagmesh_metastore::SqlDatabase) {
    match store.postgres_tls().await {
        Ok(Some(tls)) if tls.connection_encrypted => {
            tracing::info!("PostgreSQL connection is encrypted (TLS)");
        }
        Ok(Some(tls)) => tracing::warn!(
            server_offers_tls = tls.server_enabled,
            "PostgreSQL connection is NOT encrypted; add sslmode=require (or verify-full with \
             sslrootcert=CA.pem) to the database URL"
        ),
        Ok(None) => {}
        Err(error) => {
            tracing::debug!(%error, "cannot tell whether the database connection is encrypted")
        }
    }
}

/// An authenticator for API tokens in `store`, the internal token and, optionally, JWTs.
pub fn build_authenticator(
    store: Arc<dyn MetadataStore>,
    internal_token: Option<&str>,
    jwt: Option<JwtConfig>,
) -> anyhow::Result<Authenticator> {
    let authenticator = Authenticator::new(store, internal_token);
    Ok(match jwt {
        Some(config) => {
            authenticator.with_jwt(JwtVerifier::new(config).map_err(anyhow::Error::msg)?)
        }
        None => authenticator,
    })
}

/// The admin token kept in `file`: the stored one if the file names a token of this database,
/// else a new admin token (written to the file, mode 0600). Returns the token.
pub async fn admin_token(store: &Arc<dyn MetadataStore>, file: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(file) {
        let token = text.trim().to_owned();
        if let Some(parsed) = tokens::parse(&token) {
            match store.get_token(parsed.id).await {
                Ok(stored) if stored.secret_sha256 == tokens::hash(parsed.secret) => {
                    return Ok(token);
                }
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(error) => return Err(error).context("reading the admin token"),
            }
        }
    }
    let mut name = "admin".to_owned();
    let token = loop {
        let request = CreateTokenRequest {
            name: name.clone(),
            scopes: vec![Scope::Admin as i32],
            ..Default::default()
        };
        let (stored, secret) =
            tokens::new_token(request, "dagmesh up").map_err(anyhow::Error::msg)?;
        let id = stored
            .token
            .as_ref()
            .map(|t| t.token_id.clone())
            .unwrap_or_default();
        match store.put_token(stored).await {
            Ok(()) => break secret,
            Err(StoreError::AlreadyExists(_)) if name == "admin" => name = format!("admin-{id}"),
            Err(error) => return Err(error).context("creating the admin token"),
        }
    };
    write_private(file, &token)
        .with_context(|| format!("writing the admin token to {}", file.display()))?;
    tracing::info!(file = %file.display(), name, "created an admin token");
    Ok(token)
}

/// The webhook signing secret kept in `file`: the stored one, or a new random one (32 bytes,
/// hex; written mode 0600) on first use.
pub fn webhook_secret(file: &Path) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(file)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_owned());
    }
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    write_private(file, &secret)
        .with_context(|| format!("writing the webhook secret to {}", file.display()))?;
    tracing::info!(file = %file.display(), "created a webhook signing secret");
    Ok(secret)
}

fn write_private(file: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    out.write_all(contents.as_bytes())?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprotected_public_listeners_are_refused() {
        let public: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let flags = SecurityFlags::default();
        let err = flags.check_listen(public).unwrap_err().to_string();
        assert!(err.contains("without TLS"), "{err}");
        assert!(flags.check_listen(local).is_ok());
        let insecure = SecurityFlags {
            insecure: true,
            ..Default::default()
        };
        assert!(insecure.check_listen(public).is_ok());
        let tls_no_auth = SecurityFlags {
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            no_auth: true,
            ..Default::default()
        };
        let err = tls_no_auth.check_listen(public).unwrap_err().to_string();
        assert!(err.contains("without authentication"), "{err}");
        let protected = SecurityFlags {
            no_auth: false,
            ..tls_no_auth
        };
        assert!(protected.check_listen(public).is_ok());
    }
}
