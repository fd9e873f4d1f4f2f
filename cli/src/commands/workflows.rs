//! `dagmesh workflows ...`: register and read workflow definitions.

use std::path::PathBuf;
use std::process::ExitCode;

use dagmesh_api::{ExecutorApi, GrpcExecutor};
use dagmesh_proto::v1::{ApplyWorkflowRequest, GetWorkflowRequest, ListWorkflowsRequest, Workflow};

use super::format::{self, Table};
use super::submit::{load_spec, parse_workflow_ref};
use super::{Global, OutputFormat, connect, json, print_json};

#[derive(clap::Subcommand, Debug)]
pub enum WorkflowsCommand {
    /// Register a workflow file: a new version when its content changed, else nothing.
    Apply {
        /// Workflow file (YAML, or JSON for `.json`).
        file: PathBuf,
    },
    /// The latest version of every workflow.
    List,
    /// Show a workflow: its spec as a YAML workflow file (with `-o json`, the Workflow message).
    Get {
        /// NAME, or NAME@VERSION.
        #[arg(value_name = "NAME[@VERSION]")]
        name: String,
        /// The version to show (default: the latest).
        #[arg(long, value_name = "N")]
        version: Option<u32>,
    },
}

pub async fn run(global: &Global, command: WorkflowsCommand) -> anyhow::Result<ExitCode> {
    match command {
        WorkflowsCommand::Apply { file } => {
            let spec = match load_spec(&file) {
                Ok(spec) => spec,
                Err(code) => return Ok(code),
            };
            let client = GrpcExecutor::new(connect(global).await?);
            let response = client
                .apply_workflow(ApplyWorkflowRequest { spec: Some(spec) })
                .await?;
            match global.output {
                OutputFormat::Json => print_json(&json::apply_response(&response)),
                OutputFormat::Text => {
                    let workflow = response.workflow.unwrap_or_default();
                    let what = if response.created {
                        "created"
                    } else {
                        "unchanged"
                    };
                    outln!(
                        "workflow {} version {} {what}",
                        workflow.name,
                        workflow.version
                    );
                }
            }
        }
        WorkflowsCommand::List => {
            let client = GrpcExecutor::new(connect(global).await?);
            let response = client.list_workflows(ListWorkflowsRequest {}).await?;
            match global.output {
                OutputFormat::Json => print_json(&json::list_workflows_response(&response)),
                OutputFormat::Text => out!("{}", workflows_table(&response.workflows)),
            }
        }
        WorkflowsCommand::Get { name, version } => {
            let mut reference = parse_workflow_ref(&name)?;
            if let Some(version) = version {
                reference.version = version;
            }
            let client = GrpcExecutor::new(connect(global).await?);
            let workflow = client
                .get_workflow(GetWorkflowRequest {
                    name: reference.name,
                    version: reference.version,
                })
                .await?;
            match global.output {
                OutputFormat::Json => print_json(&json::workflow(&workflow)),
                OutputFormat::Text => out!("{}", workflow_yaml(&workflow)),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn workflows_table(workflows: &[Workflow]) -> String {
    let mut table = Table::new(&["NAME", "VERSION", "STEPS", "CREATED", "DESCRIPTION"]);
    for workflow in workflows {
        let spec = workflow.spec.clone().unwrap_or_default();
        table.row(vec![
            workflow.name.clone(),
            workflow.version.to_string(),
            spec.steps.len().to_string(),
            format::datetime(workflow.created_at.as_ref()),
            format::one_line(&spec.description, 60),
        ]);
    }
    table.render()
}

/// The spec as a workflow file, headed by comments with the version details, so that the
/// output can be saved, edited and applied again.
pub(crate) fn workflow_yaml(workflow: &Workflow) -> String {
    let spec = workflow.spec.clone().unwrap_or_default();
    format!(
        "# {} version {}, created {}\n# sha256 {}\n{}",
        workflow.name,
        workflow.version,
        format::datetime(workflow.created_at.as_ref()),
        workflow.content_hash,
        dagmesh_spec::render_workflow(&spec, dagmesh_spec::Format::Yaml)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::{StepSpec, WorkflowSpec};

    #[test]
    fn get_prints_a_file_that_parses_back_to_the_same_spec() {
        let spec = WorkflowSpec {
            name: "room-scan".into(),
            description: "Scan a room".into(),
            steps: vec![
                StepSpec {
                    id: "fetch".into(),
                    task: "fetch.images@^1".into(),
                    ..StepSpec::default()
                },
                StepSpec {
                    id: "mesh".into(),
                    task: "mesh.build@^1.2".into(),
                    needs: vec!["fetch".into()],
                    inputs: [("images".to_owned(), "fetch.images".to_owned())].into(),
                    ..StepSpec::default()
                },
            ],
            continue_on_failure: false,
            inputs: [(
                "room_id".to_owned(),
                dagmesh_proto::v1::InputSpec {
                    r#type: "string".into(),
                    ..Default::default()
                },
            )]
            .into(),
            on_failure: vec![StepSpec {
                id: "page".into(),
                task: "notify.send@^1".into(),
                inputs: [("error".to_owned(), "run.error".to_owned())].into(),
                ..StepSpec::default()
            }],
            ..WorkflowSpec::default()
        };
        let workflow = Workflow {
            name: "room-scan".into(),
            version: 4,
            spec: Some(spec.clone()),
            content_hash: "abc123".into(),
            created_at: None,
        };
        let text = workflow_yaml(&workflow);
        assert!(text.starts_with("# room-scan version 4, created -\n# sha256 abc123\n"));
        let parsed = dagmesh_spec::parse_workflow(&text, dagmesh_spec::Format::Yaml).unwrap();
        assert_eq!(parsed, spec);
        assert_eq!(
            workflows_table(&[workflow]),
            "NAME       VERSION  STEPS  CREATED  DESCRIPTION\n\
             room-scan  4        2      -        Scan a room\n"
        );
    }
}
