import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_QUEUED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_SUCCEEDED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]

class StepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATE_UNSPECIFIED: _ClassVar[StepState]
    STEP_STATE_PENDING: _ClassVar[StepState]
    STEP_STATE_READY: _ClassVar[StepState]
    STEP_STATE_ASSIGNED: _ClassVar[StepState]
    STEP_STATE_RUNNING: _ClassVar[StepState]
    STEP_STATE_RETRY_WAIT: _ClassVar[StepState]
    STEP_STATE_SUCCEEDED: _ClassVar[StepState]
    STEP_STATE_FAILED: _ClassVar[StepState]
    STEP_STATE_SKIPPED: _ClassVar[StepState]
    STEP_STATE_CANCELLED: _ClassVar[StepState]

class DeliveryState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELIVERY_STATE_UNSPECIFIED: _ClassVar[DeliveryState]
    DELIVERY_STATE_PENDING: _ClassVar[DeliveryState]
    DELIVERY_STATE_DELIVERED: _ClassVar[DeliveryState]
    DELIVERY_STATE_GAVE_UP: _ClassVar[DeliveryState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_QUEUED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_SUCCEEDED: RunState
RUN_STATE_FAILED: RunState
RUN_STATE_CANCELLED: RunState
STEP_STATE_UNSPECIFIED: StepState
STEP_STATE_PENDING: StepState
STEP_STATE_READY: StepState
STEP_STATE_ASSIGNED: StepState
STEP_STATE_RUNNING: StepState
STEP_STATE_RETRY_WAIT: StepState
STEP_STATE_SUCCEEDED: StepState
STEP_STATE_FAILED: StepState
STEP_STATE_SKIPPED: StepState
STEP_STATE_CANCELLED: StepState
DELIVERY_STATE_UNSPECIFIED: DeliveryState
DELIVERY_STATE_PENDING: DeliveryState
DELIVERY_STATE_DELIVERED: DeliveryState
DELIVERY_STATE_GAVE_UP: DeliveryState

class WorkflowSpec(_message.Message):
    __slots__ = ("name", "description", "steps", "continue_on_failure", "inputs", "on_exit", "on_success", "on_failure", "notifications")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: InputSpec
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[InputSpec, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    ON_EXIT_FIELD_NUMBER: _ClassVar[int]
    ON_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    NOTIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    steps: _containers.RepeatedCompositeFieldContainer[StepSpec]
    continue_on_failure: bool
    inputs: _containers.MessageMap[str, InputSpec]
    on_exit: _containers.RepeatedCompositeFieldContainer[StepSpec]
    on_success: _containers.RepeatedCompositeFieldContainer[StepSpec]
    on_failure: _containers.RepeatedCompositeFieldContainer[StepSpec]
    notifications: _containers.RepeatedCompositeFieldContainer[Notification]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepSpec, _Mapping]]] = ..., continue_on_failure: bool = ..., inputs: _Optional[_Mapping[str, InputSpec]] = ..., on_exit: _Optional[_Iterable[_Union[StepSpec, _Mapping]]] = ..., on_success: _Optional[_Iterable[_Union[StepSpec, _Mapping]]] = ..., on_failure: _Optional[_Iterable[_Union[StepSpec, _Mapping]]] = ..., notifications: _Optional[_Iterable[_Union[Notification, _Mapping]]] = ...) -> None: ...

class Notification(_message.Message):
    __slots__ = ("url", "events", "filter")
    URL_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    url: str
    events: _containers.RepeatedScalarFieldContainer[str]
    filter: str
    def __init__(self, url: _Optional[str] = ..., events: _Optional[_Iterable[str]] = ..., filter: _Optional[str] = ...) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("type", "default", "description")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    type: str
    default: _struct_pb2.Value
    description: str
    def __init__(self, type: _Optional[str] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., description: _Optional[str] = ...) -> None: ...

class StepSpec(_message.Message):
    __slots__ = ("id", "task", "needs", "inputs", "when", "retry", "timeout", "labels", "slots", "priority", "concurrency_key", "schedule_to_start_timeout", "for_each", "max_parallel", "continue_on_failure", "sleep", "approval", "wait_for", "workflow", "cache")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    NEEDS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_TO_START_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    FOR_EACH_FIELD_NUMBER: _ClassVar[int]
    MAX_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    SLEEP_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    id: str
    task: str
    needs: _containers.RepeatedScalarFieldContainer[str]
    inputs: _containers.ScalarMap[str, str]
    when: str
    retry: RetryPolicy
    timeout: str
    labels: _containers.ScalarMap[str, str]
    slots: int
    priority: int
    concurrency_key: str
    schedule_to_start_timeout: str
    for_each: str
    max_parallel: int
    continue_on_failure: bool
    sleep: str
    approval: ApprovalSpec
    wait_for: WaitForSpec
    workflow: str
    cache: CacheSpec
    def __init__(self, id: _Optional[str] = ..., task: _Optional[str] = ..., needs: _Optional[_Iterable[str]] = ..., inputs: _Optional[_Mapping[str, str]] = ..., when: _Optional[str] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., timeout: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., slots: _Optional[int] = ..., priority: _Optional[int] = ..., concurrency_key: _Optional[str] = ..., schedule_to_start_timeout: _Optional[str] = ..., for_each: _Optional[str] = ..., max_parallel: _Optional[int] = ..., continue_on_failure: bool = ..., sleep: _Optional[str] = ..., approval: _Optional[_Union[ApprovalSpec, _Mapping]] = ..., wait_for: _Optional[_Union[WaitForSpec, _Mapping]] = ..., workflow: _Optional[str] = ..., cache: _Optional[_Union[CacheSpec, _Mapping]] = ...) -> None: ...

class CacheSpec(_message.Message):
    __slots__ = ("key", "ttl")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    key: str
    ttl: str
    def __init__(self, key: _Optional[str] = ..., ttl: _Optional[str] = ...) -> None: ...

class WaitForSpec(_message.Message):
    __slots__ = ("topic", "filter", "timeout")
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    topic: str
    filter: str
    timeout: str
    def __init__(self, topic: _Optional[str] = ..., filter: _Optional[str] = ..., timeout: _Optional[str] = ...) -> None: ...

class ApprovalSpec(_message.Message):
    __slots__ = ("message", "timeout")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    message: str
    timeout: str
    def __init__(self, message: _Optional[str] = ..., timeout: _Optional[str] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "initial_backoff", "max_backoff", "multiplier", "jitter", "retry_non_retryable")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    JITTER_FIELD_NUMBER: _ClassVar[int]
    RETRY_NON_RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    initial_backoff: str
    max_backoff: str
    multiplier: float
    jitter: float
    retry_non_retryable: bool
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff: _Optional[str] = ..., max_backoff: _Optional[str] = ..., multiplier: _Optional[float] = ..., jitter: _Optional[float] = ..., retry_non_retryable: bool = ...) -> None: ...

class Workflow(_message.Message):
    __slots__ = ("name", "version", "spec", "content_hash", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    spec: WorkflowSpec
    content_hash: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., spec: _Optional[_Union[WorkflowSpec, _Mapping]] = ..., content_hash: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "workflow", "workflow_version", "state", "inputs", "tags", "idempotency_key", "steps", "error", "created_at", "finished_at", "last_seq", "priority", "queue_position", "submitted_by", "cancelled_by", "retried_by", "suspended", "parent_run_id", "parent_step_id", "depth", "notifications", "traceparent", "partition")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_FIELD_NUMBER: _ClassVar[int]
    WORKFLOW_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_BY_FIELD_NUMBER: _ClassVar[int]
    RETRIED_BY_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_STEP_ID_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    NOTIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    workflow: str
    workflow_version: int
    state: RunState
    inputs: _struct_pb2.Struct
    tags: _containers.ScalarMap[str, str]
    idempotency_key: str
    steps: _containers.RepeatedCompositeFieldContainer[Step]
    error: str
    created_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    last_seq: int
    priority: int
    queue_position: int
    submitted_by: str
    cancelled_by: str
    retried_by: str
    suspended: bool
    parent_run_id: str
    parent_step_id: str
    depth: int
    notifications: _containers.RepeatedCompositeFieldContainer[Notification]
    traceparent: str
    partition: int
    def __init__(self, run_id: _Optional[str] = ..., workflow: _Optional[str] = ..., workflow_version: _Optional[int] = ..., state: _Optional[_Union[RunState, str]] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., idempotency_key: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[Step, _Mapping]]] = ..., error: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., priority: _Optional[int] = ..., queue_position: _Optional[int] = ..., submitted_by: _Optional[str] = ..., cancelled_by: _Optional[str] = ..., retried_by: _Optional[str] = ..., suspended: bool = ..., parent_run_id: _Optional[str] = ..., parent_step_id: _Optional[str] = ..., depth: _Optional[int] = ..., notifications: _Optional[_Iterable[_Union[Notification, _Mapping]]] = ..., traceparent: _Optional[str] = ..., partition: _Optional[int] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("run_id", "step_id", "task_id", "state", "attempt", "task", "inputs", "outputs", "error", "worker", "progress", "progress_message", "started_at", "finished_at", "task_version", "lost_attempts", "waiting_reason", "lost_in_a_row", "worker_principal", "map_step", "item_index", "item_count", "waiting_for", "wake_at", "child_run_id", "cached_from", "cache_key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TASK_VERSION_FIELD_NUMBER: _ClassVar[int]
    LOST_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    LOST_IN_A_ROW_FIELD_NUMBER: _ClassVar[int]
    WORKER_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    MAP_STEP_FIELD_NUMBER: _ClassVar[int]
    ITEM_INDEX_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    WAKE_AT_FIELD_NUMBER: _ClassVar[int]
    CHILD_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FROM_FIELD_NUMBER: _ClassVar[int]
    CACHE_KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step_id: str
    task_id: str
    state: StepState
    attempt: int
    task: str
    inputs: _struct_pb2.Struct
    outputs: _struct_pb2.Struct
    error: str
    worker: str
    progress: float
    progress_message: str
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    task_version: str
    lost_attempts: int
    waiting_reason: str
    lost_in_a_row: int
    worker_principal: str
    map_step: str
    item_index: int
    item_count: int
    waiting_for: str
    wake_at: _timestamp_pb2.Timestamp
    child_run_id: str
    cached_from: str
    cache_key: str
    def __init__(self, run_id: _Optional[str] = ..., step_id: _Optional[str] = ..., task_id: _Optional[str] = ..., state: _Optional[_Union[StepState, str]] = ..., attempt: _Optional[int] = ..., task: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., error: _Optional[str] = ..., worker: _Optional[str] = ..., progress: _Optional[float] = ..., progress_message: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., task_version: _Optional[str] = ..., lost_attempts: _Optional[int] = ..., waiting_reason: _Optional[str] = ..., lost_in_a_row: _Optional[int] = ..., worker_principal: _Optional[str] = ..., map_step: _Optional[str] = ..., item_index: _Optional[int] = ..., item_count: _Optional[int] = ..., waiting_for: _Optional[str] = ..., wake_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., child_run_id: _Optional[str] = ..., cached_from: _Optional[str] = ..., cache_key: _Optional[str] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("run_id", "seq", "at", "run_state", "step_state", "step_progress", "step_log", "unreadable")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STEP_LOG_FIELD_NUMBER: _ClassVar[int]
    UNREADABLE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    at: _timestamp_pb2.Timestamp
    run_state: RunStateChanged
    step_state: StepStateChanged
    step_progress: StepProgress
    step_log: StepLog
    unreadable: EventUnreadable
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_state: _Optional[_Union[RunStateChanged, _Mapping]] = ..., step_state: _Optional[_Union[StepStateChanged, _Mapping]] = ..., step_progress: _Optional[_Union[StepProgress, _Mapping]] = ..., step_log: _Optional[_Union[StepLog, _Mapping]] = ..., unreadable: _Optional[_Union[EventUnreadable, _Mapping]] = ...) -> None: ...

class EventUnreadable(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RunStateChanged(_message.Message):
    __slots__ = ("state", "error", "actor", "suspended")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    SUSPENDED_FIELD_NUMBER: _ClassVar[int]
    state: RunState
    error: str
    actor: str
    suspended: bool
    def __init__(self, state: _Optional[_Union[RunState, str]] = ..., error: _Optional[str] = ..., actor: _Optional[str] = ..., suspended: bool = ...) -> None: ...

class StepStateChanged(_message.Message):
    __slots__ = ("step_id", "state", "attempt", "worker", "error", "item_count", "cached_from")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    CACHED_FROM_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    state: StepState
    attempt: int
    worker: str
    error: str
    item_count: int
    cached_from: str
    def __init__(self, step_id: _Optional[str] = ..., state: _Optional[_Union[StepState, str]] = ..., attempt: _Optional[int] = ..., worker: _Optional[str] = ..., error: _Optional[str] = ..., item_count: _Optional[int] = ..., cached_from: _Optional[str] = ...) -> None: ...

class StepProgress(_message.Message):
    __slots__ = ("step_id", "attempt", "fraction", "message", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    attempt: int
    fraction: float
    message: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step_id: _Optional[str] = ..., attempt: _Optional[int] = ..., fraction: _Optional[float] = ..., message: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StepLog(_message.Message):
    __slots__ = ("step_id", "attempt", "lines")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    step_id: str
    attempt: int
    lines: _containers.RepeatedCompositeFieldContainer[LogLine]
    def __init__(self, step_id: _Optional[str] = ..., attempt: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[LogLine, _Mapping]]] = ...) -> None: ...

class LogLine(_message.Message):
    __slots__ = ("at", "level", "text")
    AT_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    at: _timestamp_pb2.Timestamp
    level: str
    text: str
    def __init__(self, at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., level: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class WebhookDelivery(_message.Message):
    __slots__ = ("delivery_id", "run_id", "event", "step_id", "url", "body", "created_at", "state", "attempts", "next_attempt_at", "last_attempt_at", "last_status", "last_error", "last_response", "delivered_at")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_AT_FIELD_NUMBER: _ClassVar[int]
    delivery_id: str
    run_id: str
    event: str
    step_id: str
    url: str
    body: str
    created_at: _timestamp_pb2.Timestamp
    state: DeliveryState
    attempts: int
    next_attempt_at: _timestamp_pb2.Timestamp
    last_attempt_at: _timestamp_pb2.Timestamp
    last_status: int
    last_error: str
    last_response: str
    delivered_at: _timestamp_pb2.Timestamp
    def __init__(self, delivery_id: _Optional[str] = ..., run_id: _Optional[str] = ..., event: _Optional[str] = ..., step_id: _Optional[str] = ..., url: _Optional[str] = ..., body: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[DeliveryState, str]] = ..., attempts: _Optional[int] = ..., next_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_attempt_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_status: _Optional[int] = ..., last_error: _Optional[str] = ..., last_response: _Optional[str] = ..., delivered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
