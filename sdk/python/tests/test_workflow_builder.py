"""The workflow builder (`dagmesh.workflow`): field by field, the checks it makes on its own, and
through a real server the same version (content hash) as the same workflow written in YAML."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

import dagmesh
from dagmesh import Client, Retry, Step, Workflow
from dagmesh.v1 import types_pb2
from dagmesh.workflow import input_expression

from conftest import DAGMESH_BIN, STEP_TIMEOUT, Server


def test_the_package_exports_the_builder() -> None:
    assert {"Workflow", "Step", "Retry"} <= set(dagmesh.__all__)
    assert dagmesh.Workflow is Workflow and dagmesh.Step is Step and dagmesh.Retry is Retry


def test_workflow_fields_and_declared_inputs() -> None:
    wf = Workflow("room-scan", description="photos to a mesh", continue_on_failure=True)
    assert wf.input("room_id", "string", description="the room") is wf
    wf.input("image_count", "int", default=8)
    wf.input("tags", "list", default=["a", "b"])
    wf.input("meta", "object", default={"k": 1.5, "empty": {}})
    wf.input("strict", "bool", default=False)
    spec = wf.build()
    assert isinstance(spec, types_pb2.WorkflowSpec)
    assert (spec.name, spec.description, spec.continue_on_failure) == ("room-scan", "photos to a mesh", True)
    assert list(spec.steps) == [] and list(spec.on_exit) == []

    room = spec.inputs["room_id"]
    assert (room.type, room.description, room.HasField("default")) == ("string", "the room", False)
    assert spec.inputs["image_count"].default == struct_pb2.Value(number_value=8)
    tags = spec.inputs["tags"].default.list_value.values
    assert [v.string_value for v in tags] == ["a", "b"]
    meta = spec.inputs["meta"].default.struct_value.fields
    assert meta["k"].number_value == 1.5 and meta["empty"].HasField("struct_value")
    strict = spec.inputs["strict"].default
    assert strict.HasField("bool_value") and strict.bool_value is False, "a false default is still a default"


def test_task_fields() -> None:
    wf = Workflow("w")
    wf.input("image_count", "int")
    thumb = wf.add(
        Step.task(
            "thumb", "thumbnail@^1.2",
            when="inputs.image_count > 0", timeout="5m",
            retry=Retry(max_attempts=3, initial_backoff="1s", max_backoff="1m", multiplier=2.0, jitter=0.2,
                        retry_non_retryable=True),
            labels={"gpu": "true", "fast": True, "zone": 3, "weight": 1.0, "ratio": 0.5},
            slots=2, priority=-5, concurrency_key="warehouse", schedule_to_start_timeout="10m",
            cache={"ttl": "1h", "key": "inputs.image_count"},
        )
    )
    assert thumb.id == "thumb"
    step = wf.build().steps[0]
    assert (step.id, step.task, step.when, step.timeout) == ("thumb", "thumbnail@^1.2", "inputs.image_count > 0", "5m")
    assert step.retry == types_pb2.RetryPolicy(
        max_attempts=3, initial_backoff="1s", max_backoff="1m", multiplier=2.0, jitter=0.2, retry_non_retryable=True
    )
    # As YAML's `gpu: true` / `zone: 3` / `weight: 1.0` give them (Rust prints 1.0 as "1").
    assert dict(step.labels) == {"gpu": "true", "fast": "true", "zone": "3", "weight": "1", "ratio": "0.5"}
    assert (step.slots, step.priority, step.concurrency_key, step.schedule_to_start_timeout) == (
        2, -5, "warehouse", "10m"
    )
    assert step.cache == types_pb2.CacheSpec(ttl="1h", key="inputs.image_count")
    assert not step.for_each and not step.workflow and not step.sleep
    assert not step.HasField("approval") and not step.HasField("wait_for")

    plain = Step.task("plain", "t").spec
    assert not plain.HasField("retry") and not plain.HasField("cache"), "absent, not empty"
    # A default policy is still a policy (YAML `retry: {}`), and a CacheSpec is taken as is.
    assert Step.task("a", "t", retry=Retry()).spec.HasField("retry")
    assert Step.task("a", "t", retry=types_pb2.RetryPolicy(max_attempts=4)).spec.retry.max_attempts == 4
    assert Step.task("a", "t", cache=types_pb2.CacheSpec(ttl="7d")).spec.cache == types_pb2.CacheSpec(ttl="7d")
    assert Step.task("a", "t", cache={"ttl": "7d"}).spec.cache == types_pb2.CacheSpec(ttl="7d")


def test_inputs_are_cel_text_and_other_values_their_json_text() -> None:
    step = Step.task(
        "a", "t",
        inputs={
            "expr": "inputs.room_id", "text": "'kitchen'", "n": 3, "f": 1.5, "b": False, "z": None, "list": [1, 2],
            "map": {"b": 2, "a": [1, "x"]}, "whole": 2.0, "tiny": 1e-5, "tinier": 1e-7, "big": 1e20,
        },
    ).spec
    assert dict(step.inputs) == {
        "expr": "inputs.room_id", "text": "'kitchen'", "n": "3", "f": "1.5", "b": "false", "z": "null",
        "list": "[1,2]", "map": '{"a":[1,"x"],"b":2}', "whole": "2.0", "tiny": "0.00001", "tinier": "1e-7",
        "big": "1e+20",
    }
    assert input_expression("size(x)") == "size(x)"
    assert input_expression({"é": "\n"}) == '{"é":"\\n"}'
    assert input_expression((1.0e15, 1.0e16, -0.0, 0.0)) == "[1000000000000000.0,1e+16,-0.0,0.0]"
    with pytest.raises(TypeError, match=r"step \"a\": input 'when'.*set"):
        Step.task("a", "t", inputs={"when": {1, 2}})
    with pytest.raises(ValueError, match="nan"):
        Step.task("a", "t", inputs={"x": float("nan")})


def test_map_child_workflow_sleep_approval_and_wait() -> None:
    wf = Workflow("w")
    fetch = wf.add(Step.task("fetch", "images.fetch@^1"))
    features = wf.add(
        Step.task("features", "features.extract@^1", needs=[fetch], for_each="fetch.images", max_parallel=4,
                  continue_on_failure=True, inputs={"image": "item", "position": "index"})
    )
    scan = wf.add(
        Step.workflow("scan", "scan-room@2", needs=[features], for_each="features", max_parallel=2,
                      continue_on_failure=True, inputs={"room": "inputs.room_id"}, when="size(features) > 0")
    )
    wf.add(Step.approval("review", message="Ship it?", timeout="24h", needs=[scan]))
    wf.add(Step.approval("bare"))
    wf.add(Step.sleep("nap", "10m", needs=["review"]))
    wf.add(Step.wait_for("paid", topic="payments", filter="event.room == inputs.room_id", timeout="1d"))
    steps = {step.id: step for step in wf.build().steps}
    assert list(steps) == ["fetch", "features", "scan", "review", "bare", "nap", "paid"], "in the order added"

    f = steps["features"]
    assert (f.for_each, f.max_parallel, f.continue_on_failure, list(f.needs)) == ("fetch.images", 4, True, ["fetch"])
    assert dict(f.inputs) == {"image": "item", "position": "index"}
    s = steps["scan"]
    assert (s.workflow, s.task, s.for_each, s.max_parallel, s.continue_on_failure, s.when) == (
        "scan-room@2", "", "features", 2, True, "size(features) > 0"
    )
    assert steps["review"].approval == types_pb2.ApprovalSpec(message="Ship it?", timeout="24h")
    assert steps["review"].timeout == "", "the approval's timeout, not an attempt's"
    assert steps["bare"].HasField("approval"), "an approval with nothing set is still an approval"
    assert (steps["nap"].sleep, list(steps["nap"].needs)) == ("10m", ["review"])
    assert steps["paid"].wait_for == types_pb2.WaitForSpec(
        topic="payments", filter="event.room == inputs.room_id", timeout="1d"
    )


def test_needs_by_handle_or_id_in_the_order_given() -> None:
    wf = Workflow("w")
    a, b, c = (wf.add(Step.task(name, "t")) for name in "abc")
    d = wf.add(Step.task("d", "t", needs=[c, "a", b]))
    assert list(d.spec.needs) == ["c", "a", "b"]
    assert list(wf.add(Step.sleep("e", "1s", needs=a)).spec.needs) == ["a"], "a single need"
    assert list(wf.add(Step.sleep("f", "1s", needs="d")).spec.needs) == ["d"], "not its letters"
    with pytest.raises(TypeError, match="needs takes Steps or step ids"):
        Step.task("g", "t", needs=[3])  # type: ignore[list-item]


def test_hooks_land_in_their_own_lists() -> None:
    wf = Workflow("w")
    wf.add(Step.task("work", "t"))
    assert wf.on_exit(Step.task("notify", "notify@^1", inputs={"state": "run.state"})).id == "notify"
    wf.on_success(Step.task("celebrate", "notify@^1"))
    wf.on_failure(Step.task("page", "pager@^1", inputs={"errors": "run.failed_steps"}))
    wf.on_failure(Step.sleep("cool_down", "1m"))
    spec = wf.build()
    assert [s.id for s in spec.steps] == ["work"]
    assert [s.id for s in spec.on_exit] == ["notify"]
    assert [s.id for s in spec.on_success] == ["celebrate"]
    assert [s.id for s in spec.on_failure] == ["page", "cool_down"]
    assert spec.on_exit[0].inputs["state"] == "run.state"


def test_build_gives_a_new_message_and_steps_do_not_change() -> None:
    wf = Workflow("w")
    step = Step.task("a", "t")
    wf.add(step)
    first = wf.build()
    first.steps[0].task = "changed"
    step.spec.task = "changed too"
    assert wf.build().steps[0].task == "t"
    assert wf.build() == wf.build()
    wf.add(Step.task("b", "t", needs=[step]))
    assert len(wf.build().steps) == 2 and len(first.steps) == 1


def test_the_builder_refuses_what_it_can_see() -> None:
    wf = Workflow("w")
    a = wf.add(Step.task("a", "t"))
    with pytest.raises(ValueError, match=r'^step "a": the id is used twice \(steps and hooks share ids\)$'):
        wf.add(Step.sleep("a", "1s"))
    with pytest.raises(ValueError, match=r'^step "a": the id is used twice'):
        wf.on_exit(Step.task("a", "t"))
    wf.on_success(Step.task("hook", "t"))
    with pytest.raises(ValueError, match=r'^step "hook": the id is used twice'):
        wf.add(Step.task("hook", "t"))
    with pytest.raises(ValueError, match=r'^step "b": needs "nope", which is not a step of this workflow$'):
        wf.add(Step.task("b", "t", needs=[a, "nope"]))
    # Needs by reference: a Step not added (yet) to this workflow, or a hook, is no step of it.
    later = Step.task("later", "t")
    with pytest.raises(ValueError, match=r'^step "b": needs "later"'):
        wf.add(Step.task("b", "t", needs=[later]))
    with pytest.raises(ValueError, match=r'^step "b": needs "hook"'):
        wf.add(Step.task("b", "t", needs=["hook"]))
    with pytest.raises(ValueError, match=r'^step "late_hook": an exit hook runs after the whole DAG and needs nothing$'):
        wf.on_failure(Step.task("late_hook", "t", needs=[a]))
    with pytest.raises(ValueError, match="^a step id is empty$"):
        wf.add(Step.task("", "t"))
    with pytest.raises(TypeError, match="expected a Step"):
        wf.add(types_pb2.StepSpec(id="raw"))  # type: ignore[arg-type]
    # A refused step leaves nothing behind: the ids it tried are still free.
    wf.add(Step.task("b", "t", needs=[a]))
    wf.on_failure(Step.task("late_hook", "t"))
    assert [s.id for s in wf.build().steps] == ["a", "b"]

    with pytest.raises(ValueError, match=r"input 'n': type 'integer' is not one of any, bool, int, list, number"):
        wf.input("n", "integer")  # type: ignore[arg-type]
    wf.input("n", "int")
    with pytest.raises(ValueError, match="input 'n' is declared twice"):
        wf.input("n", "string")
    with pytest.raises(ValueError, match=r'step "c": cache takes ttl and key, not tll'):
        Step.task("c", "t", cache={"tll": "1h"})
    with pytest.raises(TypeError, match=r"step \"c\": label 'gpu' must be a string, bool or number, not list"):
        Step.task("c", "t", labels={"gpu": ["yes"]})  # type: ignore[dict-item]


# Every construct of a workflow file; `built(name)` below is the same workflow in code. The
# numbers are written as YAML writes them and as Python does, which serialise differently
# (1e-05 vs 0.00001), so the content hash only matches when the builder writes them as the
# server's YAML parser does.
YAML = """
name: {name}
description: every construct of the workflow reference
continue_on_failure: true
inputs:
  room_id: {{type: string, description: the room}}
  image_count: {{type: int, default: 8}}
  tags: {{type: list, default: [a, b]}}
  meta: {{type: object, default: {{ratio: 1.5, nested: {{ok: true}}}}}}
  strict: {{type: bool, default: false}}
steps:
  - id: fetch
    task: images.fetch@^1
    inputs:
      room: inputs.room_id
      count: inputs.image_count
      fixed: 3
      flag: false
      none: null
      list: [1, 2]
      map: {{b: 2, a: [1, x]}}
      tiny: 0.00001
      tinier: 1.0e-7
      big: 1.0e+20
      whole: 2.0
      text: "'kitchen'"
    retry: {{max_attempts: 3, initial_backoff: 1s, max_backoff: 1m, multiplier: 3, jitter: 0.1, retry_non_retryable: true}}
    timeout: 5m
    labels: {{gpu: true, zone: 3, weight: 1.0, pool: fast}}
    slots: 2
    priority: 5
    concurrency_key: warehouse
    schedule_to_start_timeout: 10m
    cache: {{key: "inputs.room_id", ttl: 1h}}
  - id: features
    task: features.extract@^1
    needs: [fetch]
    for_each: fetch.images
    max_parallel: 4
    continue_on_failure: true
    inputs: {{image: item, position: index}}
    cache: {{ttl: 7d}}
  - id: scan
    workflow: scan-room@2
    needs: [features]
    when: "size(features) > 0"
    inputs: {{room: inputs.room_id, keypoints: features}}
  - id: scans
    workflow: scan-room
    needs: [fetch]
    for_each: fetch.images
    max_parallel: 2
    continue_on_failure: true
    inputs: {{image: item}}
  - id: review
    approval: {{message: Ship it?, timeout: 24h}}
    needs: [scan, scans]
  - id: nap
    sleep: 10m
    needs: [review]
  - id: paid
    wait_for: {{topic: payments, filter: "event.room == inputs.room_id", timeout: 1d}}
  - id: thumb
    task: thumbnail@^1.2
    needs: [paid, nap]
    when: inputs.image_count > 0
    retry: {{}}
on_exit:
  - id: notify
    task: notify@^1
    inputs: {{state: run.state}}
on_success:
  - {{id: celebrate, task: notify@^1}}
on_failure:
  - {{id: page, task: pager@^1, inputs: {{errors: run.failed_steps}}}}
"""


def built(name: str, *, max_parallel: int = 4) -> Workflow:
    wf = Workflow(name, description="every construct of the workflow reference", continue_on_failure=True)
    wf.input("room_id", "string", description="the room")
    wf.input("image_count", "int", default=8)
    wf.input("tags", "list", default=["a", "b"])
    wf.input("meta", "object", default={"ratio": 1.5, "nested": {"ok": True}})
    wf.input("strict", "bool", default=False)
    fetch = wf.add(
        Step.task(
            "fetch", "images.fetch@^1",
            inputs={
                "room": "inputs.room_id", "count": "inputs.image_count", "fixed": 3, "flag": False, "none": None,
                "list": [1, 2], "map": {"b": 2, "a": [1, "x"]}, "tiny": 1e-5, "tinier": 1e-7, "big": 1e20,
                "whole": 2.0, "text": "'kitchen'",
            },
            retry=Retry(max_attempts=3, initial_backoff="1s", max_backoff="1m", multiplier=3, jitter=0.1,
                        retry_non_retryable=True),
            timeout="5m",
            labels={"gpu": True, "zone": 3, "weight": 1.0, "pool": "fast"},
            slots=2, priority=5, concurrency_key="warehouse", schedule_to_start_timeout="10m",
            cache={"key": "inputs.room_id", "ttl": "1h"},
        )
    )
    features = wf.add(
        Step.task("features", "features.extract@^1", needs=[fetch], for_each="fetch.images",
                  max_parallel=max_parallel, continue_on_failure=True, inputs={"image": "item", "position": "index"},
                  cache={"ttl": "7d"})
    )
    scan = wf.add(
        Step.workflow("scan", "scan-room@2", needs=[features], when="size(features) > 0",
                      inputs={"room": "inputs.room_id", "keypoints": "features"})
    )
    scans = wf.add(
        Step.workflow("scans", "scan-room", needs=[fetch], for_each="fetch.images", max_parallel=2,
                      continue_on_failure=True, inputs={"image": "item"})
    )
    review = wf.add(Step.approval("review", "Ship it?", timeout="24h", needs=[scan, scans]))
    nap = wf.add(Step.sleep("nap", "10m", needs=[review]))
    wf.add(Step.wait_for("paid", "payments", filter="event.room == inputs.room_id", timeout="1d"))
    wf.add(Step.task("thumb", "thumbnail@^1.2", needs=["paid", nap], when="inputs.image_count > 0", retry=Retry()))
    wf.on_exit(Step.task("notify", "notify@^1", inputs={"state": "run.state"}))
    wf.on_success(Step.task("celebrate", "notify@^1"))
    wf.on_failure(Step.task("page", "pager@^1", inputs={"errors": "run.failed_steps"}))
    return wf


def apply_yaml(server: Server, path: Path) -> dict[str, Any]:
    """`dagmesh workflows apply FILE -o json`, with the server's admin token (DAGMESH_TOKEN)."""
    result = subprocess.run(
        [str(DAGMESH_BIN), "workflows", "apply", str(path), "--server", server.url, "-o", "json"],
        check=False, capture_output=True, text=True, timeout=STEP_TIMEOUT, env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    response: dict[str, Any] = json.loads(result.stdout)
    return response


def test_the_builder_gives_the_version_the_yaml_gives(server: Server, client: Client, tmp_path: Path, unique: str) -> None:
    name = f"py-builder-{unique}"
    path = tmp_path / "everything.yaml"
    path.write_text(textwrap.dedent(YAML.format(name=name)))
    from_yaml = apply_yaml(server, path)
    assert from_yaml["created"] is True
    version, content_hash = from_yaml["workflow"]["version"], from_yaml["workflow"]["content_hash"]
    assert version == 1 and content_hash

    spec = built(name).build()
    # Field by field what the server made of the YAML, so a difference names the field...
    stored = client.get_workflow(name, version).spec
    assert json_format.MessageToDict(stored) == json_format.MessageToDict(spec)
    assert stored == spec
    # ...and the server's dedup agrees: identical content is the existing version.
    same = client.apply_workflow(spec)
    assert (same.version, same.content_hash) == (version, content_hash)

    other = client.apply_workflow(built(name, max_parallel=5).build())
    assert other.version == version + 1 and other.content_hash != content_hash
    assert other.spec.steps[1].max_parallel == 5
    # The YAML file again: its content differs from the latest version now, so a new one.
    assert apply_yaml(server, path)["workflow"]["version"] == version + 2
