use std::collections::HashMap;
use std::sync::Arc;

use dagmesh_proto::v1::Scope;

/// Who a call comes from, as [`crate::AuthLayer`] established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// "token:<name>", "internal" or "anonymous"; recorded as the actor of what it does.
    pub name: Arc<str>,
    /// The API token's id; empty for the internal token and for anonymous.
    pub token_id: String,
    pub scopes: Vec<Scope>,
    /// For workers: the task types it may register (glob patterns).
    pub task_patterns: Vec<String>,
    /// For workers, when not empty: the only labels it may claim.
    pub labels: HashMap<String, String>,
}

impl Principal {
    /// Every call when authentication is off: allowed everything, recorded as "anonymous".
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            token_id: String::new(),
            scopes: vec![Scope::Internal],
            task_patterns: Vec::new(),
            labels: HashMap::new(),
        }
    }

    /// The services' shared token.
    pub fn internal() -> Self {
        Self {
            name: Arc::from("internal"),
            ..Self::anonymous()
        }
    }

    /// The principal a handler is called for: the one [`crate::AuthLayer`] attached, or
    /// anonymous when the server runs without authentication.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Principal>()
            .cloned()
            .unwrap_or_else(Self::anonymous)
    }

    /// Whether the scopes cover `needed`: INTERNAL covers everything, ADMIN covers WORKER,
    /// SUBMIT, READ and OPERATE.
    pub fn allows(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|&held| covers(held, needed))
    }

    /// Whether a worker with these credentials may register `task_type`: any task type for
    /// ADMIN and INTERNAL, else one matching a pattern of the token.
    pub fn may_serve(&self, task_type: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| matches!(s, Scope::Admin | Scope::Internal))
            || self
                .task_patterns
                .iter()
                .any(|pattern| pattern_matches(pattern, task_type))
    }

    /// Checks the labels a worker claims against the token's allowed labels (any, when the
    /// token names none). Err names the first label that is not allowed.
    pub fn check_labels(&self, claimed: &HashMap<String, String>) -> Result<(), String> {
        if self.labels.is_empty() {
            return Ok(());
        }
        let mut keys: Vec<&String> = claimed.keys().collect();
        keys.sort();
        for key in keys {
            let value = &claimed[key];
            if self.labels.get(key) != Some(value) {
                return Err(format!(
                    "labels.{key}: {value:?} is not allowed for {} (it may claim only {})",
                    self.name,
                    describe_labels(&self.labels)
                ));
            }
        }
        Ok(())
    }

    /// The scopes as lower-case names, e.g. "read, submit".
    pub fn scope_list(&self) -> String {
        let names: Vec<&str> = self.scopes.iter().map(|&s| scope_name(s)).collect();
        names.join(", ")
    }
}

fn covers(held: Scope, needed: Scope) -> bool {
    held == needed
        || held == Scope::Internal
        || (held == Scope::Admin
            && matches!(
                needed,
                Scope::Worker | Scope::Submit | Scope::Read | Scope::Operate
            ))
}

fn describe_labels(labels: &HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(", ")
}

/// The lower-case name of a scope, as the CLI spells it ("worker", "admin", ...).
pub fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Unspecified => "unspecified",
        Scope::Worker => "worker",
        Scope::Submit => "submit",
        Scope::Read => "read",
        Scope::Operate => "operate",
        Scope::Admin => "admin",
        Scope::Internal => "internal",
    }
}

/// Glob match where `*` stands for any run of characters (dots included): "mesh.*" matches
/// "mesh.build" and "mesh.gpu.render"; "*" matches everything; no other character is special.
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    // Greedy left to right over the middle parts, within the text between prefix and suffix.
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("mesh.*", "mesh.build"));
        assert!(pattern_matches("mesh.*", "mesh.gpu.render"));
        assert!(!pattern_matches("mesh.*", "meshx.build"));
        assert!(!pattern_matches("mesh.*", "billing.charge"));
        assert!(pattern_matches("*", "anything"));
        assert!(pattern_matches("mesh.build", "mesh.build"));
        assert!(!pattern_matches("mesh.build", "mesh.build2"));
        assert!(pattern_matches("*.render", "gpu.render"));
        assert!(pattern_matches("a*b*c", "a-x-b-y-c"));
        assert!(!pattern_matches("a*b*c", "a-x-c-y-b"));
        assert!(!pattern_matches("ab*ba", "aba"));
    }

    #[test]
    fn scopes_nest_only_under_admin_and_internal() {
        let with = |scopes: Vec<Scope>| Principal {
            scopes,
            ..Principal::anonymous()
        };
        let admin = with(vec![Scope::Admin]);
        assert!(admin.allows(Scope::Worker) && admin.allows(Scope::Operate));
        assert!(!admin.allows(Scope::Internal));
        let read = with(vec![Scope::Read]);
        assert!(read.allows(Scope::Read) && !read.allows(Scope::Submit));
        assert!(with(vec![Scope::Internal]).allows(Scope::Admin));
    }

    #[test]
    fn labels_must_be_allowed() {
        let mut principal = Principal::anonymous();
        principal.labels = HashMap::from([("pool".into(), "cpu".into())]);
        assert!(
            principal
                .check_labels(&HashMap::from([("pool".into(), "cpu".into())]))
                .is_ok()
        );
        let err = principal
            .check_labels(&HashMap::from([("gpu".into(), "true".into())]))
            .unwrap_err();
        assert!(err.contains("labels.gpu"), "{err}");
    }
}
