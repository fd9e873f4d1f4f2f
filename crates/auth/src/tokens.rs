//! API token strings: `dmt_<id>_<secret>`, where the id (12 hex digits) finds the stored record
//! and the secret (64 hex digits, 256 random bits) is checked against its SHA-256. The secret
//! has full entropy, so a fast hash is enough (no password-hashing KDF needed), and comparing
//! hashes leaks nothing useful about the secret.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use dagmesh_proto::limits::{MAX_ENTRIES, MAX_NAME_LEN, MAX_VALUE_LEN, check_len};
use dagmesh_proto::v1::{ApiToken, CreateTokenRequest, Scope, StoredToken};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

const PREFIX: &str = "dmt";
/// The longest lifetime a token may be given.
pub const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A token's id and secret, as parsed from the bearer string.
pub struct Parsed<'a> {
    pub id: &'a str,
    pub secret: &'a str,
}

/// Splits a bearer token into id and secret; None for anything not shaped like one.
pub fn parse(token: &str) -> Option<Parsed<'_>> {
    let rest = token.strip_prefix(PREFIX)?.strip_prefix('_')?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 12) && hex(secret, 64)).then_some(Parsed { id, secret })
}

/// Hex SHA-256 of a secret, as stored.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new random token: (id, full token string, hash of its secret).
pub fn generate() -> (String, String, String) {
    let mut id = [0u8; 6];
    let mut secret = [0u8; 32];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let token = format!("{PREFIX}_{id}_{secret}");
    let digest = hash(&secret);
    (id, token, digest)
}

/// Checks a CreateToken request and builds the record to store (with a fresh id and secret).
/// Returns the record and the token string to show once.
pub fn new_token(
    request: CreateTokenRequest,
    created_by: &str,
) -> Result<(StoredToken, String), String> {
    check_len("name", &request.name, MAX_NAME_LEN)?;
    if request.name.is_empty()
        || !request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(format!(
            "name: {:?} must be 1-{MAX_NAME_LEN} characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            request.name
        ));
    }
    let mut scopes = Vec::new();
    for (index, &raw) in request.scopes.iter().enumerate() {
        match Scope::try_from(raw) {
            Ok(Scope::Unspecified) | Err(_) => {
                return Err(format!("scopes[{index}]: {raw} is not a scope"));
            }
            Ok(Scope::Internal) => {
                return Err(format!(
                    "scopes[{index}]: the internal scope belongs to the services' shared token \
                     and cannot be given to an API token"
                ));
            }
            Ok(scope) if !scopes.contains(&scope) => scopes.push(scope),
            Ok(_) => {}
        }
    }
    if scopes.is_empty() {
        return Err(
            "scopes: at least one of worker, submit, read, operate, admin is required".into(),
        );
    }
    if request.task_patterns.len() > MAX_ENTRIES {
        return Err(format!(
            "task_patterns: {} patterns, over the limit of {MAX_ENTRIES}",
            request.task_patterns.len()
        ));
    }
    for (index, pattern) in request.task_patterns.iter().enumerate() {
        check_len(&format!("task_patterns[{index}]"), pattern, MAX_NAME_LEN)?;
        if pattern.is_empty() {
            return Err(format!("task_patterns[{index}]: must not be empty"));
        }
    }
    if !request.task_patterns.is_empty() && !scopes.contains(&Scope::Worker) {
        return Err("task_patterns: only meaningful with the worker scope".into());
    }
    if scopes.contains(&Scope::Worker)
        && request.task_patterns.is_empty()
        && !scopes.contains(&Scope::Admin)
    {
        return Err(
            "task_patterns: a worker token needs at least one task-type pattern, e.g. \
             'mesh.*' (or '*' for every task type)"
                .into(),
        );
    }
    check_labels(&request.labels)?;
    let ttl = match request.ttl {
        None => None,
        Some(ttl) if ttl.seconds == 0 && ttl.nanos == 0 => None,
        Some(ttl) => {
            let ttl =
                Duration::try_from(ttl).map_err(|_| "ttl: must not be negative".to_string())?;
            if ttl > MAX_TTL {
                return Err(format!("ttl: {ttl:?} is over the limit of 10 years"));
            }
            Some(ttl)
        }
    };
    let now = SystemTime::now();
    let (id, secret, digest) = generate();
    let token = ApiToken {
        token_id: id,
        name: request.name,
        scopes: scopes.into_iter().map(|s| s as i32).collect(),
        task_patterns: request.task_patterns,
        labels: request.labels,
        created_at: Some(now.into()),
        expires_at: ttl.map(|ttl| (now + ttl).into()),
        revoked_at: None,
        created_by: created_by.to_owned(),
    };
    Ok((
        StoredToken {
            token: Some(token),
            secret_sha256: digest,
        },
        secret,
    ))
}

fn check_labels(labels: &HashMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_ENTRIES {
        return Err(format!(
            "labels: {} entries, over the limit of {MAX_ENTRIES}",
            labels.len()
        ));
    }
    for (key, value) in labels {
        check_len("labels key", key, MAX_NAME_LEN)?;
        check_len(&format!("labels.{key}"), value, MAX_VALUE_LEN)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_hash() {
        let (id, token, digest) = generate();
        let parsed = parse(&token).expect("parses");
        assert_eq!(parsed.id, id);
        assert_eq!(hash(parsed.secret), digest);
        assert!(parse("dmt_123_456").is_none());
        assert!(parse("Bearer x").is_none());
        assert!(parse(&token.replace("dmt_", "xyz_")).is_none());
    }

    #[test]
    fn requests_are_checked() {
        let request = |scopes: Vec<Scope>, patterns: &[&str]| CreateTokenRequest {
            name: "gpu-pool".into(),
            scopes: scopes.into_iter().map(|s| s as i32).collect(),
            task_patterns: patterns.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        assert!(new_token(request(vec![Scope::Worker], &["mesh.*"]), "t").is_ok());
        let err = new_token(request(vec![Scope::Worker], &[]), "t").unwrap_err();
        assert!(err.contains("task_patterns"), "{err}");
        let err = new_token(request(vec![Scope::Internal], &[]), "t").unwrap_err();
        assert!(err.contains("internal"), "{err}");
        let err = new_token(request(vec![], &[]), "t").unwrap_err();
        assert!(err.contains("scopes"), "{err}");
        let mut bad_name = request(vec![Scope::Read], &[]);
        bad_name.name = "a b".into();
        assert!(new_token(bad_name, "t").unwrap_err().contains("name"));
    }
}
