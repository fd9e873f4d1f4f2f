//! The store over gRPC: [`MetadataGrpcServer`] serves any [`MetadataStore`] as the
//! `dagmesh.v1.MetadataService`, and [`MetadataGrpcClient`] is a [`MetadataStore`] that calls
//! one. Both are thin: each RPC is the trait method of the same name, errors map onto status
//! codes.

use std::sync::Arc;
use std::time::Duration;

use dagmesh_proto::connect::{AuthChannel, ClientSettings, Credentials};
use dagmesh_proto::v1::metadata_service_client::MetadataServiceClient;
use dagmesh_proto::v1::metadata_service_server::{MetadataService, MetadataServiceServer};
use dagmesh_proto::v1::{
    AcquireLeaseRequest, ActiveRuns, CacheEntry, ClaimLeasesRequest, ClaimLeasesResponse, Cluster,
    CommitFencedRequest, DeleteExpiredLeasesRequest, DeleteExpiredLeasesResponse,
    InitClusterRequest, ListLiveLeasesRequest, ListLiveLeasesResponse, QuarantineRunRequest,
    ReadCacheEntryRequest, ReadCacheEntryResponse, ReleaseLeaseRequest, ReleaseLeaseResponse,
    RenewLeaseRequest,
};
use dagmesh_proto::v1::{
    AdvanceScheduleRequest, AdvanceScheduleResponse, Backfill, DeleteScheduleResponse,
    DeleteTriggerRequest, DeleteTriggerResponse, GetBackfillRequest, ListBackfillsRequest,
    ListBackfillsResponse, ListSchedulesRequest, ListSchedulesResponse, ListTriggersRequest,
    ListTriggersResponse, ReadScheduleRequest, Schedule, SetSchedulePausedRequest, Trigger,
};
use dagmesh_proto::v1::{
    CommitRequest, CommitResponse, FindRunByIdempotencyKeyRequest, FindRunByIdempotencyKeyResponse,
    ListRunsRequest, ListRunsResponse, Mutation, PutWorkflowRequest, PutWorkflowResponse,
    ReadActiveRunsRequest, ReadActiveRunsResponse, ReadEventsRequest, ReadEventsResponse,
    ReadRunRequest, ReadWorkflowRequest, ReadWorkflowsRequest, ReadWorkflowsResponse, Run,
    RunEvent, Workflow, WorkflowSpec,
};
use dagmesh_proto::v1::{
    ReadTokenRequest, ReadTokensRequest, ReadTokensResponse, RevokeTokenRequest, StoredToken,
};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::store::{ClaimedLeases, Lease};
use crate::{MetadataStore, StoreError};

/// Largest gRPC message either side accepts or sends. Commit batches and recovery reads
/// (`ReadActiveRuns`) carry whole runs with their payloads, far beyond tonic's 4 MiB default.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// How long the client waits for a TCP connection to the metastore.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `MetadataService` backed by a [`MetadataStore`].
#[derive(Clone)]
pub struct MetadataGrpcServer {
    store: Arc<dyn MetadataStore>,
}

impl MetadataGrpcServer {
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        MetadataGrpcServer { store }
    }

    /// The tonic service, ready for `Server::builder().add_service(...)`.
    pub fn into_service(self) -> MetadataServiceServer<Self> {
        MetadataServiceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }
}

/// A lease for the wire.
fn lease_to_proto(lease: Lease) -> dagmesh_proto::v1::Lease {
    dagmesh_proto::v1::Lease {
        name: lease.name,
        holder: lease.holder,
        epoch: lease.epoch,
        expires_at: Some(lease.expires_at.into()),
    }
}

/// A lease from the wire; `field` names it in the error.
fn lease_from_proto(
    lease: Option<dagmesh_proto::v1::Lease>,
    field: &str,
) -> Result<Lease, StoreError> {
    let lease = lease.ok_or_else(|| StoreError::InvalidArgument(format!("{field}: required")))?;
    let expires_at = match lease.expires_at {
        Some(ts) => std::time::SystemTime::try_from(ts)
            .map_err(|err| StoreError::InvalidArgument(format!("{field}.expires_at: {err}")))?,
        // Only name, holder and epoch are checked; the expiry is informative.
        None => std::time::SystemTime::UNIX_EPOCH,
    };
    Ok(Lease {
        name: lease.name,
        holder: lease.holder,
        epoch: lease.epoch,
        expires_at,
    })
}

/// A TTL from the wire.
fn ttl_from_proto(ttl: Option<prost_types::Duration>) -> Result<Duration, StoreError> {
    duration_from_proto("ttl", ttl)
}

/// A non-negative duration from the wire, named `field` in the error.
fn duration_from_proto(
    field: &str,
    duration: Option<prost_types::Duration>,
) -> Result<Duration, StoreError> {
    let duration =
        duration.ok_or_else(|| StoreError::InvalidArgument(format!("{field}: required")))?;
    Duration::try_from(duration)
        .map_err(|err| StoreError::InvalidArgument(format!("{field}: {err}")))
}

/// A TTL for the wire (the store checks its range).
fn ttl_to_proto(ttl: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(ttl).unwrap_or(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    })
}

/// proto `version` 0 means "the latest".
fn version_from_proto(version: u32) -> Option<u32> {
    (version != 0).then_some(version)
}

#[tonic::async_trait]
impl MetadataService for MetadataGrpcServer {
    async fn put_workflow(
        &self,
        request: Request<PutWorkflowRequest>,
    ) -> Result<Response<PutWorkflowResponse>, Status> {
        let req = request.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: required"))?;
        let (workflow, created) = self.store.put_workflow(spec, req.content_hash).await?;
        Ok(Response::new(PutWorkflowResponse {
            workflow: Some(workflow),
            created,
        }))
    }

    async fn get_workflow(
        &self,
        request: Request<ReadWorkflowRequest>,
    ) -> Result<Response<Workflow>, Status> {
        let req = request.into_inner();
        let workflow = self
            .store
            .get_workflow(&req.name, version_from_proto(req.version))
            .await?;
        Ok(Response::new(workflow))
    }

    async fn list_workflows(
        &self,
        _request: Request<ReadWorkflowsRequest>,
    ) -> Result<Response<ReadWorkflowsResponse>, Status> {
        let workflows = self.store.list_workflows().await?;
        Ok(Response::new(ReadWorkflowsResponse { workflows }))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        self.store.commit(request.into_inner().mutations).await?;
        Ok(Response::new(CommitResponse {}))
    }

    async fn get_run(&self, request: Request<ReadRunRequest>) -> Result<Response<Run>, Status> {
        let run = self.store.get_run(&request.into_inner().run_id).await?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let page = self.store.list_runs(&request.into_inner()).await?;
        Ok(Response::new(page))
    }

    async fn find_run_by_idempotency_key(
        &self,
        request: Request<FindRunByIdempotencyKeyRequest>,
    ) -> Result<Response<FindRunByIdempotencyKeyResponse>, Status> {
        let key = request.into_inner().idempotency_key;
        let run_id = self.store.find_run_by_idempotency_key(&key).await?;
        Ok(Response::new(FindRunByIdempotencyKeyResponse {
            run_id: run_id.unwrap_or_default(),
        }))
    }

    async fn read_events(
        &self,
        request: Request<ReadEventsRequest>,
    ) -> Result<Response<ReadEventsResponse>, Status> {
        let req = request.into_inner();
        let events = self
            .store
            .read_events(&req.run_id, req.after_seq, req.limit)
            .await?;
        Ok(Response::new(ReadEventsResponse { events }))
    }

    async fn read_active_runs(
        &self,
        request: Request<ReadActiveRunsRequest>,
    ) -> Result<Response<ReadActiveRunsResponse>, Status> {
        if !request.get_ref().partitions.is_empty() {
            return Err(StoreError::InvalidArgument(
                "partitions: ReadActiveRuns reads every partition; filter with \
                 ReadActiveRunsChecked"
                    .into(),
            )
            .into());
        }
        let runs = self.store.read_active_runs().await?;
        Ok(Response::new(ReadActiveRunsResponse { runs }))
    }

    async fn read_active_runs_checked(
        &self,
        request: Request<ReadActiveRunsRequest>,
    ) -> Result<Response<ActiveRuns>, Status> {
        let req = request.into_inner();
        let partitions = match (req.every_partition, req.partitions.is_empty()) {
            (true, true) => None,
            (false, _) => Some(req.partitions.as_slice()),
            (true, false) => {
                return Err(StoreError::InvalidArgument(
                    "partitions: must be empty with every_partition".into(),
                )
                .into());
            }
        };
        Ok(Response::new(
            self.store.read_active_runs_checked(partitions).await?,
        ))
    }

    async fn init_cluster(
        &self,
        request: Request<InitClusterRequest>,
    ) -> Result<Response<Cluster>, Status> {
        let partitions = self
            .store
            .init_cluster(request.into_inner().partitions)
            .await?;
        Ok(Response::new(Cluster { partitions }))
    }

    async fn quarantine_run(
        &self,
        request: Request<QuarantineRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let req = request.into_inner();
        let run = self.store.quarantine_run(&req.run_id, &req.reason).await?;
        Ok(Response::new(run))
    }

    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<dagmesh_proto::v1::Lease>, Status> {
        let req = request.into_inner();
        let ttl = ttl_from_proto(req.ttl)?;
        let lease = self
            .store
            .acquire_lease(&req.name, &req.holder, ttl)
            .await?;
        Ok(Response::new(lease_to_proto(lease)))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<dagmesh_proto::v1::Lease>, Status> {
        let req = request.into_inner();
        let lease = lease_from_proto(req.lease, "lease")?;
        let ttl = ttl_from_proto(req.ttl)?;
        let lease = self.store.renew_lease(&lease, ttl).await?;
        Ok(Response::new(lease_to_proto(lease)))
    }

    async fn claim_leases(
        &self,
        request: Request<ClaimLeasesRequest>,
    ) -> Result<Response<ClaimLeasesResponse>, Status> {
        let req = request.into_inner();
        let ttl = ttl_from_proto(req.ttl)?;
        let keep = req
            .keep
            .into_iter()
            .enumerate()
            .map(|(index, lease)| lease_from_proto(Some(lease), &format!("keep[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let claimed = self
            .store
            .claim_leases(&req.holder, ttl, &keep, &req.take)
            .await?;
        Ok(Response::new(ClaimLeasesResponse {
            kept: claimed.kept.into_iter().map(lease_to_proto).collect(),
            lost: claimed.lost,
            taken: claimed.taken.into_iter().map(lease_to_proto).collect(),
        }))
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let lease = lease_from_proto(request.into_inner().lease, "lease")?;
        self.store.release_lease(&lease).await?;
        Ok(Response::new(ReleaseLeaseResponse {}))
    }

    async fn list_live_leases(
        &self,
        request: Request<ListLiveLeasesRequest>,
    ) -> Result<Response<ListLiveLeasesResponse>, Status> {
        let prefix = request.into_inner().prefix;
        let leases = self.store.list_live_leases(&prefix).await?;
        Ok(Response::new(ListLiveLeasesResponse {
            leases: leases.into_iter().map(lease_to_proto).collect(),
        }))
    }

    async fn delete_expired_leases(
        &self,
        request: Request<DeleteExpiredLeasesRequest>,
    ) -> Result<Response<DeleteExpiredLeasesResponse>, Status> {
        let req = request.into_inner();
        let expired_for = duration_from_proto("expired_for", req.expired_for)?;
        let deleted = self
            .store
            .delete_expired_leases(&req.prefix, expired_for)
            .await?;
        Ok(Response::new(DeleteExpiredLeasesResponse { deleted }))
    }

    async fn commit_fenced(
        &self,
        request: Request<CommitFencedRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let req = request.into_inner();
        let fences = req
            .fences
            .into_iter()
            .enumerate()
            .map(|(index, fence)| lease_from_proto(Some(fence), &format!("fences[{index}]")))
            .collect::<Result<Vec<_>, _>>()?;
        self.store.commit_fenced(&fences, req.mutations).await?;
        Ok(Response::new(CommitResponse {}))
    }

    async fn create_schedule(
        &self,
        request: Request<Schedule>,
    ) -> Result<Response<Schedule>, Status> {
        let schedule = self.store.create_schedule(request.into_inner()).await?;
        Ok(Response::new(schedule))
    }

    async fn get_schedule(
        &self,
        request: Request<ReadScheduleRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let schedule = self
            .store
            .get_schedule(&request.into_inner().schedule)
            .await?;
        Ok(Response::new(schedule))
    }

    async fn list_schedules(
        &self,
        _request: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let schedules = self.store.list_schedules().await?;
        Ok(Response::new(ListSchedulesResponse { schedules }))
    }

    async fn delete_schedule(
        &self,
        request: Request<ReadScheduleRequest>,
    ) -> Result<Response<DeleteScheduleResponse>, Status> {
        self.store
            .delete_schedule(&request.into_inner().schedule)
            .await?;
        Ok(Response::new(DeleteScheduleResponse {}))
    }

    async fn set_schedule_paused(
        &self,
        request: Request<SetSchedulePausedRequest>,
    ) -> Result<Response<Schedule>, Status> {
        let req = request.into_inner();
        let schedule = self
            .store
            .set_schedule_paused(&req.schedule, req.paused)
            .await?;
        Ok(Response::new(schedule))
    }

    async fn advance_schedule(
        &self,
        request: Request<AdvanceScheduleRequest>,
    ) -> Result<Response<AdvanceScheduleResponse>, Status> {
        let req = request.into_inner();
        let to = req
            .to
            .ok_or_else(|| Status::invalid_argument("to: required"))?;
        let advanced = self
            .store
            .advance_schedule(&req.id, req.expected, to)
            .await?;
        Ok(Response::new(AdvanceScheduleResponse { advanced }))
    }

    async fn create_trigger(&self, request: Request<Trigger>) -> Result<Response<Trigger>, Status> {
        let trigger = self.store.create_trigger(request.into_inner()).await?;
        Ok(Response::new(trigger))
    }

    async fn list_triggers(
        &self,
        request: Request<ListTriggersRequest>,
    ) -> Result<Response<ListTriggersResponse>, Status> {
        let triggers = self
            .store
            .list_triggers(&request.into_inner().topic)
            .await?;
        Ok(Response::new(ListTriggersResponse { triggers }))
    }

    async fn delete_trigger(
        &self,
        request: Request<DeleteTriggerRequest>,
    ) -> Result<Response<DeleteTriggerResponse>, Status> {
        self.store
            .delete_trigger(&request.into_inner().trigger)
            .await?;
        Ok(Response::new(DeleteTriggerResponse {}))
    }

    async fn put_backfill(&self, request: Request<Backfill>) -> Result<Response<Backfill>, Status> {
        let stored = self.store.put_backfill(request.into_inner()).await?;
        Ok(Response::new(stored))
    }

    async fn get_backfill(
        &self,
        request: Request<GetBackfillRequest>,
    ) -> Result<Response<Backfill>, Status> {
        let backfill = self.store.get_backfill(&request.into_inner().id).await?;
        Ok(Response::new(backfill))
    }

    async fn list_backfills(
        &self,
        _request: Request<ListBackfillsRequest>,
    ) -> Result<Response<ListBackfillsResponse>, Status> {
        let backfills = self.store.list_backfills().await?;
        Ok(Response::new(ListBackfillsResponse { backfills }))
    }

    async fn put_token(
        &self,
        request: Request<StoredToken>,
    ) -> Result<Response<StoredToken>, Status> {
        let token = request.into_inner();
        self.store.put_token(token.clone()).await?;
        Ok(Response::new(token))
    }

    async fn read_webhook_deliveries(
        &self,
        request: Request<dagmesh_proto::v1::ReadWebhookDeliveriesRequest>,
    ) -> Result<Response<dagmesh_proto::v1::ReadWebhookDeliveriesResponse>, Status> {
        let deliveries = self
            .store
            .read_webhook_deliveries(request.get_ref())
            .await?;
        Ok(Response::new(
            dagmesh_proto::v1::ReadWebhookDeliveriesResponse { deliveries },
        ))
    }

    async fn read_cache_entry(
        &self,
        request: Request<ReadCacheEntryRequest>,
    ) -> Result<Response<ReadCacheEntryResponse>, Status> {
        let entry = self
            .store
            .read_cache_entry(&request.into_inner().key)
            .await?;
        Ok(Response::new(ReadCacheEntryResponse { entry }))
    }

    async fn get_token(
        &self,
        request: Request<ReadTokenRequest>,
    ) -> Result<Response<StoredToken>, Status> {
        let token = self.store.get_token(&request.into_inner().token).await?;
        Ok(Response::new(token))
    }

    async fn list_tokens(
        &self,
        _request: Request<ReadTokensRequest>,
    ) -> Result<Response<ReadTokensResponse>, Status> {
        let tokens = self.store.list_tokens().await?;
        Ok(Response::new(ReadTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<StoredToken>, Status> {
        let token = self.store.revoke_token(&request.into_inner().token).await?;
        Ok(Response::new(token))
    }
}

/// A [`MetadataStore`] that is a remote metastore. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct MetadataGrpcClient {
    client: MetadataServiceClient<AuthChannel>,
}

impl MetadataGrpcClient {
    /// A client for the metastore at `url` (e.g. `https://metastore:7071`), with the TLS
    /// settings and the (internal) token of `settings`. The connection is made on first use
    /// and re-made after failures, so the metastore may start later; until it is reachable,
    /// calls fail with [`StoreError::Unavailable`]. Only invalid settings fail here.
    pub fn connect_lazy(url: &str, settings: &ClientSettings) -> Result<Self, StoreError> {
        let channel = settings
            .connect_lazy(url, |endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT))
            .map_err(|err| StoreError::InvalidArgument(format!("metastore {url}: {err}")))?;
        Ok(Self::from_auth_channel(channel))
    }

    /// [`MetadataGrpcClient::connect_lazy`], for callers written against an async connect.
    pub async fn connect(url: &str, settings: &ClientSettings) -> Result<Self, StoreError> {
        Self::connect_lazy(url, settings)
    }

    /// A client over an existing channel without credentials (tests, custom load balancing).
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_auth_channel(Credentials::none().wrap(channel))
    }

    pub fn from_auth_channel(channel: AuthChannel) -> Self {
        let client = MetadataServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE);
        MetadataGrpcClient { client }
    }

    /// The generated client takes `&mut self`; a clone per call shares the channel.
    fn client(&self) -> MetadataServiceClient<AuthChannel> {
        self.client.clone()
    }
}

#[async_trait::async_trait]
impl MetadataStore for MetadataGrpcClient {
    async fn put_workflow(
        &self,
        spec: WorkflowSpec,
        content_hash: String,
    ) -> Result<(Workflow, bool), StoreError> {
        let resp = self
            .client()
            .put_workflow(PutWorkflowRequest {
                spec: Some(spec),
                content_hash,
            })
            .await?
            .into_inner();
        let workflow = resp.workflow.ok_or_else(|| {
            StoreError::Internal("metastore answered PutWorkflow without a workflow".to_owned())
        })?;
        Ok((workflow, resp.created))
    }

    async fn get_workflow(&self, name: &str, version: Option<u32>) -> Result<Workflow, StoreError> {
        let req = ReadWorkflowRequest {
            name: name.to_owned(),
            version: version.unwrap_or(0),
        };
        Ok(self.client().get_workflow(req).await?.into_inner())
    }

    async fn list_workflows(&self) -> Result<Vec<Workflow>, StoreError> {
        let resp = self
            .client()
            .list_workflows(ReadWorkflowsRequest {})
            .await?;
        Ok(resp.into_inner().workflows)
    }

    async fn commit(&self, mutations: Vec<Mutation>) -> Result<(), StoreError> {
        self.client().commit(CommitRequest { mutations }).await?;
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Run, StoreError> {
        let req = ReadRunRequest {
            run_id: run_id.to_owned(),
        };
        Ok(self.client().get_run(req).await?.into_inner())
    }

    async fn list_runs(&self, req: &ListRunsRequest) -> Result<ListRunsResponse, StoreError> {
        Ok(self.client().list_runs(req.clone()).await?.into_inner())
    }

    async fn find_run_by_idempotency_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        let req = FindRunByIdempotencyKeyRequest {
            idempotency_key: key.to_owned(),
        };
        let run_id = self
            .client()
            .find_run_by_idempotency_key(req)
            .await?
            .into_inner()
            .run_id;
        Ok((!run_id.is_empty()).then_some(run_id))
    }

    async fn read_events(
        &self,
        run_id: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<RunEvent>, StoreError> {
        let req = ReadEventsRequest {
            run_id: run_id.to_owned(),
            after_seq,
            limit,
        };
        Ok(self.client().read_events(req).await?.into_inner().events)
    }

    async fn read_active_runs(&self) -> Result<Vec<Run>, StoreError> {
        let resp = self
            .client()
            .read_active_runs(ReadActiveRunsRequest::default())
            .await?;
        Ok(resp.into_inner().runs)
    }

    async fn read_active_runs_checked(
        &self,
        partitions: Option<&[u32]>,
    ) -> Result<ActiveRuns, StoreError> {
        let req = ReadActiveRunsRequest {
            every_partition: partitions.is_none(),
            partitions: partitions.map(<[u32]>::to_vec).unwrap_or_default(),
        };
        Ok(self
            .client()
            .read_active_runs_checked(req)
            .await?
            .into_inner())
    }

    async fn init_cluster(&self, partitions: u32) -> Result<u32, StoreError> {
        let req = InitClusterRequest { partitions };
        Ok(self
            .client()
            .init_cluster(req)
            .await?
            .into_inner()
            .partitions)
    }

    async fn quarantine_run(&self, run_id: &str, reason: &str) -> Result<Run, StoreError> {
        let req = QuarantineRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        };
        Ok(self.client().quarantine_run(req).await?.into_inner())
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Lease, StoreError> {
        let req = AcquireLeaseRequest {
            name: name.to_owned(),
            holder: holder.to_owned(),
            ttl: Some(ttl_to_proto(ttl)),
        };
        let lease = self.client().acquire_lease(req).await?.into_inner();
        lease_from_proto(Some(lease), "AcquireLease response")
    }

    async fn renew_lease(&self, lease: &Lease, ttl: Duration) -> Result<Lease, StoreError> {
        let req = RenewLeaseRequest {
            lease: Some(lease_to_proto(lease.clone())),
            ttl: Some(ttl_to_proto(ttl)),
        };
        let lease = self.client().renew_lease(req).await?.into_inner();
        lease_from_proto(Some(lease), "RenewLease response")
    }

    async fn claim_leases(
        &self,
        holder: &str,
        ttl: Duration,
        keep: &[Lease],
        take: &[String],
    ) -> Result<ClaimedLeases, StoreError> {
        let req = ClaimLeasesRequest {
            holder: holder.to_owned(),
            ttl: Some(ttl_to_proto(ttl)),
            keep: keep.iter().cloned().map(lease_to_proto).collect(),
            take: take.to_vec(),
        };
        let resp = self.client().claim_leases(req).await?.into_inner();
        let leases = |leases: Vec<dagmesh_proto::v1::Lease>| {
            leases
                .into_iter()
                .map(|lease| lease_from_proto(Some(lease), "ClaimLeases response"))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(ClaimedLeases {
            kept: leases(resp.kept)?,
            lost: resp.lost,
            taken: leases(resp.taken)?,
        })
    }

    async fn release_lease(&self, lease: &Lease) -> Result<(), StoreError> {
        let req = ReleaseLeaseRequest {
            lease: Some(lease_to_proto(lease.clone())),
        };
        self.client().release_lease(req).await?;
        Ok(())
    }

    async fn list_live_leases(&self, prefix: &str) -> Result<Vec<Lease>, StoreError> {
        let req = ListLiveLeasesRequest {
            prefix: prefix.to_owned(),
        };
        let resp = self.client().list_live_leases(req).await?.into_inner();
        resp.leases
            .into_iter()
            .map(|lease| lease_from_proto(Some(lease), "ListLiveLeases response"))
            .collect()
    }

    async fn delete_expired_leases(
        &self,
        prefix: &str,
        expired_for: Duration,
    ) -> Result<u64, StoreError> {
        let req = DeleteExpiredLeasesRequest {
            prefix: prefix.to_owned(),
            expired_for: Some(ttl_to_proto(expired_for)),
        };
        let resp = self.client().delete_expired_leases(req).await?.into_inner();
        Ok(resp.deleted)
    }

    async fn commit_fenced(
        &self,
        fences: &[Lease],
        mutations: Vec<Mutation>,
    ) -> Result<(), StoreError> {
        let req = CommitFencedRequest {
            fences: fences.iter().cloned().map(lease_to_proto).collect(),
            mutations,
        };
        self.client().commit_fenced(req).await?;
        Ok(())
    }

    async fn create_schedule(&self, schedule: Schedule) -> Result<Schedule, StoreError> {
        Ok(self.client().create_schedule(schedule).await?.into_inner())
    }

    async fn get_schedule(&self, id_or_name: &str) -> Result<Schedule, StoreError> {
        let req = ReadScheduleRequest {
            schedule: id_or_name.to_owned(),
        };
        Ok(self.client().get_schedule(req).await?.into_inner())
    }

    async fn list_schedules(&self) -> Result<Vec<Schedule>, StoreError> {
        let resp = self
            .client()
            .list_schedules(ListSchedulesRequest {})
            .await?;
        Ok(resp.into_inner().schedules)
    }

    async fn delete_schedule(&self, id_or_name: &str) -> Result<(), StoreError> {
        let req = ReadScheduleRequest {
            schedule: id_or_name.to_owned(),
        };
        self.client().delete_schedule(req).await?;
        Ok(())
    }

    async fn set_schedule_paused(
        &self,
        id_or_name: &str,
        paused: bool,
    ) -> Result<Schedule, StoreError> {
        let req = SetSchedulePausedRequest {
            schedule: id_or_name.to_owned(),
            paused,
        };
        Ok(self.client().set_schedule_paused(req).await?.into_inner())
    }

    async fn advance_schedule(
        &self,
        id: &str,
        expected: Option<prost_types::Timestamp>,
        to: prost_types::Timestamp,
    ) -> Result<bool, StoreError> {
        let req = AdvanceScheduleRequest {
            id: id.to_owned(),
            expected,
            to: Some(to),
        };
        Ok(self
            .client()
            .advance_schedule(req)
            .await?
            .into_inner()
            .advanced)
    }

    async fn create_trigger(&self, trigger: Trigger) -> Result<Trigger, StoreError> {
        Ok(self.client().create_trigger(trigger).await?.into_inner())
    }

    async fn list_triggers(&self, topic: &str) -> Result<Vec<Trigger>, StoreError> {
        let req = ListTriggersRequest {
            topic: topic.to_owned(),
        };
        Ok(self
            .client()
            .list_triggers(req)
            .await?
            .into_inner()
            .triggers)
    }

    async fn delete_trigger(&self, id_or_name: &str) -> Result<(), StoreError> {
        let req = DeleteTriggerRequest {
            trigger: id_or_name.to_owned(),
        };
        self.client().delete_trigger(req).await?;
        Ok(())
    }

    async fn put_backfill(&self, backfill: Backfill) -> Result<Backfill, StoreError> {
        Ok(self.client().put_backfill(backfill).await?.into_inner())
    }

    async fn get_backfill(&self, id: &str) -> Result<Backfill, StoreError> {
        let req = GetBackfillRequest { id: id.to_owned() };
        Ok(self.client().get_backfill(req).await?.into_inner())
    }

    async fn list_backfills(&self) -> Result<Vec<Backfill>, StoreError> {
        let resp = self
            .client()
            .list_backfills(ListBackfillsRequest {})
            .await?;
        Ok(resp.into_inner().backfills)
    }

    async fn put_token(&self, token: StoredToken) -> Result<(), StoreError> {
        self.client().put_token(token).await?;
        Ok(())
    }

    async fn read_webhook_deliveries(
        &self,
        request: &dagmesh_proto::v1::ReadWebhookDeliveriesRequest,
    ) -> Result<Vec<dagmesh_proto::v1::WebhookDelivery>, StoreError> {
        Ok(self
            .client()
            .read_webhook_deliveries(request.clone())
            .await?
            .into_inner()
            .deliveries)
    }

    async fn read_cache_entry(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        let request = ReadCacheEntryRequest {
            key: key.to_owned(),
        };
        Ok(self
            .client()
            .read_cache_entry(request)
            .await?
            .into_inner()
            .entry)
    }

    async fn get_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let request = ReadTokenRequest {
            token: id_or_name.to_owned(),
        };
        Ok(self.client().get_token(request).await?.into_inner())
    }

    async fn list_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        let resp = self.client().list_tokens(ReadTokensRequest {}).await?;
        Ok(resp.into_inner().tokens)
    }

    async fn revoke_token(&self, id_or_name: &str) -> Result<StoredToken, StoreError> {
        let request = RevokeTokenRequest {
            token: id_or_name.to_owned(),
        };
        Ok(self.client().revoke_token(request).await?.into_inner())
    }
}
