"""Startup: from process start to the first HTTP 200, ours beside a minimal uvicorn + Starlette app.

``forge-streaming serve --port P`` (every installed plugin, default config)
and ``uvicorn app:app --port Q`` (one Starlette route) are started in turn,
alternating, ``rounds`` times each; each start is timed from just before
``Popen`` to the first 200 on ``/healthz`` (ours) or ``/`` (the minimal app),
polled every few milliseconds, and the process is then killed by PID. The
figures are the median of each side and the ratio ours / minimal (also the
median of the rounds' own ratios, as both sides of a round see the same
machine state). ``import_profile`` runs ``python -X importtime`` and says
where import time goes.

Run alone: ``python -m forge_streaming_bench.startup [--rounds 5] [--importtime]``;
in the suite: ``python -m forge_streaming_bench --cases startup``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forge_streaming.testing import free_port

if TYPE_CHECKING:
    from .cases import Case, Options

ROUNDS = 5
TARGET = 1.5  # issue 19: at most 1.5x a minimal uvicorn + Starlette app
MINIMAL_APP = '''\
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def index(request):
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", index)])
'''


def _script(name: str) -> list[str]:
    """The console script ``name`` of this interpreter's environment, else ``python -m name``."""
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else [sys.executable, "-m", name.replace("-", "_")]


def commands(workdir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command with ``{port}``, path answered with 200 once ready)."""
    (workdir / "app.py").write_text(MINIMAL_APP)
    return {
        "ours": ([*_script("forge-streaming"), "serve", "--host", "127.0.0.1", "--port", "{port}"], "/healthz"),
        "minimal": ([*_script("uvicorn"), "app:app", "--host", "127.0.0.1", "--port", "{port}",
                     "--app-dir", str(workdir), "--log-level", "warning"], "/"),
    }


def _status(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def time_to_200(command: list[str], path: str, workdir: Path, *, timeout: float = 30.0,
                poll: float = 0.002) -> float:
    """Seconds from starting ``command`` (``{port}`` filled in) to its first 200 on ``path``; killed after."""
    port = free_port()
    argv = [part.replace("{port}", str(port)) for part in command]
    # Bytecode as a deployed server has it: with PYTHONDONTWRITEBYTECODE (set on some machines) our editable
    # source would be compiled again at every start while the peer's site-packages are compiled once; the
    # cache goes to the work directory (PYTHONPYCACHEPREFIX), and measure() warms it first.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FORGE_STREAMING") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(workdir / "pycache")
    log = (workdir / f"startup-{port}.log").open("wb")
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    try:
        while True:
            elapsed = time.perf_counter() - started
            if _status(port, path) == 200:
                return time.perf_counter() - started
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode} before answering 200 on {path}")
            if elapsed > timeout:
                raise TimeoutError(f"no 200 on {path} after {timeout:.0f} s")
            time.sleep(poll)
    finally:
        proc.kill()
        proc.wait(10)
        log.close()


def measure(workdir: Path, rounds: int = ROUNDS) -> dict[str, Any]:
    """Alternate ours and the minimal app ``rounds`` times (the order flips each round); medians and ratios."""
    cmds = commands(workdir)
    for command, path in cmds.values():  # warm-up, not counted: writes the bytecode cache
        time_to_200(command, path, workdir)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    ratios = []
    for i in range(rounds):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        this: dict[str, float] = {}
        for name in order:
            command, path = cmds[name]
            this[name] = time_to_200(command, path, workdir)
            times[name].append(this[name])
        ratios.append(this["ours"] / this["minimal"])
    ours, minimal = statistics.median(times["ours"]), statistics.median(times["minimal"])
    best = min(times["ours"]) / min(times["minimal"])  # noise only adds time: the fastest starts compare cleanly
    return {"ours_s": ours, "minimal_s": minimal, "ratio": ours / minimal,
            "paired_ratio": statistics.median(ratios), "best_ratio": best, "rounds": rounds,
            "ours_runs": times["ours"], "minimal_runs": times["minimal"], "paired_rounds": sorted(ratios)}


def import_profile(statement: str = "import forge_streaming", top: int = 15) -> list[tuple[str, float, float]]:
    """``python -X importtime -c statement``: (module, self ms, cumulative ms), largest cumulative first."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement], capture_output=True, text=True,
                          timeout=60, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line[len("import time:"):].split("|", 2)
        rows.append((name.rstrip(), int(own) / 1000, int(cumulative) / 1000))
    rows.sort(key=lambda row: row[2], reverse=True)
    return rows[:top]


def startup(opts: Options) -> Case:
    """The "startup" bench case: ours and a minimal uvicorn + Starlette app, alternating."""
    from . import report
    from .cases import Case

    report.SECTIONS.setdefault("startup", section)  # report.py renders the cases it knows; this one is added here
    case = Case("startup", "Startup to the first 200")
    started = time.monotonic()
    if "ours" in opts.servers:
        try:
            result = measure(opts.workdir, ROUNDS)
            case.rows.append({"server": "ours", "label": "forge-streaming serve (/healthz)", **result})
            verdict = "met" if result["ratio"] <= TARGET else "missed"
            case.notes.append(f"Target: at most {TARGET}x a minimal uvicorn + Starlette app: "
                              f"{result['ratio']:.2f}x, {verdict}.")
        except Exception as exc:
            case.rows.append({"server": "ours", "label": "forge-streaming serve", "error": str(exc)[:300]})
        case.notes.append("Bytecode is cached as on a deployed server (PYTHONDONTWRITEBYTECODE unset for both, the "
                          "cache in the work directory, one warm-up start each, not counted).")
        case.notes.append("Each start is timed from Popen to the first 200, polled every 2 ms; ours runs with every "
                          "installed plugin and the default config, the minimal app is one Starlette route under "
                          f"`uvicorn app:app`; {ROUNDS} alternating rounds, medians, ratio = ours / minimal.")
    case.seconds = time.monotonic() - started
    return case


def section(case: Case) -> list[str]:
    lines = ["| server | median s | runs s | ratio to the minimal app |", "|---|---|---|---|"]
    for r in case.rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'][:120]} | | |")
            continue
        runs = ", ".join(f"{t:.3f}" for t in r["ours_runs"])
        minimal = ", ".join(f"{t:.3f}" for t in r["minimal_runs"])
        lines.append(f"| {r['label']} | {r['ours_s']:.3f} | {runs} | {r['ratio']:.2f}x "
                     f"(paired median {r['paired_ratio']:.2f}x, fastest / fastest {r['best_ratio']:.2f}x) |")
        lines.append(f"| uvicorn app:app, one Starlette route (/) | {r['minimal_s']:.3f} | {minimal} | 1.00x |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m forge_streaming_bench.startup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--importtime", action="store_true", help="also show where `import forge_streaming` goes")
    parser.add_argument("--statement", default="import forge_streaming", help="what --importtime imports")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="forge-startup-") as tmp:
        result = measure(Path(tmp), args.rounds)
    print(f"forge-streaming serve to first 200: median {result['ours_s']:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in result['ours_runs'])})")
    print(f"uvicorn app:app (Starlette) to first 200: median {result['minimal_s']:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in result['minimal_runs'])})")
    print(f"ratio {result['ratio']:.2f}x (paired median {result['paired_ratio']:.2f}x, fastest / fastest "
          f"{result['best_ratio']:.2f}x), target <= {TARGET}x")
    if args.importtime:
        print(f"\npython -X importtime -c {args.statement!r}, largest cumulative first (ms):")
        for name, own, cumulative in import_profile(args.statement):
            print(f"  {cumulative:8.1f} {own:8.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
