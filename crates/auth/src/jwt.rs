//! JWTs from an identity provider, verified with the `jsonwebtoken` crate against a JWKS file
//! (the provider's published keys; re-read when the file changes, so a key rotation that
//! rewrites it is picked up). Issuer and audience must match; `exp` is required. Scopes come
//! from a claim (space-separated string, as OAuth's `scope`, or an array), and a worker's task
//! patterns from another. The internal scope can never come from a JWT.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, check_len};
use dagmesh_proto::v1::Scope;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::Value;
use tonic::Status;

use crate::Principal;

const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Where the keys are and what a token must say.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// A JWKS document (`{"keys": [...]}`), as identity providers publish at `jwks_uri`.
    pub jwks: PathBuf,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of, when the token lists several).
    pub audience: String,
    /// The claim holding the scopes: "read submit" or ["read", "submit"]. Default `scope`.
    pub scopes_claim: String,
    /// The claim holding a worker's task-type patterns (array or space-separated). Default
    /// `dagmesh_tasks`.
    pub tasks_claim: String,
}

pub struct JwtVerifier {
    config: JwtConfig,
    keys: Mutex<Keys>,
}

struct Keys {
    set: Arc<JwkSet>,
    stamp: Option<(SystemTime, u64)>,
    checked: Instant,
}

impl JwtVerifier {
    /// Reads the JWKS now: a missing or malformed file fails the start, naming it.
    pub fn new(config: JwtConfig) -> Result<Self, String> {
        if config.issuer.is_empty() || config.audience.is_empty() {
            return Err(
                "JWT: an issuer (--jwt-issuer) and an audience (--jwt-audience) are required"
                    .into(),
            );
        }
        let set = read_jwks(&config.jwks)?;
        let stamp = stamp(&config.jwks);
        Ok(Self {
            config,
            keys: Mutex::new(Keys {
                set: Arc::new(set),
                stamp,
                checked: Instant::now(),
            }),
        })
    }

    fn keys(&self) -> Arc<JwkSet> {
        let mut keys = self.keys.lock().expect("jwks lock");
        if keys.checked.elapsed() >= RECHECK_EVERY {
            keys.checked = Instant::now();
            let now = stamp(&self.config.jwks);
            if now != keys.stamp {
                keys.stamp = now;
                match read_jwks(&self.config.jwks) {
                    Ok(set) => keys.set = Arc::new(set),
                    Err(error) => {
                        tracing::error!(%error, "JWKS changed but cannot be read; keeping the previous keys")
                    }
                }
            }
        }
        keys.set.clone()
    }

    /// The principal of a JWT, or UNAUTHENTICATED saying what is wrong with it.
    pub fn verify(&self, token: &str) -> Result<Principal, Status> {
        let invalid = |why: String| Status::unauthenticated(format!("invalid JWT: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|e| invalid(e.to_string()))?;
        let keys = self.keys();
        let jwk = match &header.kid {
            Some(kid) => keys
                .find(kid)
                .ok_or_else(|| invalid(format!("no key with kid {kid:?} in the JWKS")))?,
            None if keys.keys.len() == 1 => &keys.keys[0],
            None => return Err(invalid("no kid, and the JWKS has several keys".into())),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| invalid(format!("JWKS key: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<HashMap<String, Value>>(token, &key, &validation)
            .map_err(|e| invalid(e.to_string()))?;
        let claims = data.claims;
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        // The subject becomes the actor recorded on runs; patterns are matched per Hello.
        check_len("sub", subject, MAX_NAME_LEN).map_err(invalid)?;
        let task_patterns = words(claims.get(&self.config.tasks_claim));
        if task_patterns.len() > MAX_ENTRIES {
            return Err(invalid(format!(
                "{}: {} patterns, over the limit of {MAX_ENTRIES}",
                self.config.tasks_claim,
                task_patterns.len()
            )));
        }
        for (index, pattern) in task_patterns.iter().enumerate() {
            check_len(
                &format!("{}[{index}]", self.config.tasks_claim),
                pattern,
                MAX_NAME_LEN,
            )
            .map_err(invalid)?;
        }
        let mut scopes = Vec::new();
        for name in words(claims.get(&self.config.scopes_claim)) {
            let scope = match name.as_str() {
                "worker" => Scope::Worker,
                "submit" => Scope::Submit,
                "read" => Scope::Read,
                "operate" => Scope::Operate,
                "admin" => Scope::Admin,
                // Other scopes of the provider (openid, email, ...) are not ours.
                _ => continue,
            };
            if !scopes.contains(&scope) {
                scopes.push(scope);
            }
        }
        Ok(Principal {
            name: Arc::from(format!("jwt:{subject}")),
            token_id: String::new(),
            scopes,
            task_patterns,
            labels: HashMap::new(),
        })
    }
}

/// A claim as a list of words: "a b" or ["a", "b"].
fn words(claim: Option<&Value>) -> Vec<String> {
    match claim {
        Some(Value::String(text)) => text.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

fn read_jwks(path: &std::path::Path) -> Result<JwkSet, String> {
    let text =
        std::fs::read(path).map_err(|e| format!("JWKS (--jwt-jwks) {}: {e}", path.display()))?;
    serde_json::from_slice(&text)
        .map_err(|e| format!("JWKS (--jwt-jwks) {}: not a JWK set: {e}", path.display()))
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Whether a bearer token looks like a JWT (three base64url parts).
pub fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && !token.starts_with("dmt_")
}
