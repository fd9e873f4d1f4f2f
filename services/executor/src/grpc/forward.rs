//! A standby executor's services. While another executor holds the lease and drives the runs, a
//! standby still answers on its port: every call of the executor's services goes, as it came
//! (metadata, messages, streams in both directions), to the address the lease holder advertises.
//! So clients and workers may connect to any replica behind one Service. The standby checked
//! the caller's credentials before forwarding; the holder checks them again, with the request.
//! When the standby takes the lease it stops forwarding and serves its own services.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dagmesh_metastore::MetadataStore;
use dagmesh_metastore::ownership::holder_address;
use dagmesh_proto::connect::ClientSettings;
use dagmesh_runtime::ServiceSet;
use futures::future::BoxFuture;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint};
use tower_service::Service;

use crate::lease::EXECUTOR_LEASE;

/// Set on a forwarded request (to the forwarding replica's address). A replica never forwards a
/// request that carries it, so two standbys that each think the other drives cannot loop.
pub const FORWARDED_BY: &str = "dagmesh-forwarded-by";

/// How long a looked-up lease holder is trusted before the lease is read again.
const HOLDER_TTL: Duration = Duration::from_secs(1);

/// How long an upstream connection is kept for a client connection that makes no new call
/// (streams already open on it go on).
const UPSTREAM_IDLE: Duration = Duration::from_secs(120);

/// The most upstream connections kept; past it the least recently used one is dropped (a flood
/// of short client connections must not leave as many upstream ones open).
const MAX_UPSTREAMS: usize = 1024;

/// How long a call waits for a lease holder to forward to while the lease is free (between a
/// driver's release or death and a standby's takeover) before it is answered UNAVAILABLE.
const HOLDER_WAIT: Duration = Duration::from_secs(10);

/// Why no channel to a holder could be had.
enum NoHolder {
    /// May change in a moment (no holder yet, the store away).
    Wait(Status),
    /// Will not change by waiting here (this replica holds the lease and takes the socket over
    /// in a moment, or the holder cannot be reached by any setting we have).
    Fail(Status),
}

/// Where the calls go: the current holder of the executor lease.
pub struct LeaseHolderRoute {
    store: Arc<dyn MetadataStore>,
    /// TLS settings for the hop (no credentials: the caller's own travel with the request).
    settings: ClientSettings,
    /// This replica's advertised address: a lease naming it means this replica is taking over.
    own_url: String,
    cached: Mutex<Option<Cached>>,
    /// One upstream connection per client connection (by the client's address), so that a
    /// client that stops reading its streams fills only its own HTTP/2 flow-control windows:
    /// over one shared connection it would stall every forwarded call, workers' included.
    upstreams: Mutex<HashMap<(String, Option<SocketAddr>), Upstream>>,
}

struct Cached {
    url: String,
    endpoint: Endpoint,
    read: Instant,
}

struct Upstream {
    channel: Channel,
    used: Instant,
}

impl LeaseHolderRoute {
    pub fn new(store: Arc<dyn MetadataStore>, settings: ClientSettings, own_url: String) -> Self {
        Self {
            store,
            settings: ClientSettings {
                token: None,
                token_file: None,
                ..settings
            },
            own_url,
            cached: Mutex::new(None),
            upstreams: Mutex::new(HashMap::new()),
        }
    }

    /// The executor services of this crate, each forwarding to the lease holder. Health says
    /// SERVING only while there is another executor to forward to (checked every half second),
    /// so a replica that is about to take the lease itself is not reported ready early.
    pub fn services(self) -> ServiceSet {
        let route = Arc::new(self);
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let probe = route.clone();
        tokio::spawn(async move {
            while !ready_tx.is_closed() {
                probe.forget_idle_upstreams();
                let forwardable = probe.look_up().await.is_ok();
                ready_tx
                    .send_if_modified(|ready| std::mem::replace(ready, forwardable) != forwardable);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        ServiceSet::new()
            .ready_when(ready)
            .with(Forward::<RUN>(route.clone()))
            .with(Forward::<WORKFLOW>(route.clone()))
            .with(Forward::<WORKER>(route.clone()))
            .with(Forward::<CLUSTER>(route.clone()))
            .with(Forward::<SCALER>(route.clone()))
            .with(Forward::<WEBHOOK>(route.clone()))
            .with(Forward::<TOKEN>(route))
    }

    fn cached(&self) -> Option<(String, Endpoint)> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| c.read.elapsed() < HOLDER_TTL)
            .map(|c| (c.url.clone(), c.endpoint.clone()))
    }

    /// The upstream connection of `client` (its address) to the holder at `url`.
    fn upstream(&self, url: &str, endpoint: &Endpoint, client: Option<SocketAddr>) -> Channel {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        let key = (url.to_owned(), client);
        if upstreams.len() >= MAX_UPSTREAMS && !upstreams.contains_key(&key) {
            let oldest = upstreams
                .iter()
                .min_by_key(|(_, upstream)| upstream.used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                upstreams.remove(&oldest);
            }
        }
        let upstream = upstreams.entry(key).or_insert_with(|| Upstream {
            channel: endpoint.connect_lazy(),
            used: Instant::now(),
        });
        upstream.used = Instant::now();
        upstream.channel.clone()
    }

    /// Drops idle upstream connections now and then, for as long as the route is in use (the
    /// standby's `services` do it with their readiness probe).
    pub(crate) fn forget_idle_upstreams_while_used(self: &Arc<Self>) {
        let route = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(UPSTREAM_IDLE / 4).await;
                match route.upgrade() {
                    Some(route) => route.forget_idle_upstreams(),
                    None => return,
                }
            }
        });
    }

    fn forget_idle_upstreams(&self) {
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        upstreams.retain(|_, upstream| upstream.used.elapsed() < UPSTREAM_IDLE);
    }

    fn forget(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The holder's address and its endpoint, waiting up to [`HOLDER_WAIT`] while there is
    /// none yet (a takeover in progress).
    async fn holder(&self) -> Result<(String, Endpoint), Status> {
        let deadline = tokio::time::Instant::now() + HOLDER_WAIT;
        loop {
            match self.look_up().await {
                Ok(found) => return Ok(found),
                Err(NoHolder::Wait(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(NoHolder::Wait(status) | NoHolder::Fail(status)) => return Err(status),
            }
        }
    }

    async fn look_up(&self) -> Result<(String, Endpoint), NoHolder> {
        if let Some(found) = self.cached() {
            return Ok(found);
        }
        let leases = self
            .store
            .list_live_leases(EXECUTOR_LEASE)
            .await
            .map_err(|error| {
                NoHolder::Wait(Status::unavailable(format!(
                    "this executor is a standby and cannot read which executor drives the runs: \
                     {error}; retry"
                )))
            })?;
        let lease = leases
            .iter()
            .find(|lease| lease.name == EXECUTOR_LEASE)
            .ok_or_else(|| {
                NoHolder::Wait(Status::unavailable(
                    "no executor drives the runs right now (the executor lease is free; a \
                     standby takes it within seconds); retry",
                ))
            })?;
        let url = holder_address(&lease.holder).ok_or_else(|| {
            NoHolder::Fail(Status::unavailable(format!(
                "the executor that drives the runs ({}) advertises no address \
                 (--advertise-url), so this standby cannot forward to it; connect to it directly",
                lease.holder
            )))
        })?;
        if url == self.own_url {
            // This replica holds the lease: its own services take over the socket in a moment.
            return Err(NoHolder::Fail(Status::unavailable(
                "this executor is taking over the runs right now; retry",
            )));
        }
        let endpoint = self.settings.endpoint(url).map_err(|error| {
            NoHolder::Fail(Status::unavailable(format!(
                "cannot forward to the executor that drives the runs ({url}): {error}"
            )))
        })?;
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            url: url.to_owned(),
            endpoint: endpoint.clone(),
            read: Instant::now(),
        });
        Ok((url.to_owned(), endpoint))
    }

    async fn forward(&self, mut request: http::Request<Body>) -> http::Response<Body> {
        if let Some(by) = request.headers().get(FORWARDED_BY) {
            let by = String::from_utf8_lossy(by.as_bytes()).into_owned();
            return Status::unavailable(format!(
                "this executor is a standby, and the call was already forwarded once (by {by}); \
                 the replicas disagree on who drives the runs; retry"
            ))
            .into_http();
        }
        let (url, endpoint) = match self.holder().await {
            Ok(found) => found,
            Err(status) => return status.into_http(),
        };
        let mut channel = self.upstream(&url, &endpoint, client_address(&request));
        if let Ok(value) = http::HeaderValue::from_str(&self.own_url) {
            request.headers_mut().insert(FORWARDED_BY, value);
        }
        // Only the path stays: the channel sets the holder's scheme and authority.
        if let Some(path) = request.uri().path_and_query().cloned() {
            *request.uri_mut() = http::Uri::from(path);
        }
        let sent = async {
            futures::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
            channel.call(request).await
        };
        match sent.await {
            Ok(response) => response.map(|body| {
                Body::new(UpstreamBody {
                    inner: body,
                    holder: url,
                    ended: false,
                })
            }),
            Err(error) => {
                self.forget();
                self.upstreams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(holder, _), _| *holder != url);
                Status::unavailable(format!(
                    "this executor is a standby and the executor that drives the runs ({url}) \
                     cannot be reached: {}; retry",
                    dagmesh_proto::connect::error_chain(&error)
                ))
                .into_http()
            }
        }
    }
}

/// A response body from the lease holder. If the holder goes away in the middle of the
/// response (killed, or its connection reset), the call ends here with an UNAVAILABLE status in
/// the trailers, which every gRPC client reads as "retry", instead of a reset stream that
/// clients read as INTERNAL.
struct UpstreamBody {
    inner: Body,
    holder: String,
    ended: bool,
}

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(error))) => {
                self.ended = true;
                let status = Status::unavailable(format!(
                    "the executor that drives the runs ({}) went away during the call: {}; retry",
                    self.holder,
                    error.message()
                ));
                let mut trailers = http::HeaderMap::new();
                match status.add_header(&mut trailers) {
                    Ok(()) => Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers)))),
                    Err(status) => Poll::Ready(Some(Err(status))),
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The client's address, from the connection info tonic attaches (plain TCP or TLS).
fn client_address(request: &http::Request<Body>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

// One type per service name (tonic routes by `NamedService::NAME`).
const RUN: u8 = 0;
const WORKFLOW: u8 = 1;
const WORKER: u8 = 2;
const CLUSTER: u8 = 3;
const SCALER: u8 = 4;
const WEBHOOK: u8 = 5;
const TOKEN: u8 = 6;

/// Forwards every call of one service.
#[derive(Clone)]
struct Forward<const SERVICE: u8>(Arc<LeaseHolderRoute>);

impl<const SERVICE: u8> NamedService for Forward<SERVICE> {
    const NAME: &'static str = match SERVICE {
        RUN => dagmesh_proto::v1::run_service_server::SERVICE_NAME,
        WORKFLOW => dagmesh_proto::v1::workflow_service_server::SERVICE_NAME,
        WORKER => dagmesh_proto::v1::worker_service_server::SERVICE_NAME,
        CLUSTER => dagmesh_proto::v1::cluster_service_server::SERVICE_NAME,
        SCALER => dagmesh_proto::externalscaler::external_scaler_server::SERVICE_NAME,
        WEBHOOK => dagmesh_proto::v1::webhook_service_server::SERVICE_NAME,
        _ => dagmesh_proto::v1::token_service_server::SERVICE_NAME,
    };
}

impl<const SERVICE: u8> Service<http::Request<Body>> for Forward<SERVICE> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let route = self.0.clone();
        Box::pin(async move { Ok(route.forward(request).await) })
    }
}

/// On a replica that shares the partitions (`--share-partitions`): serves `local` while this
/// replica dispatches to workers, and forwards the calls to the replica that does (the
/// executor lease's holder) otherwise. For the services that are about workers and their
/// queues: worker streams, ListWorkers and ListQueues, and KEDA's scaler.
#[derive(Clone)]
pub(crate) struct WhileDispatching<S> {
    local: S,
    route: Arc<LeaseHolderRoute>,
    executor: crate::Executor,
}

impl<S> WhileDispatching<S> {
    pub fn new(local: S, route: Arc<LeaseHolderRoute>, executor: crate::Executor) -> Self {
        Self {
            local,
            route,
            executor,
        }
    }
}

impl<S: NamedService> NamedService for WhileDispatching<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for WhileDispatching<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if self.executor.is_dispatcher() {
            let mut local = self.local.clone();
            Box::pin(async move {
                futures::future::poll_fn(|cx| local.poll_ready(cx)).await?;
                local.call(request).await
            })
        } else {
            let route = self.route.clone();
            Box::pin(async move { Ok(route.forward(request).await) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One data frame, then the connection to the holder breaks.
    struct BreaksAfterOneFrame(bool);

    impl http_body::Body for BreaksAfterOneFrame {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Ready(Some(Err(Status::internal(
                    "h2 protocol error: connection reset",
                ))))
            } else {
                Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                    b"part",
                )))))
            }
        }
    }

    /// A holder that dies mid-response ends the forwarded call with UNAVAILABLE in the
    /// trailers (clients retry), after what it had already sent.
    #[tokio::test]
    async fn a_holder_gone_mid_response_ends_the_call_unavailable() {
        use http_body::Body as _;
        let mut body = UpstreamBody {
            inner: Body::new(BreaksAfterOneFrame(false)),
            holder: "http://10.0.0.1:7070".into(),
            ended: false,
        };
        let mut next = || {
            futures::executor::block_on(futures::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut body).poll_frame(cx)
            }))
        };
        let first = next().unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part");
        let trailers = next().unwrap().unwrap().into_trailers().unwrap();
        let status = Status::from_header_map(&trailers).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("http://10.0.0.1:7070"),
            "{status:?}"
        );
        assert!(next().is_none());
    }

    /// Short client connections cannot pile up upstream ones: past the cap the least recently
    /// used goes, and one client connection keeps one upstream connection.
    #[tokio::test]
    async fn upstream_connections_are_one_per_client_and_capped() {
        let store = dagmesh_metastore::connect("sqlite::memory:").await.unwrap();
        let route = LeaseHolderRoute::new(
            store,
            ClientSettings::default(),
            "http://127.0.0.1:7070".into(),
        );
        let endpoint = Endpoint::from_static("http://127.0.0.1:7071");
        let client = |port: u16| Some(SocketAddr::from(([127, 0, 0, 1], port)));
        route.upstream("http://127.0.0.1:7071", &endpoint, client(0));
        tokio::time::sleep(Duration::from_millis(2)).await; // strictly the oldest
        for port in 1..=MAX_UPSTREAMS as u16 {
            route.upstream("http://127.0.0.1:7071", &endpoint, client(port));
        }
        let upstreams = route.upstreams.lock().unwrap();
        assert_eq!(upstreams.len(), MAX_UPSTREAMS);
        assert!(!upstreams.contains_key(&("http://127.0.0.1:7071".to_owned(), client(0))));
        assert!(upstreams.contains_key(&(
            "http://127.0.0.1:7071".to_owned(),
            client(MAX_UPSTREAMS as u16)
        )));
        drop(upstreams);
        route.upstream("http://127.0.0.1:7071", &endpoint, client(5));
        assert_eq!(route.upstreams.lock().unwrap().len(), MAX_UPSTREAMS);
    }
}
