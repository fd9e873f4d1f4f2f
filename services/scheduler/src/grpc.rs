//! `dagmesh.v1.SchedulerService` over a [`Scheduler`]: thin handlers that unwrap requests,
//! call the scheduler and map errors to status codes.

use dagmesh_proto::v1::scheduler_service_server::{SchedulerService, SchedulerServiceServer};
use dagmesh_proto::v1::{
    Backfill, CancelBackfillRequest, CreateBackfillRequest, CreateScheduleRequest,
    CreateTriggerRequest, DeleteScheduleRequest, DeleteScheduleResponse, DeleteTriggerRequest,
    DeleteTriggerResponse, GetBackfillRequest, GetScheduleRequest, ListBackfillsRequest,
    ListBackfillsResponse, ListSchedulesRequest, ListSchedulesResponse, ListTriggersRequest,
    ListTriggersResponse, PauseScheduleRequest, PublishEventRequest, PublishEventResponse,
    ResumeBackfillRequest, ResumeScheduleRequest, Schedule, Trigger,
};
use tonic::{Request, Response, Status};

use crate::Scheduler;

/// `SchedulerService` backed by a [`Scheduler`].
#[derive(Clone)]
pub struct SchedulerGrpcServer {
    scheduler: Scheduler,
}

impl SchedulerGrpcServer {
    pub fn new(scheduler: Scheduler) -> Self {
        SchedulerGrpcServer { scheduler }
    }

    pub fn into_service(self) -> SchedulerServiceServer<Self> {
        SchedulerServiceServer::new(self)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl SchedulerService for SchedulerGrpcServer {
    async fn create_schedule(&self, request: Request<CreateScheduleRequest>) -> Reply<Schedule> {
        let schedule = request
            .into_inner()
            .schedule
            .ok_or_else(|| Status::invalid_argument("schedule: required"))?;
        Ok(Response::new(
            self.scheduler.create_schedule(schedule).await?,
        ))
    }

    async fn get_schedule(&self, request: Request<GetScheduleRequest>) -> Reply<Schedule> {
        let id = request.into_inner().schedule;
        Ok(Response::new(self.scheduler.get_schedule(&id).await?))
    }

    async fn list_schedules(
        &self,
        _request: Request<ListSchedulesRequest>,
    ) -> Reply<ListSchedulesResponse> {
        let schedules = self.scheduler.list_schedules().await?;
        Ok(Response::new(ListSchedulesResponse { schedules }))
    }

    async fn pause_schedule(&self, request: Request<PauseScheduleRequest>) -> Reply<Schedule> {
        let id = request.into_inner().schedule;
        Ok(Response::new(self.scheduler.pause_schedule(&id).await?))
    }

    async fn resume_schedule(&self, request: Request<ResumeScheduleRequest>) -> Reply<Schedule> {
        let id = request.into_inner().schedule;
        Ok(Response::new(self.scheduler.resume_schedule(&id).await?))
    }

    async fn delete_schedule(
        &self,
        request: Request<DeleteScheduleRequest>,
    ) -> Reply<DeleteScheduleResponse> {
        self.scheduler
            .delete_schedule(&request.into_inner().schedule)
            .await?;
        Ok(Response::new(DeleteScheduleResponse {}))
    }

    async fn create_trigger(&self, request: Request<CreateTriggerRequest>) -> Reply<Trigger> {
        let trigger = request
            .into_inner()
            .trigger
            .ok_or_else(|| Status::invalid_argument("trigger: required"))?;
        Ok(Response::new(self.scheduler.create_trigger(trigger).await?))
    }

    async fn list_triggers(
        &self,
        request: Request<ListTriggersRequest>,
    ) -> Reply<ListTriggersResponse> {
        let triggers = self
            .scheduler
            .list_triggers(&request.into_inner().topic)
            .await?;
        Ok(Response::new(ListTriggersResponse { triggers }))
    }

    async fn delete_trigger(
        &self,
        request: Request<DeleteTriggerRequest>,
    ) -> Reply<DeleteTriggerResponse> {
        self.scheduler
            .delete_trigger(&request.into_inner().trigger)
            .await?;
        Ok(Response::new(DeleteTriggerResponse {}))
    }

    async fn publish_event(
        &self,
        request: Request<PublishEventRequest>,
    ) -> Reply<PublishEventResponse> {
        let req = request.into_inner();
        let payload = dagmesh_proto::json::from_struct(req.payload.as_ref());
        let response = self
            .scheduler
            .publish_event(&req.topic, payload, &req.event_id)
            .await?;
        Ok(Response::new(response))
    }

    async fn create_backfill(&self, request: Request<CreateBackfillRequest>) -> Reply<Backfill> {
        let backfill = request
            .into_inner()
            .backfill
            .ok_or_else(|| Status::invalid_argument("backfill: required"))?;
        Ok(Response::new(
            self.scheduler.create_backfill(backfill).await?,
        ))
    }

    async fn get_backfill(&self, request: Request<GetBackfillRequest>) -> Reply<Backfill> {
        let id = request.into_inner().id;
        Ok(Response::new(self.scheduler.get_backfill(&id).await?))
    }

    async fn list_backfills(
        &self,
        _request: Request<ListBackfillsRequest>,
    ) -> Reply<ListBackfillsResponse> {
        let backfills = self.scheduler.list_backfills().await?;
        Ok(Response::new(ListBackfillsResponse { backfills }))
    }

    async fn cancel_backfill(&self, request: Request<CancelBackfillRequest>) -> Reply<Backfill> {
        let id = request.into_inner().id;
        Ok(Response::new(self.scheduler.cancel_backfill(&id).await?))
    }

    async fn resume_backfill(&self, request: Request<ResumeBackfillRequest>) -> Reply<Backfill> {
        let id = request.into_inner().id;
        Ok(Response::new(self.scheduler.resume_backfill(&id).await?))
    }
}
