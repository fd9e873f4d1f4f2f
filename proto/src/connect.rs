//! How every dagmesh client reaches a server: the URL decides plaintext (`http://`) or TLS
//! (`https://`), [`ClientSettings`] carries the CA, the client certificate for mTLS and the
//! bearer token, and [`AuthChannel`] attaches the token to every call. The CLI, the Rust SDK
//! and the services talking to each other all connect through here, so the settings and their
//! environment variables mean the same everywhere (the Python and C++ SDKs follow the same
//! table).

use std::fmt;
use std::path::{Path, PathBuf};

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub const ENV_TOKEN: &str = "DAGMESH_TOKEN";
pub const ENV_TOKEN_FILE: &str = "DAGMESH_TOKEN_FILE";
pub const ENV_TLS_CA: &str = "DAGMESH_TLS_CA";
pub const ENV_TLS_CLIENT_CERT: &str = "DAGMESH_TLS_CLIENT_CERT";
pub const ENV_TLS_CLIENT_KEY: &str = "DAGMESH_TLS_CLIENT_KEY";
pub const ENV_TLS_SERVER_NAME: &str = "DAGMESH_TLS_SERVER_NAME";

/// A channel that sends the bearer token (if any) with every call.
pub type AuthChannel = InterceptedService<Channel, Credentials>;

/// A client setting that cannot be used, or a server that cannot be reached.
#[derive(Debug)]
pub struct ConnectError(String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// TLS and credentials of a client. Unset fields fall back to the environment with
/// [`ClientSettings::or_env`]; an explicit value always wins.
#[derive(Clone, Default)]
pub struct ClientSettings {
    /// Bearer token (`DAGMESH_TOKEN`).
    pub token: Option<String>,
    /// File holding the token, used when `token` is unset (`DAGMESH_TOKEN_FILE`).
    pub token_file: Option<PathBuf>,
    /// PEM CA certificates to trust instead of the system roots (`DAGMESH_TLS_CA`).
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain and key, for mTLS (`DAGMESH_TLS_CLIENT_CERT`,
    /// `DAGMESH_TLS_CLIENT_KEY`).
    pub tls_client_cert: Option<PathBuf>,
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify in the server certificate instead of the URL's host
    /// (`DAGMESH_TLS_SERVER_NAME`).
    pub tls_server_name: Option<String>,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("token_file", &self.token_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client_cert", &self.tls_client_cert)
            .field("tls_client_key", &self.tls_client_key)
            .field("tls_server_name", &self.tls_server_name)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl ClientSettings {
    /// Everything from the environment.
    pub fn from_env() -> Self {
        Self::default().or_env()
    }

    /// Fills each unset field from its environment variable.
    pub fn or_env(mut self) -> Self {
        // An explicit token or token file wins over both variables.
        if self.token.is_none() && self.token_file.is_none() {
            self.token = env(ENV_TOKEN);
            if self.token.is_none() {
                self.token_file = env(ENV_TOKEN_FILE).map(PathBuf::from);
            }
        }
        self.tls_ca = self.tls_ca.or_else(|| env(ENV_TLS_CA).map(PathBuf::from));
        self.tls_client_cert = self
            .tls_client_cert
            .or_else(|| env(ENV_TLS_CLIENT_CERT).map(PathBuf::from));
        self.tls_client_key = self
            .tls_client_key
            .or_else(|| env(ENV_TLS_CLIENT_KEY).map(PathBuf::from));
        self.tls_server_name = self.tls_server_name.or_else(|| env(ENV_TLS_SERVER_NAME));
        self
    }

    /// With this token (replacing any other).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The token: `token`, else the contents of `token_file` (trimmed), else none.
    pub fn resolve_token(&self) -> Result<Option<String>, ConnectError> {
        if let Some(token) = &self.token {
            return Ok(Some(token.trim().to_owned()));
        }
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let token = read_file("token file", ENV_TOKEN_FILE, path)?;
        let token = String::from_utf8(token).map_err(|_| {
            ConnectError(format!(
                "token file {} ({ENV_TOKEN_FILE}) is not text",
                path.display()
            ))
        })?;
        Ok(Some(token.trim().to_owned()))
    }

    /// The interceptor that adds `authorization: Bearer <token>`.
    pub fn credentials(&self) -> Result<Credentials, ConnectError> {
        let Some(token) = self.resolve_token()? else {
            return Ok(Credentials(None));
        };
        let value: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| {
                ConnectError(
                    "token: must be printable ASCII (as printed by `dagmesh tokens create`)".into(),
                )
            })?;
        Ok(Credentials(Some(value)))
    }

    /// An endpoint for `url` with TLS configured when the URL is `https://`. TLS settings
    /// with an `http://` URL are an error rather than silently unused.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, ConnectError> {
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|error| {
            ConnectError(format!(
                "invalid server URL {url:?}: {error} (expected http://host:port or https://host:port)"
            ))
        })?;
        let tls = url.starts_with("https://");
        let tls_settings = [
            ("tls_ca", ENV_TLS_CA, self.tls_ca.is_some()),
            (
                "tls_client_cert",
                ENV_TLS_CLIENT_CERT,
                self.tls_client_cert.is_some(),
            ),
            (
                "tls_client_key",
                ENV_TLS_CLIENT_KEY,
                self.tls_client_key.is_some(),
            ),
            (
                "tls_server_name",
                ENV_TLS_SERVER_NAME,
                self.tls_server_name.is_some(),
            ),
        ];
        if !tls {
            if let Some((name, var, _)) = tls_settings.iter().find(|(_, _, set)| *set) {
                return Err(ConnectError(format!(
                    "{name} ({var}) is set but the server URL {url:?} is not https://: TLS \
                     settings need an https:// server URL"
                )));
            }
            return Ok(endpoint);
        }
        let mut config = ClientTlsConfig::new();
        config = match &self.tls_ca {
            Some(path) => config.ca_certificate(Certificate::from_pem(read_file(
                "tls_ca", ENV_TLS_CA, path,
            )?)),
            None => config.with_native_roots(),
        };
        match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => {
                let cert = read_file("tls_client_cert", ENV_TLS_CLIENT_CERT, cert)?;
                let key = read_file("tls_client_key", ENV_TLS_CLIENT_KEY, key)?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(ConnectError(format!(
                    "tls_client_cert ({ENV_TLS_CLIENT_CERT}) is set without tls_client_key \
                     ({ENV_TLS_CLIENT_KEY}): mTLS needs both"
                )));
            }
            (None, Some(_)) => {
                return Err(ConnectError(format!(
                    "tls_client_key ({ENV_TLS_CLIENT_KEY}) is set without tls_client_cert \
                     ({ENV_TLS_CLIENT_CERT}): mTLS needs both"
                )));
            }
        }
        if let Some(name) = &self.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint.tls_config(config).map_err(|error| {
            ConnectError(format!("TLS settings for {url}: {}", error_chain(&error)))
        })
    }

    /// A channel to `url` that connects on first use (and again after failures).
    pub fn connect_lazy(
        &self,
        url: &str,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<AuthChannel, ConnectError> {
        let credentials = self.credentials()?;
        let endpoint = configure(self.endpoint(url)?);
        Ok(InterceptedService::new(
            endpoint.connect_lazy(),
            credentials,
        ))
    }

    /// A channel to `url`, connected now: handshake failures (an untrusted certificate, a
    /// name mismatch, a refused client certificate) surface here with their cause.
    pub async fn connect(
        &self,
        url: &str,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<AuthChannel, ConnectError> {
        let credentials = self.credentials()?;
        let endpoint = configure(self.endpoint(url)?);
        let channel = endpoint.connect().await.map_err(|error| {
            ConnectError(format!("cannot connect to {url}: {}", error_chain(&error)))
        })?;
        Ok(InterceptedService::new(channel, credentials))
    }
}

/// The client settings as command-line flags, each with its environment variable (the CLI,
/// the example and conformance workers). `global`: on a command with subcommands they may be
/// given after any of them.
#[cfg(feature = "clap")]
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientFlags {
    /// Bearer token. Default: the file of --token-file / DAGMESH_TOKEN_FILE.
    #[arg(long, global = true, env = ENV_TOKEN, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, global = true, env = ENV_TOKEN_FILE)]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for an https:// server (default: the system's roots).
    #[arg(long, global = true, env = ENV_TLS_CA)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mTLS.
    #[arg(long, global = true, env = ENV_TLS_CLIENT_CERT)]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, global = true, env = ENV_TLS_CLIENT_KEY)]
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify in the server's certificate instead of the URL's host.
    #[arg(long, global = true, env = ENV_TLS_SERVER_NAME)]
    pub tls_server_name: Option<String>,
}

#[cfg(feature = "clap")]
impl ClientFlags {
    pub fn settings(self) -> ClientSettings {
        ClientSettings {
            token: self.token,
            token_file: self.token_file,
            tls_ca: self.tls_ca,
            tls_client_cert: self.tls_client_cert,
            tls_client_key: self.tls_client_key,
            tls_server_name: self.tls_server_name,
        }
    }
}

/// Adds the bearer token to each call; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Credentials(Option<AsciiMetadataValue>);

impl Credentials {
    /// No token: for servers without authentication.
    pub fn none() -> Self {
        Self(None)
    }

    /// Wraps an existing channel.
    pub fn wrap(self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self)
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

fn read_file(setting: &str, var: &str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|error| {
        ConnectError(format!(
            "{setting} ({var}): cannot read {}: {error}",
            path.display()
        ))
    })
}

/// An error and its causes, "a: b: c" (tonic's transport errors say little at the top).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_need_https() {
        let settings = ClientSettings {
            tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let err = settings.endpoint("http://127.0.0.1:1").unwrap_err();
        assert!(err.to_string().contains("need an https://"), "{err}");
        let err = settings.endpoint("https://127.0.0.1:1").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn client_cert_needs_key() {
        let settings = ClientSettings {
            tls_client_cert: Some("cert.pem".into()),
            ..Default::default()
        };
        let err = settings.endpoint("https://localhost:1").unwrap_err();
        assert!(err.to_string().contains("without tls_client_key"), "{err}");
    }

    #[test]
    fn token_file_is_trimmed_and_token_wins() {
        let dir = std::env::temp_dir().join(format!("dagmesh-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "dmt_abc\n").unwrap();
        let settings = ClientSettings {
            token_file: Some(file.clone()),
            ..Default::default()
        };
        assert_eq!(
            settings.resolve_token().unwrap().as_deref(),
            Some("dmt_abc")
        );
        let settings = settings.with_token("other");
        assert_eq!(settings.resolve_token().unwrap().as_deref(), Some("other"));
        let missing = ClientSettings {
            token_file: Some(dir.join("missing")),
            ..Default::default()
        };
        let err = missing.resolve_token().unwrap_err();
        assert!(err.to_string().contains("DAGMESH_TOKEN_FILE"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
