"""What a broken or hostile executor sends is bounded: the driver answers an Assign past the
announced limits with TaskFailed and keeps running. No server: the driver's handlers are called
directly, and what they queue for the stream is read back."""

from __future__ import annotations

import asyncio
from typing import Any

from dagmesh import TaskContext, Worker, to_struct
from dagmesh._proto.v1 import worker_pb2
from dagmesh._worker import _Driver, _Outbox
from dagmesh.payload import MAX_PAYLOAD_DEPTH, check_depth


def _worker() -> Worker:
    worker = Worker(server="http://127.0.0.1:1", name="bounds", instance_id="bounds-1", slots=2)

    @worker.task("echo", version="1.0.0")
    async def echo(ctx: TaskContext, inputs: dict[str, Any]) -> dict[str, Any]:
        return inputs

    return worker


def _assign(task_id: str, inputs: dict[str, Any], slots: int = 1) -> worker_pb2.Assign:
    return worker_pb2.Assign(
        task_id=task_id,
        attempt=1,
        task_type=worker_pb2.TaskTypeVersion(name="echo", version="1.0.0"),
        inputs=to_struct(inputs),
        slots=slots,
    )


def _nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


async def _answers(driver: _Driver, assign: worker_pb2.Assign) -> list[worker_pb2.WorkerMessage]:
    outbox = _Outbox()
    driver.on_assign(assign, outbox)
    outbox.close()
    messages = []
    while True:
        try:
            messages.append(await outbox.pop())
        except Exception:
            return messages


def test_assigns_past_the_limits_fail_the_attempt_not_the_worker() -> None:
    async def main() -> None:
        driver = _Driver(_worker())
        driver.max_payload = 1024
        try:
            inputs = {"text": "x" * 5000}
            size = to_struct(inputs).ByteSize()
            # A refusal comes without Started: the task was not taken.
            (failed,) = await _answers(driver, _assign("r/huge", inputs))
            assert failed.failed.error == f'inputs of "echo" are {size} bytes, over the 1024-byte payload limit'
            assert not failed.failed.retryable, "the same inputs would come again"

            (failed,) = await _answers(driver, _assign("r/deep", {"d": _nested(MAX_PAYLOAD_DEPTH)}))
            assert failed.failed.error.startswith('inputs of "echo": inputs.d.a.a'), failed.failed.error
            assert "limit of 20 levels" in failed.failed.error

            (failed,) = await _answers(driver, _assign("r/wide", {}, slots=2**32 - 1))
            assert failed.failed.retryable
            assert f"task needs {2**32 - 1} slot(s), 0 of 2 in use" in failed.failed.error

            # What fits still runs.
            (started,) = await _answers(driver, _assign("r/fine", {"text": "ok"}))
            assert started.started.task_id == "r/fine"
            assert driver.state().running == 1
        finally:
            for entry in driver.tasks.values():
                pump = getattr(entry, "pump", None)
                if pump is not None:
                    pump.cancel()
            driver.executor.shutdown(wait=False)

    asyncio.run(main())


def test_outputs_nested_too_deep_fail_naming_the_path() -> None:
    async def main() -> None:
        driver = _Driver(_worker())
        try:
            message = driver._completed(("r/out", 1), "echo", {"x": _nested(MAX_PAYLOAD_DEPTH)})
            assert message.failed.error.startswith('output of "echo": outputs.x.a'), message.failed.error
            assert not message.failed.retryable
            # Past Python's own recursion limit too: a failure, not a stuck task.
            message = driver._completed(("r/out", 2), "echo", _nested(100_000))
            assert message.WhichOneof("message") == "failed", message
            assert not message.failed.retryable
        finally:
            driver.executor.shutdown(wait=False)

    asyncio.run(main())


def test_depth_counts_lists_and_structs() -> None:
    assert check_depth("p", to_struct(_nested(MAX_PAYLOAD_DEPTH - 1))) is None
    error = check_depth("p", to_struct({"l": [[[1]]]}), limit=3)
    assert error == "p.l[0][0]: nested deeper than the limit of 3 levels"
