from dagmesh._proto.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OwnerMessage(_message.Message):
    __slots__ = ("hello", "offer", "withdraw", "decline", "held", "to_worker", "run_offer", "run_released", "admitted_runs")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    OFFER_FIELD_NUMBER: _ClassVar[int]
    WITHDRAW_FIELD_NUMBER: _ClassVar[int]
    DECLINE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    TO_WORKER_FIELD_NUMBER: _ClassVar[int]
    RUN_OFFER_FIELD_NUMBER: _ClassVar[int]
    RUN_RELEASED_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_RUNS_FIELD_NUMBER: _ClassVar[int]
    hello: OwnerHello
    offer: TaskOffer
    withdraw: PeerTaskRef
    decline: PeerTaskRef
    held: TaskHeld
    to_worker: ToWorker
    run_offer: RunOffer
    run_released: RunReleased
    admitted_runs: AdmittedRuns
    def __init__(self, hello: _Optional[_Union[OwnerHello, _Mapping]] = ..., offer: _Optional[_Union[TaskOffer, _Mapping]] = ..., withdraw: _Optional[_Union[PeerTaskRef, _Mapping]] = ..., decline: _Optional[_Union[PeerTaskRef, _Mapping]] = ..., held: _Optional[_Union[TaskHeld, _Mapping]] = ..., to_worker: _Optional[_Union[ToWorker, _Mapping]] = ..., run_offer: _Optional[_Union[RunOffer, _Mapping]] = ..., run_released: _Optional[_Union[RunReleased, _Mapping]] = ..., admitted_runs: _Optional[_Union[AdmittedRuns, _Mapping]] = ...) -> None: ...

class DispatcherMessage(_message.Message):
    __slots__ = ("grant", "from_worker", "lost", "run_admitted")
    GRANT_FIELD_NUMBER: _ClassVar[int]
    FROM_WORKER_FIELD_NUMBER: _ClassVar[int]
    LOST_FIELD_NUMBER: _ClassVar[int]
    RUN_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    grant: TaskGrant
    from_worker: FromWorker
    lost: TaskLost
    run_admitted: RunAdmitted
    def __init__(self, grant: _Optional[_Union[TaskGrant, _Mapping]] = ..., from_worker: _Optional[_Union[FromWorker, _Mapping]] = ..., lost: _Optional[_Union[TaskLost, _Mapping]] = ..., run_admitted: _Optional[_Union[RunAdmitted, _Mapping]] = ...) -> None: ...

class OwnerHello(_message.Message):
    __slots__ = ("owner",)
    OWNER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    def __init__(self, owner: _Optional[str] = ...) -> None: ...

class TaskOffer(_message.Message):
    __slots__ = ("task_id", "attempt", "task_type", "version_req", "labels", "slots", "concurrency_key", "priority")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_REQ_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    task_type: str
    version_req: str
    labels: _containers.ScalarMap[str, str]
    slots: int
    concurrency_key: str
    priority: int
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., task_type: _Optional[str] = ..., version_req: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., slots: _Optional[int] = ..., concurrency_key: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class PeerTaskRef(_message.Message):
    __slots__ = ("task_id", "attempt", "instance_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    instance_id: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class TaskHeld(_message.Message):
    __slots__ = ("task_id", "attempt", "instance_id", "slots", "concurrency_key")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    instance_id: str
    slots: int
    concurrency_key: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., instance_id: _Optional[str] = ..., slots: _Optional[int] = ..., concurrency_key: _Optional[str] = ...) -> None: ...

class ToWorker(_message.Message):
    __slots__ = ("instance_id", "message")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    message: _worker_pb2.ServerMessage
    def __init__(self, instance_id: _Optional[str] = ..., message: _Optional[_Union[_worker_pb2.ServerMessage, _Mapping]] = ...) -> None: ...

class TaskGrant(_message.Message):
    __slots__ = ("task_id", "attempt", "instance_id", "version", "principal")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    instance_id: str
    version: str
    principal: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., instance_id: _Optional[str] = ..., version: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class FromWorker(_message.Message):
    __slots__ = ("instance_id", "message")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    message: _worker_pb2.WorkerMessage
    def __init__(self, instance_id: _Optional[str] = ..., message: _Optional[_Union[_worker_pb2.WorkerMessage, _Mapping]] = ...) -> None: ...

class TaskLost(_message.Message):
    __slots__ = ("task_id", "attempt", "instance_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    attempt: int
    instance_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., attempt: _Optional[int] = ..., instance_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RunOffer(_message.Message):
    __slots__ = ("run_id", "partition", "buckets", "priority")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    partition: int
    buckets: _containers.RepeatedScalarFieldContainer[str]
    priority: int
    def __init__(self, run_id: _Optional[str] = ..., partition: _Optional[int] = ..., buckets: _Optional[_Iterable[str]] = ..., priority: _Optional[int] = ...) -> None: ...

class RunReleased(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class AdmittedRuns(_message.Message):
    __slots__ = ("partitions", "runs")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedScalarFieldContainer[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunOffer]
    def __init__(self, partitions: _Optional[_Iterable[int]] = ..., runs: _Optional[_Iterable[_Union[RunOffer, _Mapping]]] = ...) -> None: ...

class RunAdmitted(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...
