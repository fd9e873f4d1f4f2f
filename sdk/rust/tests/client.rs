//! The client against a fake RunService/WorkflowService on a real socket.

use std::sync::Mutex;

use dagmesh_proto::v1::run_service_server::{RunService, RunServiceServer};
use dagmesh_proto::v1::workflow_service_server::{WorkflowService, WorkflowServiceServer};
use dagmesh_proto::v1::{
    ApplyWorkflowRequest, ApplyWorkflowResponse, CancelRunRequest, GetRunRequest,
    GetWorkflowRequest, ListRunsRequest, ListRunsResponse, ListWorkflowsRequest,
    ListWorkflowsResponse, RetryRunRequest, Run, RunEvent, RunState, RunStateChanged, Step,
    StepState, StepStateChanged, SubmitRunRequest, SubmitRunResponse, WatchRunRequest,
    WatchRunResponse, Workflow, WorkflowSpec, run_event, submit_run_request, watch_run_response,
};
use dagmesh_sdk::{Client, SubmitRun};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};

/// A run that is RUNNING until its second watch, which delivers the final event: the first
/// watch ends early, as when an executor restarts, so the client has to resume.
#[derive(Default)]
struct Fake {
    watches: Mutex<Vec<u64>>,
    submitted: Mutex<Vec<SubmitRunRequest>>,
}

fn run(state: RunState, last_seq: u64) -> Run {
    Run {
        run_id: "run-1".into(),
        workflow: "room-scan".into(),
        workflow_version: 1,
        state: state.into(),
        last_seq,
        steps: vec![Step {
            step_id: "mesh".into(),
            state: if state == RunState::Succeeded {
                StepState::Succeeded
            } else {
                StepState::Running
            }
            .into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn event(seq: u64, event: run_event::Event) -> Result<WatchRunResponse, Status> {
    Ok(WatchRunResponse {
        message: Some(watch_run_response::Message::Event(RunEvent {
            run_id: "run-1".into(),
            seq,
            at: None,
            event: Some(event),
        })),
    })
}

impl Fake {
    fn done(&self) -> bool {
        self.watches.lock().unwrap().len() >= 2
    }
}

#[tonic::async_trait]
impl RunService for Fake {
    type WatchRunStream = ReceiverStream<Result<WatchRunResponse, Status>>;
    type GetStepLogsStream = ReceiverStream<Result<dagmesh_proto::v1::GetStepLogsResponse, Status>>;

    async fn get_step_logs(
        &self,
        _: Request<dagmesh_proto::v1::GetStepLogsRequest>,
    ) -> Result<Response<Self::GetStepLogsStream>, Status> {
        Err(Status::unimplemented(
            "the client under test never reads logs",
        ))
    }

    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        self.submitted.lock().unwrap().push(request.into_inner());
        Ok(Response::new(SubmitRunResponse {
            run: Some(run(RunState::Running, 1)),
            created: true,
        }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        if request.get_ref().run_id != "run-1" {
            return Err(Status::not_found("no run \"nope\""));
        }
        let state = if self.done() {
            RunState::Succeeded
        } else {
            RunState::Running
        };
        Ok(Response::new(run(state, if self.done() { 3 } else { 1 })))
    }

    async fn list_runs(
        &self,
        _: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        Ok(Response::new(ListRunsResponse {
            runs: vec![run(RunState::Running, 1)],
            next_page_token: String::new(),
        }))
    }

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let after_seq = request.get_ref().after_seq.unwrap_or_default();
        let first = {
            let mut watches = self.watches.lock().unwrap();
            watches.push(after_seq);
            watches.len() == 1
        };
        let (tx, rx) = mpsc::channel(8);
        let messages = if first {
            vec![Ok(WatchRunResponse {
                message: Some(watch_run_response::Message::Snapshot(run(
                    RunState::Running,
                    1,
                ))),
            })]
        } else {
            vec![
                event(
                    2,
                    run_event::Event::StepState(StepStateChanged {
                        step_id: "mesh".into(),
                        state: StepState::Succeeded.into(),
                        attempt: 1,
                        ..Default::default()
                    }),
                ),
                event(
                    3,
                    run_event::Event::RunState(RunStateChanged {
                        state: RunState::Succeeded.into(),
                        error: String::new(),
                        actor: String::new(),
                        suspended: false,
                    }),
                ),
            ]
        };
        for message in messages {
            tx.send(message).await.expect("buffer has room");
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_run(&self, _: Request<CancelRunRequest>) -> Result<Response<Run>, Status> {
        Err(Status::failed_precondition("run already ended"))
    }

    async fn retry_run(&self, _: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        Ok(Response::new(run(RunState::Running, 4)))
    }

    async fn approve_step(
        &self,
        _: Request<dagmesh_proto::v1::ApproveStepRequest>,
    ) -> Result<Response<Run>, Status> {
        Err(Status::failed_precondition(
            "step \"review\" is not an approval step",
        ))
    }

    async fn suspend_run(
        &self,
        _: Request<dagmesh_proto::v1::SuspendRunRequest>,
    ) -> Result<Response<Run>, Status> {
        Ok(Response::new(run(RunState::Running, 5)))
    }

    async fn resume_run(
        &self,
        _: Request<dagmesh_proto::v1::ResumeRunRequest>,
    ) -> Result<Response<Run>, Status> {
        Ok(Response::new(run(RunState::Running, 6)))
    }

    async fn deliver_event(
        &self,
        _: Request<dagmesh_proto::v1::DeliverEventRequest>,
    ) -> Result<Response<dagmesh_proto::v1::DeliverEventResponse>, Status> {
        Ok(Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl WorkflowService for Fake {
    async fn apply_workflow(
        &self,
        request: Request<ApplyWorkflowRequest>,
    ) -> Result<Response<ApplyWorkflowResponse>, Status> {
        let spec = request.into_inner().spec.unwrap_or_default();
        if spec.name.is_empty() {
            return Err(Status::invalid_argument("name: must not be empty"));
        }
        Ok(Response::new(ApplyWorkflowResponse {
            workflow: Some(Workflow {
                name: spec.name.clone(),
                version: 1,
                spec: Some(spec),
                ..Default::default()
            }),
            created: true,
        }))
    }

    async fn get_workflow(
        &self,
        _: Request<GetWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        Err(Status::not_found("no workflow"))
    }

    async fn list_workflows(
        &self,
        _: Request<ListWorkflowsRequest>,
    ) -> Result<Response<ListWorkflowsResponse>, Status> {
        Ok(Response::new(ListWorkflowsResponse::default()))
    }
}

async fn serve() -> (String, std::sync::Arc<Fake>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let fake = std::sync::Arc::new(Fake::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RunServiceServer::from_arc(fake.clone()))
            .add_service(WorkflowServiceServer::from_arc(fake.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (url, fake)
}

#[tokio::test]
async fn submit_then_wait_resumes_a_broken_watch_after_the_last_event() {
    let (url, fake) = serve().await;
    let client = Client::connect(url).await.unwrap();

    let submitted = client
        .submit(
            SubmitRun::workflow("room-scan")
                .inputs(serde_json::json!({"room": "kitchen"}))
                .idempotency_key("upload-42")
                .tag("customer", "acme"),
        )
        .await
        .unwrap();
    assert_eq!(submitted.run_id, "run-1");
    let request = fake.submitted.lock().unwrap().remove(0);
    assert!(matches!(
        request.workflow_ref,
        Some(submit_run_request::WorkflowRef::Workflow(ref w)) if w.name == "room-scan" && w.version == 0
    ));
    assert_eq!(request.idempotency_key, "upload-42");
    assert_eq!(request.tags["customer"], "acme");

    let run = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client.wait_for_run("run-1"),
    )
    .await
    .expect("wait_for_run returns in time")
    .unwrap();
    assert_eq!(run.state(), RunState::Succeeded);
    assert_eq!(
        run.steps[0].state(),
        StepState::Succeeded,
        "final run from GetRun"
    );
    assert_eq!(
        *fake.watches.lock().unwrap(),
        [0, 1],
        "second watch resumes after the snapshot's last_seq"
    );
}

#[tokio::test]
async fn errors_carry_the_status_code() {
    let (url, _fake) = serve().await;
    let client = Client::connect(url).await.unwrap();

    let err = client.get_run("nope").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no run \"nope\"");

    let err = client.cancel_run("run-1", "done").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let err = client
        .apply_workflow(WorkflowSpec::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let workflow = client
        .apply_workflow(WorkflowSpec {
            name: "room-scan".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!((workflow.name.as_str(), workflow.version), ("room-scan", 1));
    assert_eq!(client.retry_run("run-1").await.unwrap().last_seq, 4);
    assert_eq!(
        client
            .list_runs(ListRunsRequest::default())
            .await
            .unwrap()
            .runs
            .len(),
        1
    );
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable() {
    // A port that was just free: bind, note it, release it.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = Client::connect(url).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}
