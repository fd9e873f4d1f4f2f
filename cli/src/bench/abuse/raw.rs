//! A worker written from `worker.proto` alone, message by message, so that it can send what no
//! SDK would: the hostile clients of [`super::hostile`] are built on it.

use std::time::Duration;

use dagmesh_proto::v1::{
    self as pb, ServerMessage, WorkerMessage, server_message, worker_message,
    worker_service_client::WorkerServiceClient,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// One worker stream. Heartbeats go out every second in the background so that the session
/// stays alive whatever the abuse does; dropping the worker ends the stream.
pub struct RawWorker {
    sender: RawSender,
    rx: tonic::Streaming<ServerMessage>,
    pub welcome: pb::Welcome,
}

/// The sending half of a [`RawWorker`], for abuses that read the replies in another task.
pub struct RawSender {
    tx: mpsc::Sender<WorkerMessage>,
    heartbeat: JoinHandle<()>,
}

impl Drop for RawSender {
    fn drop(&mut self) {
        // The heartbeat task holds a sender: without this the stream would never end.
        self.heartbeat.abort();
    }
}

impl RawSender {
    /// Sends one message; false once the stream is gone.
    pub async fn send(&self, message_: worker_message::Message) -> bool {
        self.tx.send(message(message_)).await.is_ok()
    }
}

impl RawWorker {
    /// Opens a stream and says Hello; the server's refusal (e.g. ALREADY_EXISTS) is the error.
    pub async fn connect(channel: Channel, hello: pb::Hello) -> Result<Self, tonic::Status> {
        let mut client = WorkerServiceClient::new(channel);
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(message(worker_message::Message::Hello(hello)))
            .await;
        let mut rx = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        let welcome = match tokio::time::timeout(Duration::from_secs(5), rx.message()).await {
            Err(_) => return Err(tonic::Status::deadline_exceeded("no Welcome within 5 s")),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(tonic::Status::unknown("stream closed before Welcome")),
            Ok(Ok(Some(ServerMessage {
                message: Some(server_message::Message::Welcome(welcome)),
            }))) => welcome,
            Ok(Ok(Some(other))) => {
                return Err(tonic::Status::unknown(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        };
        let beat = tx.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let heartbeat = worker_message::Message::Heartbeat(pb::Heartbeat {});
                if beat.send(message(heartbeat)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            sender: RawSender { tx, heartbeat },
            rx,
            welcome,
        })
    }

    pub fn hello(instance_id: &str, task: &str, slots: u32) -> pb::Hello {
        pb::Hello {
            worker_name: "hostile".into(),
            instance_id: instance_id.into(),
            task_types: vec![pb::TaskTypeVersion {
                name: task.into(),
                version: "1.0.0".into(),
            }],
            slots,
            sdk_language: "raw".into(),
            ..Default::default()
        }
    }

    /// Sends one message; false once the stream is gone.
    pub async fn send(&self, message_: worker_message::Message) -> bool {
        self.sender.send(message_).await
    }

    /// The next server message within `wait`: `Ok(None)` on timeout, the status when the server
    /// ended the stream with one (a clean end reads as `Status::ok`).
    pub async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<server_message::Message>, tonic::Status> {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Err(_) => Ok(None),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(tonic::Status::ok("stream ended")),
            Ok(Ok(Some(message))) => Ok(message.message),
        }
    }

    /// Waits up to `wait` for an Assign, skipping anything else.
    pub async fn assign(&mut self, wait: Duration) -> Result<Option<pb::Assign>, tonic::Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                None => return Ok(None),
                Some(server_message::Message::Assign(assign)) => return Ok(Some(assign)),
                Some(_) => {}
            }
        }
    }

    /// Waits up to `wait` for the Recorded of (task_id, attempt), skipping anything else.
    pub async fn recorded(
        &mut self,
        task_id: &str,
        attempt: u32,
        wait: Duration,
    ) -> Result<Option<pb::Recorded>, tonic::Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                None => return Ok(None),
                Some(server_message::Message::Recorded(recorded))
                    if recorded.task_id == task_id && recorded.attempt == attempt =>
                {
                    return Ok(Some(recorded));
                }
                Some(_) => {}
            }
        }
    }

    /// The sending half and the server's messages, apart.
    pub fn split(self) -> (RawSender, tonic::Streaming<ServerMessage>) {
        (self.sender, self.rx)
    }
}

fn message(message: worker_message::Message) -> WorkerMessage {
    WorkerMessage {
        message: Some(message),
    }
}
