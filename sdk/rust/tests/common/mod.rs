//! A fake run-executor: a real `WorkerService` on `127.0.0.1:0` whose every stream is handed
//! to the test, which plays the server's side message by message.

#![allow(dead_code)]

use std::time::Duration;

use dagmesh_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use dagmesh_proto::v1::{
    Assign, Cancel, Drain, RecordOutcome, Recorded, ServerMessage, TaskRef, TaskTypeVersion,
    Welcome, WorkerMessage, server_message, worker_message,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Long enough for a loaded 2-core CI machine; a test that hits it has hung.
pub const STEP: Duration = Duration::from_secs(10);

pub use server_message::Message as S;
pub use worker_message::Message as W;

struct Fake {
    sessions: mpsc::Sender<Session>,
}

#[tonic::async_trait]
impl WorkerService for Fake {
    type ConnectStream = ReceiverStream<Result<ServerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (out, rx) = mpsc::channel(64);
        let session = Session {
            inbound: request.into_inner(),
            out,
        };
        self.sessions
            .send(session)
            .await
            .map_err(|_| Status::unavailable("test is over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub struct FakeServer {
    pub url: String,
    sessions: mpsc::Receiver<Session>,
}

impl FakeServer {
    /// Binds before returning, so a worker may dial `url` at once.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let (tx, sessions) = mpsc::channel(8);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(Fake { sessions: tx }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self { url, sessions }
    }

    /// The next stream a worker opens.
    pub async fn session(&mut self) -> Session {
        tokio::time::timeout(STEP, self.sessions.recv())
            .await
            .expect("a worker connects")
            .expect("server running")
    }
}

/// The server's end of one stream.
pub struct Session {
    pub inbound: Streaming<WorkerMessage>,
    pub out: mpsc::Sender<Result<ServerMessage, Status>>,
}

impl Session {
    /// The next message from the worker, heartbeats skipped; `None` once it closed the stream.
    pub async fn next(&mut self) -> Option<W> {
        loop {
            let message = tokio::time::timeout(STEP, self.inbound.message())
                .await
                .expect("worker message in time")
                .expect("stream ok")?;
            match message.message.expect("message set") {
                W::Heartbeat(_) => continue,
                other => return Some(other),
            }
        }
    }

    pub async fn recv(&mut self) -> W {
        self.next().await.expect("worker stream open")
    }

    /// Next message that is not progress or logs.
    pub async fn recv_protocol(&mut self) -> W {
        loop {
            match self.recv().await {
                W::Progress(_) | W::Log(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn send(&self, message: S) {
        self.out
            .send(Ok(ServerMessage {
                message: Some(message),
            }))
            .await
            .expect("worker still listening");
    }

    pub async fn fail(&self, status: Status) {
        self.out.send(Err(status)).await.expect("stream open");
    }

    /// Reads Hello, answers Welcome; returns the Hello.
    pub async fn handshake(&mut self, max_payload_bytes: u64) -> dagmesh_proto::v1::Hello {
        let W::Hello(hello) = self.recv().await else {
            panic!("first message must be hello");
        };
        let resumed = hello.in_flight.clone();
        self.send(S::Welcome(Welcome {
            session_id: format!("session-{}", hello.instance_id),
            heartbeat_interval_ms: 1000,
            lease_ms: 10_000,
            max_payload_bytes,
            resumed,
        }))
        .await;
        hello
    }

    pub async fn assign(&self, task_id: &str, attempt: u32, task: &str, inputs: serde_json::Value) {
        self.send(S::Assign(assign(task_id, attempt, task, inputs)))
            .await;
    }

    pub async fn recorded(&self, task_id: &str, attempt: u32) {
        self.send(S::Recorded(Recorded {
            task_id: task_id.into(),
            attempt,
            outcome: RecordOutcome::Accepted.into(),
            detail: String::new(),
        }))
        .await;
    }

    pub async fn cancel(&self, task_id: &str, attempt: u32) {
        self.send(S::Cancel(Cancel {
            task_id: task_id.into(),
            attempt,
            reason: "run cancelled".into(),
        }))
        .await;
    }

    pub async fn drain(&self) {
        self.send(S::Drain(Drain {
            reason: "rollout".into(),
        }))
        .await;
    }
}

pub fn assign(task_id: &str, attempt: u32, task: &str, inputs: serde_json::Value) -> Assign {
    let (name, version) = task.split_once('@').unwrap_or((task, "1.0.0"));
    Assign {
        task_id: task_id.into(),
        attempt,
        run_id: task_id.split('/').next().unwrap_or_default().into(),
        step_id: task_id.split('/').nth(1).unwrap_or_default().into(),
        task_type: Some(TaskTypeVersion {
            name: name.into(),
            version: version.into(),
        }),
        inputs: Some(dagmesh_proto::json::to_struct(&inputs)),
        deadline: None,
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        slots: 1,
    }
}

pub fn task_ref(task_id: &str, attempt: u32) -> TaskRef {
    TaskRef {
        task_id: task_id.into(),
        attempt,
    }
}
