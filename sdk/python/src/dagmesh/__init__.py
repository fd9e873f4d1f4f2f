"""Python SDK for dagmesh: step workers and a client for backends.

- `Worker` registers task handlers (`@worker.task("thumbnail", version="1.2.0")`), dials the
  run-executor over one `WorkerService.Connect` stream, runs what it is assigned, reports
  progress and logs, and keeps every result until the executor has made it durable. It
  reconnects on its own and drains on SIGTERM.
- `Client` (and `AsyncClient`) for backends: apply workflows, submit runs, watch them, wait
  for them to end, cancel and retry them.
- `Workflow`, `Step`, `Retry` (`dagmesh.workflow`): workflows in code, a typed builder of the
  same `WorkflowSpec` a YAML workflow file gives, with needs on steps already added.
- `dagmesh.v1`: the generated protocol types.
"""

from dagmesh._worker import Worker, WorkerState
from dagmesh.client import AsyncClient, Client, is_terminal
from dagmesh.context import LogLevel, TaskContext
from dagmesh.errors import ClientError, TaskError, WorkerAborted, WorkerRejected
from dagmesh.payload import to_dict, to_struct
from dagmesh.workflow import Retry, Step, Workflow

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ClientError",
    "LogLevel",
    "Retry",
    "Step",
    "TaskContext",
    "TaskError",
    "Worker",
    "WorkerAborted",
    "WorkerRejected",
    "WorkerState",
    "Workflow",
    "__version__",
    "is_terminal",
    "to_dict",
    "to_struct",
]
