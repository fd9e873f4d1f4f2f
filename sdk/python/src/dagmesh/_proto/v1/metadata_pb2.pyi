import datetime

from dagmesh._proto.v1 import types_pb2 as _types_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from dagmesh._proto.v1 import run_pb2 as _run_pb2
from dagmesh._proto.v1 import scheduler_pb2 as _scheduler_pb2
from dagmesh._proto.v1 import auth_pb2 as _auth_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PutWorkflowRequest(_message.Message):
    __slots__ = ("spec", "content_hash")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    spec: _types_pb2.WorkflowSpec
    content_hash: str
    def __init__(self, spec: _Optional[_Union[_types_pb2.WorkflowSpec, _Mapping]] = ..., content_hash: _Optional[str] = ...) -> None: ...

class PutWorkflowResponse(_message.Message):
    __slots__ = ("workflow", "created")
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    workflow: _types_pb2.Workflow
    created: bool
    def __init__(self, workflow: _Optional[_Union[_types_pb2.Workflow, _Mapping]] = ..., created: bool = ...) -> None: ...

class ReadWorkflowRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ReadWorkflowsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadWorkflowsResponse(_message.Message):
    __slots__ = ("workflows",)
    WORKFLOWS_FIELD_NUMBER: _ClassVar[int]
    workflows: _containers.RepeatedCompositeFieldContainer[_types_pb2.Workflow]
    def __init__(self, workflows: _Optional[_Iterable[_Union[_types_pb2.Workflow, _Mapping]]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("mutations",)
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    mutations: _containers.RepeatedCompositeFieldContainer[Mutation]
    def __init__(self, mutations: _Optional[_Iterable[_Union[Mutation, _Mapping]]] = ...) -> None: ...

class CommitFencedRequest(_message.Message):
    __slots__ = ("fences", "mutations")
    FENCES_FIELD_NUMBER: _ClassVar[int]
    MUTATIONS_FIELD_NUMBER: _ClassVar[int]
    fences: _containers.RepeatedCompositeFieldContainer[Lease]
    mutations: _containers.RepeatedCompositeFieldContainer[Mutation]
    def __init__(self, fences: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., mutations: _Optional[_Iterable[_Union[Mutation, _Mapping]]] = ...) -> None: ...

class Mutation(_message.Message):
    __slots__ = ("put_run", "put_step", "append_event", "put_cache_entry", "put_webhook_delivery")
    PUT_RUN_FIELD_NUMBER: _ClassVar[int]
    PUT_STEP_FIELD_NUMBER: _ClassVar[int]
    APPEND_EVENT_FIELD_NUMBER: _ClassVar[int]
    PUT_CACHE_ENTRY_FIELD_NUMBER: _ClassVar[int]
    PUT_WEBHOOK_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    put_run: _types_pb2.Run
    put_step: _types_pb2.Step
    append_event: _types_pb2.RunEvent
    put_cache_entry: CacheEntry
    put_webhook_delivery: _types_pb2.WebhookDelivery
    def __init__(self, put_run: _Optional[_Union[_types_pb2.Run, _Mapping]] = ..., put_step: _Optional[_Union[_types_pb2.Step, _Mapping]] = ..., append_event: _Optional[_Union[_types_pb2.RunEvent, _Mapping]] = ..., put_cache_entry: _Optional[_Union[CacheEntry, _Mapping]] = ..., put_webhook_delivery: _Optional[_Union[_types_pb2.WebhookDelivery, _Mapping]] = ...) -> None: ...

class ReadWebhookDeliveriesRequest(_message.Message):
    __slots__ = ("run_id", "due_before", "limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DUE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    due_before: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, run_id: _Optional[str] = ..., due_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ReadWebhookDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries",)
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[_types_pb2.WebhookDelivery]
    def __init__(self, deliveries: _Optional[_Iterable[_Union[_types_pb2.WebhookDelivery, _Mapping]]] = ...) -> None: ...

class CacheEntry(_message.Message):
    __slots__ = ("key", "run_id", "step_id", "outputs", "stored_at", "expires_at")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STORED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    key: str
    run_id: str
    step_id: str
    outputs: _struct_pb2.Struct
    stored_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, key: _Optional[str] = ..., run_id: _Optional[str] = ..., step_id: _Optional[str] = ..., outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., stored_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReadCacheEntryRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class ReadCacheEntryResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: CacheEntry
    def __init__(self, entry: _Optional[_Union[CacheEntry, _Mapping]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class FindRunByIdempotencyKeyRequest(_message.Message):
    __slots__ = ("idempotency_key",)
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    def __init__(self, idempotency_key: _Optional[str] = ...) -> None: ...

class FindRunByIdempotencyKeyResponse(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ReadEventsRequest(_message.Message):
    __slots__ = ("run_id", "after_seq", "limit")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    limit: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ReadEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.RunEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[_types_pb2.RunEvent, _Mapping]]] = ...) -> None: ...

class ReadActiveRunsRequest(_message.Message):
    __slots__ = ("partitions", "every_partition")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    EVERY_PARTITION_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedScalarFieldContainer[int]
    every_partition: bool
    def __init__(self, partitions: _Optional[_Iterable[int]] = ..., every_partition: bool = ...) -> None: ...

class InitClusterRequest(_message.Message):
    __slots__ = ("partitions",)
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    partitions: int
    def __init__(self, partitions: _Optional[int] = ...) -> None: ...

class Cluster(_message.Message):
    __slots__ = ("partitions",)
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    partitions: int
    def __init__(self, partitions: _Optional[int] = ...) -> None: ...

class ReadActiveRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_types_pb2.Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[_types_pb2.Run, _Mapping]]] = ...) -> None: ...

class ActiveRuns(_message.Message):
    __slots__ = ("runs", "unreadable")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_types_pb2.Run]
    unreadable: _containers.RepeatedCompositeFieldContainer[UnreadableRun]
    def __init__(self, runs: _Optional[_Iterable[_Union[_types_pb2.Run, _Mapping]]] = ..., unreadable: _Optional[_Iterable[_Union[UnreadableRun, _Mapping]]] = ...) -> None: ...

class UnreadableRun(_message.Message):
    __slots__ = ("run_id", "workflow", "workflow_version", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    workflow: str
    workflow_version: int
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., workflow: _Optional[str] = ..., workflow_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class QuarantineRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("name", "holder", "epoch", "expires_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    epoch: int
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., epoch: _Optional[int] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AcquireLeaseRequest(_message.Message):
    __slots__ = ("name", "holder", "ttl")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    ttl: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease", "ttl")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    ttl: _duration_pb2.Duration
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ClaimLeasesRequest(_message.Message):
    __slots__ = ("holder", "ttl", "keep", "take")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    TAKE_FIELD_NUMBER: _ClassVar[int]
    holder: str
    ttl: _duration_pb2.Duration
    keep: _containers.RepeatedCompositeFieldContainer[Lease]
    take: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, holder: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., keep: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., take: _Optional[_Iterable[str]] = ...) -> None: ...

class ClaimLeasesResponse(_message.Message):
    __slots__ = ("kept", "lost", "taken")
    KEPT_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    kept: _containers.RepeatedCompositeFieldContainer[Lease]
    lost: _containers.RepeatedScalarFieldContainer[str]
    taken: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, kept: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., lost: _Optional[_Iterable[str]] = ..., taken: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class ReleaseLeaseRequest(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ReleaseLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLiveLeasesRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class DeleteExpiredLeasesRequest(_message.Message):
    __slots__ = ("prefix", "expired_for")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FOR_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    expired_for: _duration_pb2.Duration
    def __init__(self, prefix: _Optional[str] = ..., expired_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DeleteExpiredLeasesResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class ListLiveLeasesResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class StoreErrorDetail(_message.Message):
    __slots__ = ("lease_held", "fenced")
    LEASE_HELD_FIELD_NUMBER: _ClassVar[int]
    FENCED_FIELD_NUMBER: _ClassVar[int]
    lease_held: LeaseHeld
    fenced: Fenced
    def __init__(self, lease_held: _Optional[_Union[LeaseHeld, _Mapping]] = ..., fenced: _Optional[_Union[Fenced, _Mapping]] = ...) -> None: ...

class LeaseHeld(_message.Message):
    __slots__ = ("name", "holder", "expires_in_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    holder: str
    expires_in_ms: int
    def __init__(self, name: _Optional[str] = ..., holder: _Optional[str] = ..., expires_in_ms: _Optional[int] = ...) -> None: ...

class Fenced(_message.Message):
    __slots__ = ("name", "epoch", "current_epoch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    epoch: int
    current_epoch: int
    def __init__(self, name: _Optional[str] = ..., epoch: _Optional[int] = ..., current_epoch: _Optional[int] = ...) -> None: ...

class ReadScheduleRequest(_message.Message):
    __slots__ = ("schedule",)
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    schedule: str
    def __init__(self, schedule: _Optional[str] = ...) -> None: ...

class SetSchedulePausedRequest(_message.Message):
    __slots__ = ("schedule", "paused")
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    schedule: str
    paused: bool
    def __init__(self, schedule: _Optional[str] = ..., paused: bool = ...) -> None: ...

class AdvanceScheduleRequest(_message.Message):
    __slots__ = ("id", "expected", "to")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    id: str
    expected: _timestamp_pb2.Timestamp
    to: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., expected: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., to: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class AdvanceScheduleResponse(_message.Message):
    __slots__ = ("advanced",)
    ADVANCED_FIELD_NUMBER: _ClassVar[int]
    advanced: bool
    def __init__(self, advanced: bool = ...) -> None: ...

class StoredToken(_message.Message):
    __slots__ = ("token", "secret_sha256")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SECRET_SHA256_FIELD_NUMBER: _ClassVar[int]
    token: _auth_pb2.ApiToken
    secret_sha256: str
    def __init__(self, token: _Optional[_Union[_auth_pb2.ApiToken, _Mapping]] = ..., secret_sha256: _Optional[str] = ...) -> None: ...

class ReadTokenRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class ReadTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[StoredToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[StoredToken, _Mapping]]] = ...) -> None: ...
