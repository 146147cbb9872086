"""Running one load-generator process and keeping the median of repeated runs."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_loadgen(spec: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
    """Run the load generator as its own process; its JSON result, or {"error": ...}."""
    limit = timeout or spec.get("hard_timeout", 600) + 30
    spec = {**spec, "hard_timeout": limit - 20}
    try:
        done = subprocess.run([sys.executable, "-m", "forge_streaming_bench.loadgen", json.dumps(spec)],
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"load generator did not finish in {limit:.0f}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": f"load generator exited {done.returncode}: {done.stderr.strip()[-500:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``key`` among runs that delivered something.

    ``runs`` counts those, ``empty_runs`` the others; lost and out-of-order
    are the worst over every run, so a run that delivered nothing still shows.
    """
    good = [r for r in runs if "error" not in r and r.get("received", 1) > 0]
    if not good:
        last = runs[-1] if runs else {}
        return {"error": last.get("error") or f"nothing delivered in {len(runs)} run(s) "
                f"({last.get('expected', 0):,} expected per run; no progress for 5 s)"}
    good.sort(key=lambda r: r[key])
    chosen = dict(good[len(good) // 2])
    chosen["runs"] = len(good)
    chosen["empty_runs"] = len(runs) - len(good)
    chosen["lost"] = max(r.get("lost", 0) for r in runs if "error" not in r)
    chosen["out_of_order"] = max(r.get("out_of_order", 0) for r in runs if "error" not in r)
    return chosen
