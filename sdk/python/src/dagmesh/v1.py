"""The generated protocol types of `proto/dagmesh/v1`, for fields the SDK does not wrap.

    from dagmesh.v1 import run_pb2, types_pb2
    from dagmesh.v1 import RunState, StepState
"""

from dagmesh._proto.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    run_pb2,
    run_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from dagmesh._proto.v1.run_pb2 import WatchRunResponse
from dagmesh._proto.v1.types_pb2 import (
    RetryPolicy,
    Run,
    RunEvent,
    RunState,
    Step,
    StepSpec,
    StepState,
    Workflow,
    WorkflowSpec,
)

__all__ = [
    "RetryPolicy",
    "Run",
    "RunEvent",
    "RunState",
    "Step",
    "StepSpec",
    "StepState",
    "WatchRunResponse",
    "Workflow",
    "WorkflowSpec",
    "auth_pb2",
    "auth_pb2_grpc",
    "cluster_pb2",
    "cluster_pb2_grpc",
    "run_pb2",
    "run_pb2_grpc",
    "scheduler_pb2",
    "scheduler_pb2_grpc",
    "types_pb2",
    "worker_pb2",
    "worker_pb2_grpc",
    "workflow_pb2",
    "workflow_pb2_grpc",
]
