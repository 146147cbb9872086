"""``python -m forge_streaming_bench``: run the cases, write BENCHMARKS.md and benchmarks.png.

Presets (every figure can also be set alone):

- ``--quick``: N = 100, small bursts, one run each, 1,000 idle connections (about 2 minutes);
- default: N = 100 and 1,000, five runs each, 10,000 idle connections (the ``make bench`` run);
- ``--full``: adds N = 10,000 and the 50,000-connection capacity case.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import cases as case_module
from . import machine, procstat, report

PRESETS: dict[str, dict[str, Any]] = {  # fields of cases.Options
    "quick": {"sizes": [100], "deliveries": 40_000, "repeats": 1, "echo_pairs": 50, "echo_rounds": 20,
              "idle_connections": 1_000, "capacity_target": 0, "probe_messages": 100,
              "paced_seconds": 1.0},
    "default": {"sizes": [100, 1000], "deliveries": 200_000, "repeats": 5, "echo_pairs": 200, "echo_rounds": 50,
                "idle_connections": 10_000, "capacity_target": 0, "probe_messages": 200,
                "paced_seconds": 2.0},
    "full": {"sizes": [100, 1000, 10_000], "deliveries": 400_000, "repeats": 3, "echo_pairs": 500,
             "echo_rounds": 50, "idle_connections": 10_000, "capacity_target": 50_000, "probe_messages": 400,
             "paced_seconds": 3.0},
}
ALL_CASES = ["fanout", "paced", "echo", "memory", "capacity", "sse", "webtransport", "mqtt", "nats", "workers",
             "startup"]


def _ints(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m forge_streaming_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="small and fast: a check that everything runs")
    preset.add_argument("--full", action="store_true", help="adds N = 10,000 and 50,000 connections")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, from {ALL_CASES}")
    parser.add_argument("--servers", default="ours,websockets,starlette,socketio,node-ws,sse-starlette",
                        help="which servers to run (ours is the ratio base; keep it in)")
    parser.add_argument("--sizes", type=_ints, help="fan-out room sizes N, e.g. 100,1000")
    parser.add_argument("--deliveries", type=int, help="deliveries per burst (M = deliveries / N, 10..2000)")
    parser.add_argument("--repeats", type=int, help="runs per figure; the median is reported")
    parser.add_argument("--paced-seconds", type=float, dest="paced_seconds",
                        help="length of one paced fan-out run in seconds (messages = seconds / pace)")
    parser.add_argument("--idle-connections", type=int, help="connections for the idle memory case")
    parser.add_argument("--capacity", type=int, dest="capacity_target", help="connections the capacity case aims at")
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--plot", type=Path, help="PNG path (default: benchmarks.png next to --output)")
    parser.add_argument("--workdir", type=Path, help="server logs and configs (default: a temporary directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full" if args.full else "default"]
    overrides: dict[str, Any] = {key: getattr(args, key)
                                 for key in ("sizes", "deliveries", "repeats", "idle_connections", "capacity_target",
                                             "paced_seconds")
                                 if getattr(args, key) is not None}
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(wanted) - set(ALL_CASES))
    if unknown:
        print(f"unknown case(s) {unknown}; choose from {ALL_CASES}", file=sys.stderr)
        return 2
    soft, hard = procstat.raise_fd_limit()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="forge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    opts = dataclasses.replace(case_module.Options(servers=[s.strip() for s in args.servers.split(",")],
                                                   workdir=workdir, fd_limit=soft, **preset), **overrides)
    skipped: dict[str, str] = {}
    if "capacity" in wanted and not opts.capacity_target:
        wanted.remove("capacity")
        skipped["Concurrent connections on one node"] = "run with --full (or --capacity 50000)"
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python -m forge_streaming_bench" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                                    if (argv if argv is not None else sys.argv[1:]) else "")
    started = time.monotonic()
    results: dict[str, case_module.Case] = {}
    for name in wanted:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results[name] = case_module.CASES[name](opts)
        print(f"[bench] {name} done in {results[name].seconds:.0f}s", file=sys.stderr, flush=True)
    png = args.plot or args.output.with_name("benchmarks.png")
    plot_note = report.plot(results, png)
    settings = [
        f"sizes N: {opts.sizes}; about {opts.deliveries:,} deliveries per burst; {opts.repeats} run(s) per figure",
        f"RLIMIT_NOFILE in force: soft {soft:,}, hard {hard:,}",
        f"total time: {time.monotonic() - started:.0f} s; server logs in {workdir}",
    ]
    report.write(args.output, png, results, command=command, date=date, machine=machine.describe(),
                 settings=settings, plot_note=plot_note, skipped=skipped)
    print(f"[bench] wrote {args.output}" + ("" if plot_note else f" and {png}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
