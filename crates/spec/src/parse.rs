//! Workflow files (YAML or JSON) <-> `WorkflowSpec`.
//!
//! The file mirrors the proto field by field; the mirror structs exist so that serde can reject
//! unknown fields (a typo like `neds:` must not silently drop the step's dependencies) and point
//! at the line and column of the mistake.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use dagmesh_proto::v1::{
    ApprovalSpec, CacheSpec, InputSpec, RetryPolicy, StepSpec, WaitForSpec, WorkflowSpec,
};
use serde::{Deserialize, Serialize};

use dagmesh_proto::limits::{MAX_WORKFLOW_FILE_BYTES, MAX_WORKFLOW_FILE_EXPANSION};

use crate::error::SpecErrors;
use crate::expansion::{Budget, Counted};

/// The syntax of a workflow file. JSON is also valid YAML, but parsing it as JSON gives error
/// messages that match what the author wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Yaml,
    Json,
}

impl Format {
    /// `.json` is JSON; `.yaml`, `.yml` and anything else is YAML.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Yaml,
        }
    }
}

/// Parses a workflow file. Only the syntax and the field names and types are checked here;
/// [`compile`](crate::compile) checks the rest.
///
/// Step inputs may be written as any YAML/JSON value: strings are CEL expression text as is,
/// anything else (numbers, bools, null, lists, maps) becomes its JSON text, which is valid CEL,
/// so `count: 3` is the expression `3`. Label values may be bools or numbers (`gpu: true` is
/// the label value `"true"`).
///
/// Files are bounded: at most [`MAX_WORKFLOW_FILE_BYTES`], nested at most 128 levels (both
/// parsers' recursion limit), and expanding (YAML aliases) to at most
/// [`MAX_WORKFLOW_FILE_EXPANSION`] values and string bytes.
pub fn parse_workflow(text: &str, format: Format) -> Result<WorkflowSpec, SpecErrors> {
    if text.len() > MAX_WORKFLOW_FILE_BYTES {
        return Err(SpecErrors::single(
            "file",
            format!(
                "{} bytes, over the limit of {MAX_WORKFLOW_FILE_BYTES}",
                text.len()
            ),
        ));
    }
    let file: WorkflowFile = match format {
        Format::Yaml => {
            check_flow_depth(text)?;
            let budget = Budget::new(MAX_WORKFLOW_FILE_EXPANSION);
            WorkflowFile::deserialize(Counted {
                inner: serde_yaml_ng::Deserializer::from_str(text),
                budget: &budget,
            })
            .map_err(|err| {
                let location = err.location().map(|l| (l.line(), l.column()));
                located_error(err.to_string(), location)
            })?
        }
        Format::Json => serde_json::from_str(text).map_err(|err| {
            let location = (err.line() > 0).then(|| (err.line(), err.column()));
            located_error(err.to_string(), location)
        })?,
    };
    Ok(file.into_spec())
}

/// Brackets (`[`, `{`) a YAML file may nest, as counted by [`check_flow_depth`]; the same as
/// the parsers' recursion limit.
const MAX_FLOW_DEPTH: usize = 128;

/// Refuses YAML whose flow collections nest deeper than [`MAX_FLOW_DEPTH`] before libyaml sees
/// it: libyaml rescans every open level at each token, so 100,000 levels take minutes before
/// serde_yaml_ng's recursion limit can refuse them. The count skips quoted strings and
/// comments; brackets in a block scalar are counted too, which can only refuse a file that
/// nests strings of brackets over 128 deep.
fn check_flow_depth(text: &str) -> Result<(), SpecErrors> {
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut previous = '\n';
    let (mut line, mut column) = (1usize, 0usize);
    for c in text.chars() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
            comment = false;
            if quote == Some('#') {
                quote = None;
            }
        }
        if comment {
            previous = c;
            continue;
        }
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '\'' | '"') => quote = Some(c),
            (None, '#') if previous.is_whitespace() => comment = true,
            (None, '[' | '{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(SpecErrors::single(
                        format!("line {line}, column {column}"),
                        format!("nested deeper than the limit of {MAX_FLOW_DEPTH} levels"),
                    ));
                }
            }
            (None, ']' | '}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        previous = c;
    }
    Ok(())
}

/// Writes a spec as a workflow file that [`parse_workflow`] reads back to an equal spec. Maps are
/// sorted and default fields left out, so the output is stable.
pub fn render_workflow(spec: &WorkflowSpec, format: Format) -> String {
    let file = WorkflowFile::from_spec(spec);
    match format {
        Format::Yaml => {
            serde_yaml_ng::to_string(&file).expect("a workflow file always serializes to YAML")
        }
        Format::Json => {
            let mut text = serde_json::to_string_pretty(&file)
                .expect("a workflow file always serializes to JSON");
            text.push('\n');
            text
        }
    }
}

/// serde_yaml_ng and serde_json put " at line L column C" in their messages; the location moves
/// into the error's path so that it reads like every other spec error.
fn located_error(message: String, location: Option<(usize, usize)>) -> SpecErrors {
    let Some((line, column)) = location else {
        return SpecErrors::single("file", message);
    };
    let message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
    SpecErrors::single(format!("line {line}, column {column}"), message)
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WorkflowFile {
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
    steps: Vec<StepFile>,
    #[serde(skip_serializing_if = "is_false")]
    continue_on_failure: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    inputs: BTreeMap<String, InputFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    on_exit: Vec<StepFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    on_success: Vec<StepFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    on_failure: Vec<StepFile>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    notifications: Vec<NotificationFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct NotificationFile {
    url: String,
    events: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    filter: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct InputFile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    default: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    description: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StepFile {
    id: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    task: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    needs: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    inputs: BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "String::is_empty")]
    when: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry: Option<RetryFile>,
    #[serde(skip_serializing_if = "String::is_empty")]
    timeout: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    schedule_to_start_timeout: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    labels: BTreeMap<String, LabelValue>,
    #[serde(skip_serializing_if = "is_zero")]
    slots: u32,
    #[serde(skip_serializing_if = "is_zero")]
    priority: i32,
    #[serde(skip_serializing_if = "String::is_empty")]
    concurrency_key: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    for_each: String,
    #[serde(skip_serializing_if = "is_zero")]
    max_parallel: u32,
    #[serde(skip_serializing_if = "is_false")]
    continue_on_failure: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    sleep: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    approval: Option<ApprovalFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_for: Option<WaitForFile>,
    #[serde(skip_serializing_if = "String::is_empty")]
    workflow: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<CacheFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CacheFile {
    #[serde(skip_serializing_if = "String::is_empty")]
    key: String,
    ttl: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WaitForFile {
    topic: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    filter: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    timeout: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ApprovalFile {
    #[serde(skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    timeout: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RetryFile {
    #[serde(skip_serializing_if = "is_zero")]
    max_attempts: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    initial_backoff: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    max_backoff: String,
    #[serde(skip_serializing_if = "is_zero")]
    multiplier: f64,
    #[serde(skip_serializing_if = "is_zero")]
    jitter: f64,
    #[serde(skip_serializing_if = "is_false")]
    retry_non_retryable: bool,
}

/// A label value: a string, or a bool or number taken as its text.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
struct LabelValue(String);

impl<'de> Deserialize<'de> for LabelValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl serde::de::Visitor<'_> for Visitor {
            type Value = LabelValue;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or bool")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LabelValue, E> {
                Ok(LabelValue(v.to_owned()))
            }

            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<LabelValue, E> {
                Ok(LabelValue(v.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LabelValue, E> {
                Ok(LabelValue(v.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LabelValue, E> {
                Ok(LabelValue(v.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<LabelValue, E> {
                Ok(LabelValue(v.to_string()))
            }
        }

        deserializer.deserialize_any(Visitor)
    }
}

/// An input written as a non-string value becomes its JSON text, which CEL reads as the same
/// literal.
fn input_expression(value: serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    }
}

impl WorkflowFile {
    fn into_spec(self) -> WorkflowSpec {
        WorkflowSpec {
            name: self.name,
            description: self.description,
            steps: self.steps.into_iter().map(StepFile::into_spec).collect(),
            on_exit: self.on_exit.into_iter().map(StepFile::into_spec).collect(),
            on_success: self
                .on_success
                .into_iter()
                .map(StepFile::into_spec)
                .collect(),
            on_failure: self
                .on_failure
                .into_iter()
                .map(StepFile::into_spec)
                .collect(),
            continue_on_failure: self.continue_on_failure,
            notifications: self
                .notifications
                .into_iter()
                .map(|file| dagmesh_proto::v1::Notification {
                    url: file.url,
                    events: file.events,
                    filter: file.filter,
                })
                .collect(),
            inputs: self
                .inputs
                .into_iter()
                .map(|(name, input)| {
                    let spec = InputSpec {
                        r#type: input.kind,
                        default: input.default.as_ref().map(dagmesh_proto::json::to_value),
                        description: input.description,
                    };
                    (name, spec)
                })
                .collect(),
        }
    }

    fn from_spec(spec: &WorkflowSpec) -> Self {
        WorkflowFile {
            name: spec.name.clone(),
            description: spec.description.clone(),
            steps: spec.steps.iter().map(StepFile::from_spec).collect(),
            on_exit: spec.on_exit.iter().map(StepFile::from_spec).collect(),
            on_success: spec.on_success.iter().map(StepFile::from_spec).collect(),
            on_failure: spec.on_failure.iter().map(StepFile::from_spec).collect(),
            continue_on_failure: spec.continue_on_failure,
            notifications: spec
                .notifications
                .iter()
                .map(|notification| NotificationFile {
                    url: notification.url.clone(),
                    events: notification.events.clone(),
                    filter: notification.filter.clone(),
                })
                .collect(),
            inputs: spec
                .inputs
                .iter()
                .map(|(name, input)| {
                    let file = InputFile {
                        kind: input.r#type.clone(),
                        default: input.default.as_ref().map(dagmesh_proto::json::from_value),
                        description: input.description.clone(),
                    };
                    (name.clone(), file)
                })
                .collect(),
        }
    }
}

impl StepFile {
    fn into_spec(self) -> StepSpec {
        StepSpec {
            id: self.id,
            task: self.task,
            needs: self.needs,
            inputs: self
                .inputs
                .into_iter()
                .map(|(name, value)| (name, input_expression(value)))
                .collect(),
            when: self.when,
            retry: self.retry.map(|r| RetryPolicy {
                max_attempts: r.max_attempts,
                initial_backoff: r.initial_backoff,
                max_backoff: r.max_backoff,
                multiplier: r.multiplier,
                jitter: r.jitter,
                retry_non_retryable: r.retry_non_retryable,
            }),
            timeout: self.timeout,
            schedule_to_start_timeout: self.schedule_to_start_timeout,
            labels: self.labels.into_iter().map(|(k, v)| (k, v.0)).collect(),
            slots: self.slots,
            priority: self.priority,
            concurrency_key: self.concurrency_key,
            for_each: self.for_each,
            max_parallel: self.max_parallel,
            continue_on_failure: self.continue_on_failure,
            sleep: self.sleep,
            approval: self.approval.map(|a| ApprovalSpec {
                message: a.message,
                timeout: a.timeout,
            }),
            wait_for: self.wait_for.map(|w| WaitForSpec {
                topic: w.topic,
                filter: w.filter,
                timeout: w.timeout,
            }),
            workflow: self.workflow,
            cache: self.cache.map(|c| CacheSpec {
                key: c.key,
                ttl: c.ttl,
            }),
        }
    }

    fn from_spec(step: &StepSpec) -> Self {
        StepFile {
            id: step.id.clone(),
            task: step.task.clone(),
            needs: step.needs.clone(),
            // Written back as strings: the spec holds expression text, and a string input is
            // taken verbatim when parsed again.
            inputs: step
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
            when: step.when.clone(),
            retry: step.retry.as_ref().map(|r| RetryFile {
                max_attempts: r.max_attempts,
                initial_backoff: r.initial_backoff.clone(),
                max_backoff: r.max_backoff.clone(),
                multiplier: r.multiplier,
                jitter: r.jitter,
                retry_non_retryable: r.retry_non_retryable,
            }),
            timeout: step.timeout.clone(),
            schedule_to_start_timeout: step.schedule_to_start_timeout.clone(),
            labels: step
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), LabelValue(v.clone())))
                .collect(),
            slots: step.slots,
            priority: step.priority,
            concurrency_key: step.concurrency_key.clone(),
            for_each: step.for_each.clone(),
            max_parallel: step.max_parallel,
            continue_on_failure: step.continue_on_failure,
            sleep: step.sleep.clone(),
            approval: step.approval.as_ref().map(|a| ApprovalFile {
                message: a.message.clone(),
                timeout: a.timeout.clone(),
            }),
            wait_for: step.wait_for.as_ref().map(|w| WaitForFile {
                topic: w.topic.clone(),
                filter: w.filter.clone(),
                timeout: w.timeout.clone(),
            }),
            workflow: step.workflow.clone(),
            cache: step.cache.as_ref().map(|c| CacheFile {
                key: c.key.clone(),
                ttl: c.ttl.clone(),
            }),
        }
    }
}

/// The canonical text of a spec for [`content_hash`](crate::content_hash): compact JSON of the
/// file mirror, whose maps are sorted. Changing the mirror changes every hash, so that makes
/// existing workflows look new once; keep it stable.
pub(crate) fn canonical_json(spec: &WorkflowSpec) -> Vec<u8> {
    serde_json::to_vec(&WorkflowFile::from_spec(spec)).expect("a workflow file always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_follows_the_file_extension() {
        assert_eq!(Format::from_path(Path::new("wf.json")), Format::Json);
        assert_eq!(Format::from_path(Path::new("wf.JSON")), Format::Json);
        assert_eq!(Format::from_path(Path::new("wf.yaml")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("wf.yml")), Format::Yaml);
        assert_eq!(Format::from_path(Path::new("workflow")), Format::Yaml);
    }

    #[test]
    fn non_string_inputs_become_their_json_text_and_strings_stay_verbatim() {
        let spec = parse_workflow(
            "name: wf\nsteps:\n  - id: a\n    inputs: {n: 3, f: 1.5, b: false, z: null, s: \"'text'\", e: inputs.x}\n",
            Format::Yaml,
        )
        .unwrap();
        let inputs = &spec.steps[0].inputs;
        assert_eq!(inputs["n"], "3");
        assert_eq!(inputs["f"], "1.5");
        assert_eq!(inputs["b"], "false");
        assert_eq!(inputs["z"], "null");
        assert_eq!(inputs["s"], "'text'");
        assert_eq!(inputs["e"], "inputs.x");
    }

    #[test]
    fn rendering_leaves_defaults_out() {
        let spec = parse_workflow("name: wf\nsteps: [{id: a, task: t}]\n", Format::Yaml).unwrap();
        assert_eq!(
            render_workflow(&spec, Format::Yaml),
            "name: wf\nsteps:\n- id: a\n  task: t\n"
        );
    }
}
