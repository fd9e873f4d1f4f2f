"""Payloads (run inputs, step inputs and outputs) are `google.protobuf.Struct`; handlers and
clients see plain dicts.

Numbers: a `Struct` holds every number as a double, so `3` and `3.0` look the same on the wire.
`to_dict` turns a whole-number double within +/-2**53 back into an `int` (so a JSON `3` stays
`3` after a round trip, as in the Rust SDK); other doubles stay `float`. The price is that a
`3.0` written by the other side also reads as `3`. Integers beyond 2**53 lose precision, as in
every protobuf JSON mapping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

__all__ = ["MAX_PAYLOAD_DEPTH", "check_depth", "from_value", "to_dict", "to_struct", "to_value"]

_MAX_EXACT = 2**53

MAX_PAYLOAD_DEPTH = 20
"""Nesting depth of a payload, in JSON levels (`{"a": {"b": 1}}` has depth 2): the contract's
limit (`proto/src/limits.rs`, keep in step), well below what protobuf decoders accept."""


def check_depth(field: str, struct: struct_pb2.Struct, limit: int = MAX_PAYLOAD_DEPTH) -> str | None:
    """None if `struct` is nested at most `limit` levels deep, else an error naming where, e.g.
    `outputs.a.b[3].c: nested deeper than the limit of 20 levels`. Iterative, so that no depth
    can overflow the stack here."""
    stack: list[tuple[Any, int, str]] = [(struct, 1, field)]
    while stack:
        item, depth, path = stack.pop()
        if depth > limit:
            return f"{path}: nested deeper than the limit of {limit} levels"
        if isinstance(item, struct_pb2.Struct):
            children = ((f"{path}.{key}", value) for key, value in item.fields.items())
        else:
            children = ((f"{path}[{i}]", value) for i, value in enumerate(item.values))
        for child_path, value in children:
            kind = value.WhichOneof("kind")
            if kind == "struct_value":
                stack.append((value.struct_value, depth + 1, child_path))
            elif kind == "list_value":
                stack.append((value.list_value, depth + 1, child_path))
    return None


def to_struct(data: Mapping[str, Any] | None) -> struct_pb2.Struct:
    """A dict of JSON-like values (dict, list, tuple, str, int, float, bool, None) as a Struct.

    Raises `TypeError` naming the path of a value that has no JSON form.
    """
    struct = struct_pb2.Struct()
    if data is None:
        return struct
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a dict, got {type(data).__name__}")
    _fill_struct(struct, data, "")
    return struct


def to_value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    _fill_value(out, value, "")
    return out


def _fill_struct(struct: struct_pb2.Struct, data: Mapping[Any, Any], path: str) -> None:
    for key, value in data.items():
        if not isinstance(key, str):
            raise TypeError(f"{path or 'payload'}: key {key!r} is not a string")
        _fill_value(struct.fields[key], value, f"{path}.{key}" if path else key)


def _fill_value(out: struct_pb2.Value, value: Any, path: str) -> None:
    if value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, (int, float)):
        out.number_value = float(value)
    elif isinstance(value, str):
        out.string_value = value
    elif isinstance(value, Mapping):
        _fill_struct(out.struct_value, value, path)
        if not value:
            out.struct_value.SetInParent()
    elif isinstance(value, (list, tuple)):
        items = out.list_value
        items.SetInParent()
        for i, item in enumerate(value):
            _fill_value(items.values.add(), item, f"{path}[{i}]")
    else:
        raise TypeError(f"{path or 'payload'}: {type(value).__name__} has no JSON form")


def to_dict(struct: struct_pb2.Struct | None) -> dict[str, Any]:
    """A Struct as a dict; an absent Struct is `{}`. See the module doc about numbers."""
    if struct is None:
        return {}
    return {key: from_value(value) for key, value in struct.fields.items()}


def from_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) < _MAX_EXACT:
            return int(number)
        return number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return to_dict(value.struct_value)
    if kind == "list_value":
        return [from_value(item) for item in value.list_value.values]
    return None
