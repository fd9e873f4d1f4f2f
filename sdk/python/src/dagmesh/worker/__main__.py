"""`python -m dagmesh.worker MODULE:ATTRIBUTE [--server URL] ...` runs a worker defined in a module."""

from __future__ import annotations

import sys

from dagmesh._cli import run_worker_main

if __name__ == "__main__":
    sys.exit(run_worker_main())
