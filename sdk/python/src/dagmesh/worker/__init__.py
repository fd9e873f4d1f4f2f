"""Step workers; see `dagmesh._worker` for the protocol, and `python -m dagmesh.worker --help`
to run a worker defined in a module."""

from dagmesh._worker import Handler, Worker, WorkerState

__all__ = ["Handler", "Worker", "WorkerState"]
