"""Generated from proto/dagmesh/v1 by scripts/generate.py. Do not edit."""
