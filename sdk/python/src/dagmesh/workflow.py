"""Workflows in code: a typed builder that produces the same `WorkflowSpec` a YAML workflow file
does, for `Client.apply_workflow` or `Client.submit(spec=...)`.

    from dagmesh.workflow import Retry, Step, Workflow

    wf = Workflow("room-scan", description="Photos of a room to a mesh")
    wf.input("room_id", "string", description="the room")
    wf.input("image_count", "int", default=8)
    fetch = wf.add(Step.task("fetch", "images.fetch@^1", inputs={"room": "inputs.room_id"}))
    features = wf.add(Step.task("features", "features.extract@^1", needs=[fetch],
                                for_each="fetch.images", max_parallel=4, inputs={"image": "item"}))
    mesh = wf.add(Step.workflow("mesh", "mesh-room@2", needs=[features]))
    wf.add(Step.approval("review", "Ship the mesh?", timeout="24h", needs=[mesh]))
    wf.on_exit(Step.task("notify", "notify@^1", inputs={"state": "run.state"}))
    client.apply_workflow(wf.build())

`Workflow.add` returns the step, which later steps name in `needs=` (a step id as text works
too): a dependency must be on a step already added, so a misspelt id fails where it is
written. Expressions (`inputs`, `when`, `for_each`, filters, cache keys) are CEL text, as in
YAML; the server checks them, and its limits, with field paths when the workflow is applied.
Step inputs that are not strings become their JSON text, as in YAML (`3` is the expression
`3`, `[1, 2]` is `[1,2]`), so the same workflow written either way has the same content hash
and applying it again returns the existing version. The Rust SDK's builder
(`dagmesh_sdk::workflow`) refuses the same step mistakes with the same messages (it at `build`,
this one at `add`, so here a need must be added before the step that names it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Union

from dagmesh._proto.v1 import types_pb2
from dagmesh.payload import to_value

__all__ = ["INPUT_TYPES", "InputType", "Retry", "Step", "Workflow", "input_expression"]

InputType = Literal["string", "int", "number", "bool", "list", "object", "any"]
INPUT_TYPES: frozenset[str] = frozenset({"string", "int", "number", "bool", "list", "object", "any"})
"""The types a declared run input may have (`InputSpec.type`)."""

Need = Union["Step", str]
"""A step this one needs: the `Step` that `Workflow.add` returned, or its id."""

CacheLike = Union[Mapping[str, str], types_pb2.CacheSpec]
"""`{"ttl": "1h"}` or `{"ttl": "1h", "key": "<CEL>"}`, or a `CacheSpec`."""

_CACHE_KEYS = frozenset({"ttl", "key"})


@dataclasses.dataclass(frozen=True)
class Retry:
    """A retry policy (`StepSpec.retry`). Fields left at their zero value take the server's
    defaults: one attempt, backoff from 1s to 5m, multiplier 2.0, jitter 0.2."""

    max_attempts: int = 0
    """Total attempts, the first included; 0 or 1 means no retry."""
    initial_backoff: str = ""
    max_backoff: str = ""
    multiplier: float = 0.0
    jitter: float = 0.0
    retry_non_retryable: bool = False
    """Retry failures that the worker marked non-retryable too."""

    def to_proto(self) -> types_pb2.RetryPolicy:
        return types_pb2.RetryPolicy(
            max_attempts=self.max_attempts,
            initial_backoff=self.initial_backoff,
            max_backoff=self.max_backoff,
            multiplier=self.multiplier,
            jitter=self.jitter,
            retry_non_retryable=self.retry_non_retryable,
        )


class Step:
    """One step: a task, a child workflow, a sleep, an approval or a wait for an event. Made by
    the class methods below and given to `Workflow.add` (or a hook method)."""

    __slots__ = ("_spec",)

    def __init__(self, spec: types_pb2.StepSpec) -> None:
        """Wraps a `StepSpec` as is (a copy of it), for fields the class methods do not take."""
        self._spec = types_pb2.StepSpec()
        self._spec.CopyFrom(spec)

    @property
    def id(self) -> str:
        return self._spec.id

    @property
    def spec(self) -> types_pb2.StepSpec:
        """The step as the protocol has it (a copy: the step itself does not change)."""
        copy = types_pb2.StepSpec()
        copy.CopyFrom(self._spec)
        return copy

    def __repr__(self) -> str:
        return f"Step({self._spec.id!r})"

    @classmethod
    def task(
        cls,
        id: str,
        task: str,
        *,
        needs: Iterable[Need] | Need | None = None,
        inputs: Mapping[str, Any] | None = None,
        when: str = "",
        retry: Retry | types_pb2.RetryPolicy | None = None,
        timeout: str = "",
        labels: Mapping[str, str | bool | int | float] | None = None,
        slots: int = 0,
        priority: int = 0,
        concurrency_key: str = "",
        schedule_to_start_timeout: str = "",
        cache: CacheLike | None = None,
        for_each: str = "",
        max_parallel: int = 0,
        continue_on_failure: bool = False,
    ) -> Step:
        """Runs `task` ("name" or "name@<semver requirement>", e.g. "thumbnail@^1.2") on a
        worker. `timeout` bounds one attempt; `labels` are what the worker must carry (bools
        and numbers become their text, as in YAML); `cache` memoizes the task for its `ttl`.
        With `for_each` (a CEL list) the step is a map: one task per element, whose inputs may
        read `item` and `index`."""
        spec = _base(id, needs, inputs, when)
        spec.task = task
        if retry is not None:
            spec.retry.CopyFrom(retry.to_proto() if isinstance(retry, Retry) else retry)
        spec.timeout = timeout
        for key, value in (labels or {}).items():
            spec.labels[key] = _label_text(id, key, value)
        spec.slots = slots
        spec.priority = priority
        spec.concurrency_key = concurrency_key
        spec.schedule_to_start_timeout = schedule_to_start_timeout
        if cache is not None:
            spec.cache.CopyFrom(_cache(id, cache))
        _map(spec, for_each, max_parallel, continue_on_failure)
        return cls(spec)

    @classmethod
    def workflow(
        cls,
        id: str,
        workflow: str,
        *,
        needs: Iterable[Need] | Need | None = None,
        inputs: Mapping[str, Any] | None = None,
        when: str = "",
        for_each: str = "",
        max_parallel: int = 0,
        continue_on_failure: bool = False,
    ) -> Step:
        """Starts a child run of `workflow` ("name": its latest version when the step starts, or
        "name@3") with `inputs` as its run inputs, and ends with it. With `for_each`, one child
        run per element. The workflow need not exist yet when this one is applied."""
        spec = _base(id, needs, inputs, when)
        spec.workflow = workflow
        _map(spec, for_each, max_parallel, continue_on_failure)
        return cls(spec)

    @classmethod
    def sleep(
        cls,
        id: str,
        duration: str,
        *,
        needs: Iterable[Need] | Need | None = None,
        inputs: Mapping[str, Any] | None = None,
        when: str = "",
    ) -> Step:
        """Waits `duration` ("10m"), durably: the wake-up time survives executor restarts."""
        spec = _base(id, needs, inputs, when)
        spec.sleep = duration
        return cls(spec)

    @classmethod
    def approval(
        cls,
        id: str,
        message: str = "",
        *,
        timeout: str = "",
        needs: Iterable[Need] | Need | None = None,
        inputs: Mapping[str, Any] | None = None,
        when: str = "",
    ) -> Step:
        """Waits until someone approves or denies the step (`dagmesh runs approve|deny`);
        `message` is what they are asked. Empty `timeout`: it waits for ever."""
        spec = _base(id, needs, inputs, when)
        # Set even when empty: an approval with no message and no timeout is still an approval.
        spec.approval.SetInParent()
        spec.approval.message = message
        spec.approval.timeout = timeout
        return cls(spec)

    @classmethod
    def wait_for(
        cls,
        id: str,
        topic: str,
        *,
        filter: str = "",
        timeout: str = "",
        needs: Iterable[Need] | Need | None = None,
        inputs: Mapping[str, Any] | None = None,
        when: str = "",
    ) -> Step:
        """Waits for an event published on `topic` that `filter` (CEL over `event`, `inputs`
        and upstream steps) accepts; its outputs are the event's payload. Empty `timeout`: it
        waits for ever."""
        spec = _base(id, needs, inputs, when)
        spec.wait_for.SetInParent()
        spec.wait_for.topic = topic
        spec.wait_for.filter = filter
        spec.wait_for.timeout = timeout
        return cls(spec)


class Workflow:
    """A workflow being built: steps in the order added, needs in the order given, hooks in
    their own lists. `build()` gives the `WorkflowSpec`."""

    def __init__(self, name: str, *, description: str = "", continue_on_failure: bool = False) -> None:
        """`continue_on_failure`: independent branches keep running after a step fails for good
        (the run still ends FAILED)."""
        self.name = name
        self.description = description
        self.continue_on_failure = continue_on_failure
        self._inputs: dict[str, types_pb2.InputSpec] = {}
        self._steps: list[Step] = []
        self._on_exit: list[Step] = []
        self._on_success: list[Step] = []
        self._on_failure: list[Step] = []
        self._ids: set[str] = set()
        self._step_ids: set[str] = set()

    def input(self, name: str, type: InputType, *, default: Any = None, description: str = "") -> Workflow:
        """Declares run input `name` of `type` ("string", "int", "number", "bool", "list",
        "object" or "any"). `default` is any JSON value; without one (None) the input is
        required, as `default: null` is in YAML. Returns the workflow, for chaining."""
        if type not in INPUT_TYPES:
            raise ValueError(f"input {name!r}: type {type!r} is not one of {', '.join(sorted(INPUT_TYPES))}")
        if name in self._inputs:
            raise ValueError(f"input {name!r} is declared twice")
        spec = types_pb2.InputSpec(type=type, description=description)
        if default is not None:
            spec.default.CopyFrom(to_value(default))
        self._inputs[name] = spec
        return self

    def add(self, step: Step) -> Step:
        """Adds a step and returns it, for later steps' `needs=`. Raises `ValueError` naming the
        step when its id is empty or already used (steps and hooks share ids), or when it
        needs a step not added to this workflow before it."""
        self._check_id(step)
        for need in step._spec.needs:
            if need not in self._step_ids:
                raise ValueError(f"step {_quote(step.id)}: needs {_quote(need)}, which is not a step of this workflow")
        self._ids.add(step.id)
        self._step_ids.add(step.id)
        self._steps.append(step)
        return step

    def on_exit(self, step: Step) -> Step:
        """A hook that runs after the DAG has ended, whatever the outcome. Hooks may read every
        step's outputs and `run` (`run.state`, `run.failed_steps`...)."""
        return self._hook(self._on_exit, step)

    def on_success(self, step: Step) -> Step:
        """A hook that runs after the DAG has succeeded (skipped otherwise)."""
        return self._hook(self._on_success, step)

    def on_failure(self, step: Step) -> Step:
        """A hook that runs after the DAG has failed (skipped otherwise)."""
        return self._hook(self._on_failure, step)

    def build(self) -> types_pb2.WorkflowSpec:
        """The spec: a new message each call, so it can be changed without touching the builder."""
        spec = types_pb2.WorkflowSpec(
            name=self.name, description=self.description, continue_on_failure=self.continue_on_failure
        )
        for name, input_spec in self._inputs.items():
            spec.inputs[name].CopyFrom(input_spec)
        for target, steps in (
            (spec.steps, self._steps),
            (spec.on_exit, self._on_exit),
            (spec.on_success, self._on_success),
            (spec.on_failure, self._on_failure),
        ):
            for step in steps:
                target.add().CopyFrom(step._spec)
        return spec

    def _check_id(self, step: Step) -> None:
        if not isinstance(step, Step):
            raise TypeError(f"expected a Step, got {type(step).__name__}")
        if not step.id:
            raise ValueError("a step id is empty")
        if step.id in self._ids:
            raise ValueError(f"step {_quote(step.id)}: the id is used twice (steps and hooks share ids)")

    def _hook(self, hooks: list[Step], step: Step) -> Step:
        self._check_id(step)
        if step._spec.needs:
            raise ValueError(f"step {_quote(step.id)}: an exit hook runs after the whole DAG and needs nothing")
        self._ids.add(step.id)
        hooks.append(step)
        return step


def _base(
    id: str, needs: Iterable[Need] | Need | None, inputs: Mapping[str, Any] | None, when: str
) -> types_pb2.StepSpec:
    """The fields every kind of step has."""
    spec = types_pb2.StepSpec(id=id, when=when)
    if isinstance(needs, (Step, str)):
        needs = [needs]
    for need in needs or ():
        if isinstance(need, Step):
            spec.needs.append(need.id)
        elif isinstance(need, str):
            spec.needs.append(need)
        else:
            raise TypeError(f"step {_quote(id)}: needs takes Steps or step ids, not {type(need).__name__}")
    for name, value in (inputs or {}).items():
        spec.inputs[name] = input_expression(value, f"step {_quote(id)}: input {name!r}")
    return spec


def _map(spec: types_pb2.StepSpec, for_each: str, max_parallel: int, continue_on_failure: bool) -> None:
    spec.for_each = for_each
    spec.max_parallel = max_parallel
    spec.continue_on_failure = continue_on_failure


def _cache(step_id: str, cache: CacheLike) -> types_pb2.CacheSpec:
    if isinstance(cache, types_pb2.CacheSpec):
        return cache
    unknown = set(cache) - _CACHE_KEYS
    if unknown:
        raise ValueError(f"step {_quote(step_id)}: cache takes ttl and key, not {', '.join(sorted(unknown))}")
    return types_pb2.CacheSpec(ttl=cache.get("ttl", ""), key=cache.get("key", ""))


def _quote(text: str) -> str:
    """A step id in an error message, quoted as the Rust SDK's messages quote it."""
    return json.dumps(text, ensure_ascii=False)


def input_expression(value: Any, what: str = "input") -> str:
    """A step input as the CEL text YAML would give it: a string is the expression itself;
    anything else (number, bool, None, list, dict) is its compact JSON text, which CEL reads as
    the same literal. Dict keys are sorted and floats written as the Rust parser writes them,
    so that the text, and the workflow's content hash, are the same as from YAML."""
    if isinstance(value, str):
        return value
    return _json_text(value, what)


def _json_text(value: Any, path: str) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} has no JSON form")
        return _float_json(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{path}: key {key!r} is not a string")
        items = sorted(value.items())
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_json_text(v, f'{path}.{k}')}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json_text(item, f"{path}[{i}]") for i, item in enumerate(value)) + "]"
    raise TypeError(f"{path}: {type(value).__name__} has no JSON form")


def _digits(value: float) -> tuple[str, str, int]:
    """(sign, shortest round-trip digits without leading or trailing zeros, position of the
    decimal point from the first digit) of a finite float: 0.0125 is ("", "125", -1)."""
    text = repr(value)
    sign = "-" if text.startswith("-") else ""
    mantissa, _, exponent = text.lstrip("-").partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    return sign, stripped.rstrip("0"), point


def _positional(digits: str, point: int) -> str:
    if len(digits) <= point:
        return digits + "0" * (point - len(digits))
    if point > 0:
        return f"{digits[:point]}.{digits[point:]}"
    return "0." + "0" * -point + digits


def _float_json(value: float) -> str:
    """A float as serde_json (the YAML parser's JSON) writes it: positional for decimal
    exponents -5..15 ("1.0", "0.00001", "1000000000000000.0"), else "1.5e+20" or "1e-7".
    Python's repr writes "1e-05" and "1e-07" there, which would change the content hash."""
    sign, digits, point = _digits(value)
    if not digits:
        return sign + "0.0"
    exponent = point - 1
    if -5 <= exponent <= 15:
        text = _positional(digits, point)
        return sign + (text + ".0" if len(digits) <= point else text)
    mantissa = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'+' if exponent >= 0 else '-'}{abs(exponent)}"


def _label_text(step_id: str, key: str, value: Any) -> str:
    """A label value: a string as is; a bool or number as its text, as YAML's `gpu: true`
    gives "true" (numbers as Rust prints them: 1.0 is "1", never an exponent)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        sign, digits, point = _digits(value)
        return sign + (_positional(digits, point) if digits else "0")
    raise TypeError(f"step {_quote(step_id)}: label {key!r} must be a string, bool or number, not {type(value).__name__}")
