"""The checked-in gRPC code must match what scripts/generate.py makes from proto/ now."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

SDK = Path(__file__).resolve().parents[1]


def load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dagmesh_generate", SDK / "scripts" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_code_is_fresh() -> None:
    generate = load_generate()
    stale = generate.stale_files()
    assert stale == [], f"generated code is stale, run `python sdk/python/scripts/generate.py`: {stale}"


def test_a_proto_change_makes_it_stale(tmp_path: Path) -> None:
    generate = load_generate()
    protos = tmp_path / "proto"
    shutil.copytree(generate.PROTO_DIR / "dagmesh", protos / "dagmesh")
    worker_proto = protos / "dagmesh" / "v1" / "worker.proto"
    worker_proto.write_text(worker_proto.read_text() + "\nmessage AddedLater { string field = 1; }\n")

    assert generate.stale_files(proto_dir=protos) == ["worker_pb2.py", "worker_pb2.pyi"]


def test_generated_imports_resolve_inside_the_package() -> None:
    from dagmesh._proto.v1 import run_pb2, worker_pb2_grpc

    text = (SDK / "src" / "dagmesh" / "_proto" / "v1" / "run_pb2.py").read_text()
    assert "from dagmesh.v1 import" not in text
    assert run_pb2.WatchRunRequest.DESCRIPTOR.full_name == "dagmesh.v1.WatchRunRequest"
    assert worker_pb2_grpc.WorkerServiceStub is not None
