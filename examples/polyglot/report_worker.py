"""The Python step of the polyglot demo: turns the C++ tool's mesh statistics into a report.

    python examples/polyglot/report_worker.py --server http://127.0.0.1:7070
"""

from __future__ import annotations

import argparse

from dagmesh import TaskContext, Worker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    args = parser.parse_args()

    worker = Worker(server=args.server, name="polyglot-python", slots=2)

    @worker.task("poly.report", version="1.0.0")
    def report(ctx: TaskContext, inputs: dict) -> dict:
        before = float(inputs["roughness_before"])
        after = float(inputs["roughness_after"])
        ctx.progress(0.5, "comparing roughness")
        improvement = 0.0 if before == 0 else (before - after) / before
        summary = (
            f"scan {inputs['scan_id']}: {inputs['vertices']} vertices smoothed on "
            f"{inputs['backend']}, roughness down {improvement:.1%} (written in Python)"
        )
        ctx.log(summary)
        return {"summary": summary, "improvement": round(improvement, 4)}

    worker.run()  # until SIGTERM, then drains


if __name__ == "__main__":
    main()
