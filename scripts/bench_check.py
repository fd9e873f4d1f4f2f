"""Runs `dagmesh bench` scenarios and fails when one is far off what the hot path should do.

Usage: bench_check.py DAGMESH_BINARY. The bounds are generous (see scripts/test.sh): this
catches a regression of the hot path, not noise. Each result line is printed as JSON.
"""

import json
import subprocess
import sys

# scenario, extra arguments, field, bound, whether the value must stay below (else above) it
CHECKS = [
    ("chain", ["--repeat", "3"], "per_step_ms", 5.0, True),
    ("fanout", ["--repeat", "1"], "steps_per_s", 1500.0, False),
    ("runs", [], "p99_ms", 5000.0, True),
]


def main() -> int:
    binary = sys.argv[1]
    failures = []
    for scenario, extra, field, bound, below in CHECKS:
        out = subprocess.run(
            [binary, "bench", scenario, *extra, "-o", "json"],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        ).stdout
        report = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(report), flush=True)
        value = report[field]
        if (value > bound) if below else (value < bound):
            relation = "at most" if below else "at least"
            failures.append(f"{scenario}: {field} = {value:.3f}, expected {relation} {bound}")
    for failure in failures:
        print(f"error: hot-path benchmark regressed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
