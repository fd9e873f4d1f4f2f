//! Concurrency limits, from the executor's configuration (`--limits FILE`, YAML):
//!
//! ```yaml
//! runs:                      # admission: a run that would exceed one of these waits QUEUED
//!   - name: everything       # at most 100 runs running at once
//!     max: 100
//!   - name: nightly-etl      # at most 1 run of this workflow
//!     workflow: nightly-etl
//!     max: 1
//!   - name: per-customer     # at most 2 runs per value of the key (CEL over `inputs`, `tags`)
//!     key: inputs.customer_id
//!     max: 2
//! steps:                     # at most N running steps holding StepSpec.concurrency_key
//!   warehouse: 3
//! ```
//!
//! Queued runs are admitted by priority (`SubmitRunRequest.priority`), then first-in-first-out;
//! a queued run that does not fit yet does not block later ones that do.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use serde_json::{Map, Value as Json};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    runs: Vec<RunLimitFile>,
    #[serde(default)]
    steps: BTreeMap<String, u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunLimitFile {
    name: String,
    #[serde(default)]
    workflow: Option<String>,
    #[serde(default)]
    key: Option<String>,
    max: u32,
}

struct RunLimit {
    name: String,
    workflow: Option<String>,
    key: Option<(String, cel::Program)>,
    max: u32,
}

/// Validated limits. The default has none: every run is admitted, every step dispatched.
#[derive(Default)]
pub struct Limits {
    runs: Vec<RunLimit>,
    steps: HashMap<String, u32>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field(
                "runs",
                &self.runs.iter().map(|l| &l.name).collect::<Vec<_>>(),
            )
            .field("steps", &self.steps)
            .finish()
    }
}

impl Limits {
    /// Parses and checks a limits file; errors name the field, e.g. `runs[1].key: ...`.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let file: LimitsFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let mut runs = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, limit) in file.runs.into_iter().enumerate() {
            if limit.name.is_empty() || !names.insert(limit.name.clone()) {
                return Err(format!(
                    "runs[{i}].name: empty or duplicate name {:?}",
                    limit.name
                ));
            }
            if limit.max == 0 {
                return Err(format!("runs[{i}].max: must be at least 1"));
            }
            let key = match limit.key {
                Some(text) => {
                    let program = cel::Program::compile(&text)
                        .map_err(|e| format!("runs[{i}].key: invalid expression: {e}"))?;
                    Some((text, program))
                }
                None => None,
            };
            runs.push(RunLimit {
                name: limit.name,
                workflow: limit.workflow,
                key,
                max: limit.max,
            });
        }
        for (name, max) in &file.steps {
            if *max == 0 {
                return Err(format!("steps.{name}: must be at least 1"));
            }
        }
        Ok(Self {
            runs,
            steps: file.steps.into_iter().collect(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading limits file {}: {e}", path.display()))?;
        Self::from_yaml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The admission buckets a run occupies: one per run limit that applies to it, named
    /// `limit` or `limit=key value`. A limit whose key cannot be evaluated for the run (it
    /// reads an input or tag the run does not have) does not apply to it: such a limit is
    /// about other runs, and refusing this one would block every other workflow.
    pub(crate) fn buckets(
        &self,
        workflow: &str,
        inputs: &Map<String, Json>,
        tags: &HashMap<String, String>,
    ) -> Vec<String> {
        let mut buckets = Vec::new();
        for limit in &self.runs {
            if limit.workflow.as_deref().is_some_and(|w| w != workflow) {
                continue;
            }
            match &limit.key {
                None => buckets.push(limit.name.clone()),
                Some((_, program)) => {
                    if let Ok(value) = evaluate_key(program, inputs, tags) {
                        buckets.push(format!("{}={value}", limit.name));
                    }
                }
            }
        }
        buckets
    }

    /// The most runs that may hold `bucket` at once.
    pub(crate) fn bucket_max(&self, bucket: &str) -> u32 {
        let name = bucket.split_once('=').map_or(bucket, |(name, _)| name);
        self.runs
            .iter()
            .find(|limit| limit.name == name)
            .map_or(u32::MAX, |limit| limit.max)
    }

    /// The most running steps that may hold resource `key` at once.
    pub(crate) fn step_max(&self, key: &str) -> u32 {
        self.steps.get(key).copied().unwrap_or(u32::MAX)
    }
}

fn evaluate_key(
    program: &cel::Program,
    inputs: &Map<String, Json>,
    tags: &HashMap<String, String>,
) -> Result<String, String> {
    let inputs = Json::Object(inputs.clone());
    let tags = Json::Object(
        tags.iter()
            .map(|(k, v)| (k.clone(), Json::String(v.clone())))
            .collect(),
    );
    let value = dagmesh_spec::evaluate_json(program, &[("inputs", &inputs), ("tags", &tags)])?;
    Ok(match value {
        Json::String(s) => s,
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_follow_workflow_filters_and_keys() {
        let limits = Limits::from_yaml(
            "runs:\n  - {name: all, max: 10}\n  - {name: etl, workflow: etl, max: 1}\n  - {name: cust, key: inputs.customer, max: 2}\nsteps: {warehouse: 3}\n",
        )
        .expect("valid");
        let inputs: Map<String, Json> = serde_json::from_str(r#"{"customer": "acme"}"#).unwrap();
        let tags = HashMap::new();
        assert_eq!(
            limits.buckets("etl", &inputs, &tags),
            ["all", "etl", "cust=acme"]
        );
        assert_eq!(
            limits.buckets("other", &inputs, &tags),
            ["all", "cust=acme"]
        );
        assert_eq!(limits.bucket_max("cust=acme"), 2);
        assert_eq!(limits.step_max("warehouse"), 3);
        assert_eq!(limits.step_max("elsewhere"), u32::MAX);
    }

    #[test]
    fn bad_limits_name_the_field() {
        let error =
            Limits::from_yaml("runs:\n  - {name: a, key: 'inputs.', max: 1}\n").unwrap_err();
        assert!(
            error.starts_with("runs[0].key: invalid expression"),
            "{error}"
        );
        let error = Limits::from_yaml("runs:\n  - {name: a, max: 0}\n").unwrap_err();
        assert_eq!(error, "runs[0].max: must be at least 1");
        let error = Limits::from_yaml("runs:\n  - {name: a, maxx: 1}\n").unwrap_err();
        assert!(error.contains("unknown field `maxx`"), "{error}");
    }

    #[test]
    fn a_limit_whose_key_cannot_be_evaluated_does_not_apply() {
        let limits = Limits::from_yaml(
            "runs:\n  - {name: all, max: 9}\n  - {name: cust, key: inputs.customer, max: 2}\n  - {name: team, key: tags.team, max: 1}\n",
        )
        .unwrap();
        assert_eq!(limits.buckets("w", &Map::new(), &HashMap::new()), ["all"]);
        let tags = HashMap::from([("team".to_owned(), "vision".to_owned())]);
        assert_eq!(
            limits.buckets("w", &Map::new(), &tags),
            ["all", "team=vision"]
        );
    }
}
