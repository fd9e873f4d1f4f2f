"""Code generated from `proto/` (see `scripts/generate.py`); import it as `dagmesh.v1`."""
