#!/usr/bin/env python3
"""Regenerates the checked-in gRPC code of the Python SDK from `proto/`.

    python sdk/python/scripts/generate.py            # rewrite src/dagmesh/_proto/v1/
    python sdk/python/scripts/generate.py --check    # exit 1 if the checked-in code is stale

Needs the pinned `grpcio-tools` (`pip install ./sdk/python[test]`): its version is stamped into
the generated code, so another version makes the check fail even when the protos did not change.

`protoc` writes `from dagmesh.v1 import types_pb2`, after the proto package. In this SDK
`dagmesh` is the Python package itself, so those imports are rewritten to
`dagmesh._proto.v1`, where the modules live.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SDK_DIR = Path(__file__).resolve().parent.parent
PROTO_DIR = (SDK_DIR / ".." / ".." / "proto").resolve()
OUT_DIR = SDK_DIR / "src" / "dagmesh" / "_proto" / "v1"
PROTO_PACKAGE_DIR = Path("dagmesh") / "v1"
PYTHON_PACKAGE = "dagmesh._proto.v1"

_IMPORT = re.compile(r"^(from|import) dagmesh\.v1(\b)", re.MULTILINE)
_INIT = '"""Generated from proto/dagmesh/v1 by scripts/generate.py. Do not edit."""\n'


def _protoc(proto_dir: Path, out: Path) -> None:
    from importlib import resources

    # The well-known types (google/protobuf/struct.proto...) ship inside grpc_tools.
    well_known = resources.files("grpc_tools") / "_proto"
    protos = sorted(str(p.relative_to(proto_dir)) for p in (proto_dir / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {proto_dir / PROTO_PACKAGE_DIR}")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=proto_dir)


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Writes the generated modules, imports rewritten, into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dagmesh-protoc-") as tmp:
        raw = Path(tmp)
        _protoc(proto_dir, raw)
        written = []
        for source in sorted((raw / PROTO_PACKAGE_DIR).iterdir()):
            if source.suffix not in (".py", ".pyi"):
                continue
            text = _IMPORT.sub(rf"\1 {PYTHON_PACKAGE}\2", source.read_text())
            target = out_dir / source.name
            target.write_text(text)
            written.append(target)
    init = out_dir / "__init__.py"
    init.write_text(_INIT)
    written.append(init)
    return sorted(written)


def stale_files(checked_in: Path = OUT_DIR, proto_dir: Path = PROTO_DIR) -> list[str]:
    """Names of files that differ between a fresh generation and `checked_in` (empty if fresh)."""
    with tempfile.TemporaryDirectory(prefix="dagmesh-generated-") as tmp:
        fresh_dir = Path(tmp)
        generate(fresh_dir, proto_dir)
        fresh = {p.name: p.read_bytes() for p in fresh_dir.iterdir() if p.is_file()}
    current = {
        p.name: p.read_bytes()
        for p in checked_in.iterdir()
        if p.is_file() and p.suffix in (".py", ".pyi")
    } if checked_in.is_dir() else {}
    names = sorted(set(fresh) | set(current))
    return [name for name in names if fresh.get(name) != current.get(name)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report whether the checked-in code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("generated code is stale; run sdk/python/scripts/generate.py:", *stale, sep="\n  ")
            return 1
        print("generated code is up to date")
        return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    for path in generate(OUT_DIR):
        print(path.relative_to(SDK_DIR))
    return 0


if __name__ == "__main__":
    sys.exit(main())
