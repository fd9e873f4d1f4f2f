"""Parts that need no server: payloads, contexts, registration, URLs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from dagmesh import TaskContext, TaskError, Worker, to_dict, to_struct
from dagmesh._channel import parse_server
from dagmesh.client import _watch_request
from dagmesh.context import LOG_BUFFER_LINES


def test_payloads_round_trip_and_keep_ints() -> None:
    data = {
        "room": "kitchen", "count": 3, "ratio": 0.25, "ok": True, "none": None, "big": 2**40,
        "images": ["a.jpg", "b.jpg"], "meta": {"depth": [1, 2.5], "empty": {}}, "tuple": (1, 2),
    }
    back = to_dict(to_struct(data))
    assert back == {**data, "tuple": [1, 2]}
    assert isinstance(back["count"], int) and isinstance(back["ratio"], float)
    assert isinstance(back["meta"]["depth"][0], int)
    assert to_dict(to_struct({"f": 3.0}))["f"] == 3, "whole-number doubles read back as ints"
    assert isinstance(to_dict(to_struct({"f": 2.0**60}))["f"], float), "beyond 2**53 they stay floats"


def test_payloads_refuse_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match=r"meta\.when: datetime"):
        import datetime

        to_struct({"meta": {"when": datetime.datetime.now()}})
    with pytest.raises(TypeError, match="expected a dict"):
        to_struct([1, 2])  # type: ignore[arg-type]


def test_progress_keeps_the_latest_report_and_clamps() -> None:
    ctx = TaskContext("run/step", 1)
    ctx.progress(0.2, "first")
    threading.Thread(target=ctx.progress, args=(1.7, "second"), kwargs={"metrics": {"triangles": 3}}).start()
    import time

    time.sleep(0.05)
    progress = ctx._take_progress()
    assert progress is not None
    assert (progress.message, progress.fraction, dict(progress.metrics)) == ("second", 1.0, {"triangles": 3.0})
    assert ctx._take_progress() is None, "taken once"
    ctx.progress(float("nan"))
    assert ctx._take_progress().fraction == 0.0  # type: ignore[union-attr]


def test_logs_are_capped_and_counted() -> None:
    ctx = TaskContext("run/step", 1)
    for i in range(LOG_BUFFER_LINES + 5):
        ctx.log(f"line {i}")
    ctx.log("x", level="warning")
    logs, dropped = ctx._take_logs()
    assert len(logs) == LOG_BUFFER_LINES and dropped == 6
    assert logs[0].level == "info" and logs[0].text == "line 0"
    with pytest.raises(ValueError, match="unknown log level"):
        ctx.log("x", level="loud")


def test_detached_context_cancels() -> None:
    ctx = TaskContext("run/step", 2, traceparent="")
    assert ctx.traceparent is None and not ctx.cancelled

    async def scenario() -> bool:
        waiter = asyncio.ensure_future(ctx.wait_cancelled())
        await asyncio.sleep(0.01)
        assert not waiter.done()
        ctx.cancel()
        await asyncio.wait_for(waiter, 1)
        return ctx.cancelled

    assert asyncio.run(scenario())
    assert ctx.cancel_event.is_set()


def test_task_error_defaults_to_not_retryable() -> None:
    assert TaskError("bad input").retryable is False
    assert TaskError("busy", retryable=True).retryable is True
    assert str(TaskError("bad input")) == "bad input"


def test_registration_is_validated() -> None:
    worker = Worker("http://127.0.0.1:1", name="mesher")
    assert worker.instance_id.startswith("mesher-") and len(worker.instance_id) == len("mesher-") + 12

    @worker.task("t", version="1.0.0")
    def t(ctx: TaskContext, inputs: dict) -> dict:
        return {}

    with pytest.raises(ValueError, match="registered twice"):
        worker.register("t", "1.0.0", t)
    with pytest.raises(ValueError, match="invalid version"):
        worker.register("t", "1.x", t)
    worker.register("t", "2.0.0-rc.1", t)
    with pytest.raises(ValueError, match="slots"):
        Worker("http://127.0.0.1:1", slots=0)
    with pytest.raises(ValueError, match="at least one task type"):
        asyncio.run(Worker("http://127.0.0.1:1").run_async())
    assert worker._handler("t", "2.0.0-rc.1") is not None
    assert worker._handler("t", "") is None, "ambiguous without a version"


def test_server_urls() -> None:
    assert parse_server("http://127.0.0.1:7070") == ("127.0.0.1:7070", False)
    assert parse_server("https://dagmesh.example.com") == ("dagmesh.example.com:443", True)
    assert parse_server("localhost:7070") == ("localhost:7070", False)
    with pytest.raises(ValueError):
        parse_server("ftp://x")


def test_watch_request_after_seq_is_optional() -> None:
    assert not _watch_request("r", None).HasField("after_seq")
    zero = _watch_request("r", 0)
    assert zero.HasField("after_seq") and zero.after_seq == 0
