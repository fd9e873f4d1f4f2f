use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dagmesh_metastore::{MetadataStore, StoreError};
use dagmesh_proto::v1::{Scope, StoredToken};
use tonic::Status;

use crate::Principal;
use crate::jwt::JwtVerifier;
use crate::tokens;

/// How long a looked-up token is trusted before it is read again: a token revoked through
/// another server stops working within this time (at once on the server that revoked it).
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Entries kept at most; a flood of made-up token ids empties the cache rather than growing it.
const CACHE_CAPACITY: usize = 10_000;

/// A looked-up token (None: no such token) and when it was read.
type Cached = (Instant, Option<Arc<StoredToken>>);

/// Turns bearer tokens into principals.
pub struct Authenticator {
    store: Arc<dyn MetadataStore>,
    /// SHA-256 of the services' shared internal token, when one is configured.
    internal: Option<String>,
    cache: Mutex<HashMap<String, Cached>>,
    /// JWTs of an identity provider, when configured.
    jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// `internal_token`: the secret the services present to each other (split mode); calls
    /// carrying it act as the internal principal.
    pub fn new(store: Arc<dyn MetadataStore>, internal_token: Option<&str>) -> Self {
        Self {
            store,
            // Trimmed like every client trims it: a secret file's trailing newline must not
            // lock the services out of each other.
            internal: internal_token
                .map(str::trim)
                .filter(|token| !token.is_empty())
                .map(tokens::hash),
            cache: Mutex::new(HashMap::new()),
            jwt: None,
        }
    }

    /// Also accept JWTs verified by `verifier`.
    pub fn with_jwt(mut self, verifier: JwtVerifier) -> Self {
        self.jwt = Some(verifier);
        self
    }

    pub fn store(&self) -> &Arc<dyn MetadataStore> {
        &self.store
    }

    /// The principal of a bearer token: UNAUTHENTICATED for an unknown, wrong, expired or
    /// revoked token, UNAVAILABLE when the store cannot be asked.
    pub async fn authenticate(&self, bearer: &str) -> Result<Principal, Status> {
        if let Some(internal) = &self.internal
            && tokens::hash(bearer.trim()) == *internal
        {
            return Ok(Principal::internal());
        }
        if let Some(jwt) = &self.jwt
            && crate::jwt::looks_like_jwt(bearer)
        {
            return jwt.verify(bearer);
        }
        let Some(parsed) = tokens::parse(bearer) else {
            return Err(Status::unauthenticated(
                "invalid credentials: the bearer token is not a dagmesh token (expected \
                 dmt_<id>_<secret>, as printed by `dagmesh tokens create`)",
            ));
        };
        let stored = self.lookup(parsed.id).await?;
        let Some(stored) = stored else {
            return Err(Status::unauthenticated(format!(
                "invalid credentials: no token with id {}",
                parsed.id
            )));
        };
        if tokens::hash(parsed.secret) != stored.secret_sha256 {
            return Err(Status::unauthenticated(format!(
                "invalid credentials: wrong secret for token id {}",
                parsed.id
            )));
        }
        let token = stored.token.clone().unwrap_or_default();
        if let Some(at) = &token.revoked_at {
            return Err(Status::unauthenticated(format!(
                "token {:?} was revoked at {}",
                token.name,
                format_time(at)
            )));
        }
        if let Some(at) = &token.expires_at
            && SystemTime::try_from(*at).is_ok_and(|at| at <= SystemTime::now())
        {
            return Err(Status::unauthenticated(format!(
                "token {:?} expired at {}",
                token.name,
                format_time(at)
            )));
        }
        Ok(Principal {
            name: Arc::from(format!("token:{}", token.name)),
            token_id: token.token_id,
            scopes: token
                .scopes
                .iter()
                .filter_map(|&s| Scope::try_from(s).ok())
                .filter(|&s| s != Scope::Internal)
                .collect(),
            task_patterns: token.task_patterns,
            labels: token.labels,
        })
    }

    /// Drops a token from the cache (after revoking it here).
    pub fn forget(&self, token_id: &str) {
        self.cache.lock().expect("cache lock").remove(token_id);
    }

    async fn lookup(&self, id: &str) -> Result<Option<Arc<StoredToken>>, Status> {
        if let Some((at, entry)) = self.cache.lock().expect("cache lock").get(id)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(entry.clone());
        }
        let found = match self.store.get_token(id).await {
            Ok(stored) if stored.token.as_ref().is_some_and(|t| t.token_id == id) => {
                Some(Arc::new(stored))
            }
            // A name that happens to look like an id is not the token.
            Ok(_) | Err(StoreError::NotFound(_)) => None,
            Err(error) if error.is_outage() => {
                return Err(Status::unavailable(format!(
                    "cannot check credentials now: {error}"
                )));
            }
            Err(error) => {
                tracing::error!(%error, token_id = id, "reading a token failed");
                return Err(Status::unauthenticated(format!(
                    "invalid credentials: token {id} cannot be read"
                )));
            }
        };
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(id.to_owned(), (Instant::now(), found.clone()));
        Ok(found)
    }
}

fn format_time(at: &prost_types::Timestamp) -> String {
    match SystemTime::try_from(*at) {
        Ok(time) => humantime::format_rfc3339_seconds(time).to_string(),
        Err(_) => format!("{at:?}"),
    }
}
