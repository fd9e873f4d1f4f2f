//! `dagmesh submit`: start a run of a workflow file (sent inline) or of a registered workflow.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use dagmesh_api::{Caller, ExecutorApi, GrpcExecutor};
use dagmesh_proto::v1::{SubmitRunRequest, WorkflowRef, WorkflowSpec, submit_run_request};
use serde_json::{Map, Value};

use super::{Global, OutputFormat, connect, json, print_json, run_exit_code, watch};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "workflow"])))]
pub struct SubmitArgs {
    /// Workflow file (YAML, or JSON for `.json`), checked here and submitted inline.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Run a registered workflow instead of a file: NAME (latest version) or NAME@VERSION.
    #[arg(long, value_name = "NAME[@VERSION]")]
    pub workflow: Option<String>,
    /// A run input, KEY=VALUE (repeatable). VALUE is JSON when it parses as JSON (`3`, `true`,
    /// `[1,2]`, `{"a":1}`), else a string.
    #[arg(short = 'i', long = "input", value_name = "KEY=VALUE", value_parser = parse_input)]
    pub inputs: Vec<(String, Value)>,
    /// All run inputs as one JSON object, or `@FILE` to read it from a file; `-i` overrides its
    /// keys.
    #[arg(long, value_name = "JSON")]
    pub input_json: Option<String>,
    /// A second submit with the same key returns the first run instead of starting another.
    #[arg(long, value_name = "KEY", env = "DAGMESH_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
    /// A tag on the run, KEY=VALUE (repeatable), for `runs list --tag`.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
    pub tags: Vec<(String, String)>,
    /// Admission priority when the run has to queue behind a concurrency limit (higher first).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// A webhook for this run, on top of the workflow's: the events to POST, then `=` and the
    /// URL, e.g. `run.failed,step.failed=https://hooks.example.com/dagmesh`. Repeatable.
    #[arg(long = "notify", value_name = "EVENTS=URL", value_parser = parse_notify)]
    pub notify: Vec<dagmesh_proto::v1::Notification>,
    /// Follow the run live (a tree of steps) until it ends; exit 0 only if it succeeded.
    #[arg(long, conflicts_with = "wait")]
    pub watch: bool,
    /// Wait quietly for the run to end and print a summary; exit 0 only if it succeeded.
    #[arg(long)]
    pub wait: bool,
}

/// `-i KEY=VALUE`: the value is JSON when it parses, else the text itself.
fn parse_notify(text: &str) -> Result<dagmesh_proto::v1::Notification, String> {
    let (events, url) = text.split_once('=').ok_or_else(|| {
        format!("{text:?}: expected EVENTS=URL, e.g. run.failed=https://hooks.example.com/x")
    })?;
    Ok(dagmesh_proto::v1::Notification {
        url: url.to_owned(),
        events: events.split(',').map(|e| e.trim().to_owned()).collect(),
        filter: String::new(),
    })
}

pub fn parse_input(text: &str) -> Result<(String, Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))?;
    if key.is_empty() {
        return Err(format!("empty key in {text:?}"));
    }
    let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
    Ok((key.to_owned(), value))
}

/// `--tag KEY=VALUE`.
pub fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(format!("empty key in {text:?}")),
        None => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// `NAME` or `NAME@VERSION` (version 0, the latest, when absent).
pub fn parse_workflow_ref(text: &str) -> anyhow::Result<WorkflowRef> {
    let (name, version) = match text.rsplit_once('@') {
        Some((name, version)) => {
            let version = version.parse::<u32>().with_context(|| {
                format!("invalid version {version:?} in {text:?}: expected a number")
            })?;
            (name, version)
        }
        None => (text, 0),
    };
    if name.is_empty() {
        bail!("empty workflow name in {text:?}");
    }
    Ok(WorkflowRef {
        name: name.to_owned(),
        version,
    })
}

/// The run's inputs: `--input-json` first, then each `-i` on top.
pub fn build_inputs(
    input_json: Option<&str>,
    inputs: &[(String, Value)],
) -> anyhow::Result<Map<String, Value>> {
    let mut map = match input_json {
        None => Map::new(),
        Some(text) => {
            let text = match text.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --input-json file {path}"))?,
                None => text.to_owned(),
            };
            match serde_json::from_str(&text).context("--input-json is not valid JSON")? {
                Value::Object(map) => map,
                _ => bail!("--input-json must be a JSON object"),
            }
        }
    };
    for (key, value) in inputs {
        map.insert(key.clone(), value.clone());
    }
    Ok(map)
}

/// Reads and parses a workflow file. `Err(code)` when it could not: the errors are printed.
pub(super) fn load_spec(path: &Path) -> Result<WorkflowSpec, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("error: cannot read {}: {err}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    let format = dagmesh_spec::Format::from_path(path);
    // Compile as well as parse, so a broken graph is reported before anything is sent; the
    // server runs the same checks and reports the same `path: message` lines.
    let checked = dagmesh_spec::parse_workflow(&text, format)
        .and_then(|spec| dagmesh_spec::compile(&spec).map(|_| spec));
    checked.map_err(|errors| {
        eprintln!("error: {errors}");
        ExitCode::from(2)
    })
}

pub async fn run(global: &Global, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let workflow_ref = match (&args.file, &args.workflow) {
        (Some(path), _) => match load_spec(path) {
            Ok(spec) => submit_run_request::WorkflowRef::Spec(spec),
            Err(code) => return Ok(code),
        },
        (None, Some(name)) => submit_run_request::WorkflowRef::Workflow(parse_workflow_ref(name)?),
        (None, None) => bail!("give a workflow FILE or --workflow NAME"),
    };
    let inputs = build_inputs(args.input_json.as_deref(), &args.inputs)?;
    let request = SubmitRunRequest {
        memoize_from: String::new(),
        workflow_ref: Some(workflow_ref),
        inputs: Some(dagmesh_proto::json::map_to_struct(&inputs)),
        idempotency_key: args.idempotency_key.unwrap_or_default(),
        tags: args.tags.into_iter().collect(),
        priority: args.priority,
        notifications: args.notify,
    };

    let channel = connect(global).await?;
    let response = GrpcExecutor::new(channel.clone())
        .submit_run(&Caller::default(), request)
        .await?;
    let run = response.run.clone().context("server returned no run")?;
    if !response.created {
        eprintln!(
            "note: idempotency key matched run {} (state {}); not started again",
            run.run_id,
            super::format::run_state(run.state)
        );
    }

    if args.watch {
        let last = watch::follow(channel, &run.run_id, global.output).await?;
        return Ok(run_exit_code(&last));
    }
    if args.wait {
        let last = watch::wait(channel, &run.run_id).await?;
        match global.output {
            OutputFormat::Json => print_json(&json::run(&last)),
            OutputFormat::Text => outln!("{}", watch::summary(&last)),
        }
        return Ok(run_exit_code(&last));
    }
    match global.output {
        OutputFormat::Json => print_json(&json::submit_response(&response)),
        OutputFormat::Text => outln!("{}", run.run_id),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn input_values_are_json_when_they_parse_else_strings() {
        assert_eq!(parse_input("n=3").unwrap(), ("n".into(), json!(3)));
        assert_eq!(parse_input("ok=true").unwrap(), ("ok".into(), json!(true)));
        assert_eq!(
            parse_input("xs=[1, 2]").unwrap(),
            ("xs".into(), json!([1, 2]))
        );
        assert_eq!(
            parse_input("room=kitchen").unwrap(),
            ("room".into(), json!("kitchen"))
        );
        assert_eq!(parse_input("q=\"3\"").unwrap(), ("q".into(), json!("3")));
        assert_eq!(parse_input("eq=a=b").unwrap(), ("eq".into(), json!("a=b")));
        assert_eq!(parse_input("empty=").unwrap(), ("empty".into(), json!("")));
        assert!(parse_input("novalue").is_err());
        assert!(parse_input("=3").is_err());
    }

    #[test]
    fn dash_i_overrides_input_json() {
        let inputs = [("n".to_owned(), json!(5)), ("tag".to_owned(), json!("x"))];
        let map = build_inputs(Some(r#"{"n": 1, "room": "hall"}"#), &inputs).unwrap();
        assert_eq!(
            Value::Object(map),
            json!({"n": 5, "room": "hall", "tag": "x"})
        );
        assert!(build_inputs(Some("[1]"), &[]).is_err());
        assert!(build_inputs(Some("{"), &[]).is_err());
    }

    #[test]
    fn workflow_refs_take_an_optional_version() {
        let latest = parse_workflow_ref("room-scan").unwrap();
        assert_eq!((latest.name.as_str(), latest.version), ("room-scan", 0));
        let pinned = parse_workflow_ref("room-scan@3").unwrap();
        assert_eq!((pinned.name.as_str(), pinned.version), ("room-scan", 3));
        assert!(parse_workflow_ref("room-scan@latest").is_err());
        assert!(parse_workflow_ref("@3").is_err());
    }

    #[test]
    fn tags_need_a_key() {
        assert_eq!(
            parse_tag("team=vision").unwrap(),
            ("team".into(), "vision".into())
        );
        assert!(parse_tag("team").is_err());
        assert!(parse_tag("=x").is_err());
    }
}
