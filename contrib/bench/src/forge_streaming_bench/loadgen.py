"""The load generator: a separate process driving one scenario, printing one JSON result.

Run as ``python -m forge_streaming_bench.loadgen '<spec json>'``. It reads
the servers' CPU time from /proc itself (their PIDs are in the spec) so the
measurement window is exactly the burst, and reports its own CPU time too:
the client's CPU per received frame is its ceiling, printed beside the
server's figure to show the server, not the client, is what is measured.
Every phase is bounded in time; nothing here loops without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from . import procstat
from .sseclient import SseConn, connect_sse
from .wsclient import DIALECTS, Stats, WsConn, connect, read_t

HOST = "127.0.0.1"
PAD = "x" * 24


class Member(Protocol):
    """What the fan-out scenario needs of a room member, whatever its transport (WsConn, SseConn, WtMember)."""

    counting: bool
    group: int

    def close(self) -> None: ...


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sources(count: int, offset: int = 0) -> list[str]:
    """Loopback source addresses, one per ~25k connections (the ephemeral port range per pair).

    ``offset`` gives each of several load processes its own addresses.
    """
    return [f"127.0.0.{2 + 4 * offset + i}" for i in range(max(1, (count + 24_999) // 25_000))]


async def _open_many(targets: list[dict[str, Any]], count: int, dialect_name: str, stats: Stats, *,
                     sample_every: int = 0, concurrency: int = 100, timeout: float = 10.0,
                     deadline: float, stop_after_failures: int | None = None,
                     source_offset: int | None = None) -> tuple[list[WsConn], int, str]:
    """Open ``count`` connections round-robin over ``targets``, ``concurrency`` handshakes at a time."""
    dialect = DIALECTS[dialect_name]()
    sources = _sources(count, source_offset or 0)
    conns: list[WsConn | None] = [None] * count
    failures = 0
    last_error = ""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal failures, last_error
        if time.monotonic() > deadline or (stop_after_failures is not None and failures >= stop_after_failures):
            return
        target = targets[i % len(targets)]
        async with sem:
            try:
                conns[i] = await connect(HOST, target["port"], dialect, stats,
                                         sample=bool(sample_every) and i % sample_every == 0,
                                         source=sources[i // 25_000]
                                         if count > 25_000 or source_offset is not None else None,
                                         timeout=timeout)
            except (TimeoutError, OSError, ConnectionError) as exc:
                failures += 1
                last_error = f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(one(i) for i in range(count)))
    return [c for c in conns if c is not None], failures, last_error


async def _join_all(conns: list[WsConn], room: str | list[str], deadline: float) -> int:
    rooms = [room] * len(conns) if isinstance(room, str) else room
    waits = [c.join(r) for c, r in zip(conns, rooms, strict=True)]
    try:
        await asyncio.wait_for(asyncio.gather(*waits), max(0.1, deadline - time.monotonic()))
    except TimeoutError:
        pass
    return sum(1 for w in waits if w.done() and not w.cancelled() and w.exception() is None)


async def _open_sse(targets: list[dict[str, Any]], count: int, path: str, stats: Stats, *, sample_every: int,
                    deadline: float, concurrency: int = 100) -> tuple[list[SseConn], int, str]:
    """Open ``count`` SSE members round-robin over ``targets`` (``path`` joins the room by query)."""
    conns: list[SseConn | None] = [None] * count
    failures, last_error = 0, ""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal failures, last_error
        if time.monotonic() > deadline:
            return
        async with sem:
            try:
                conns[i] = await connect_sse(HOST, targets[i % len(targets)]["port"], path, stats,
                                             sample=bool(sample_every) and i % sample_every == 0)
            except (TimeoutError, OSError, ConnectionError) as exc:
                failures += 1
                last_error = f"{type(exc).__name__}: {exc}"

    await asyncio.gather(*(one(i) for i in range(count)))
    return [c for c in conns if c is not None], failures, last_error


async def _wait_joined(conns: list[SseConn], deadline: float) -> int:
    waits = [c.joined for c in conns]
    try:
        await asyncio.wait_for(asyncio.gather(*waits), max(0.1, deadline - time.monotonic()))
    except (TimeoutError, ConnectionError):
        pass
    return sum(1 for w in waits if w.done() and not w.cancelled() and w.exception() is None)


async def _quiesce(stats: Stats, quiet: float, limit: float) -> float:
    """Wait until no frame arrived for ``quiet`` seconds (setup notices drained), at most ``limit``."""
    start = time.monotonic()
    last = stats.frames
    still_since = time.monotonic()
    while time.monotonic() - start < limit:
        await asyncio.sleep(0.05)
        if stats.frames != last:
            last = stats.frames
            still_since = time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
    return time.monotonic() - start


def _cpu(pids: list[int]) -> float:
    return sum(procstat.cpu_seconds(pid) for pid in pids)


def _payload(n: int) -> str:
    return f'{{"n":{n},"t":{time.monotonic():.6f},"pad":"{PAD}"}}'


async def fanout(spec: dict[str, Any]) -> dict[str, Any]:
    """N members in one room, one publisher sends a burst of M messages; count, order, latency, CPU."""
    async with contextlib.AsyncExitStack() as stack:  # WebTransport members close with it
        return await _fanout(spec, stack)


async def _fanout(spec: dict[str, Any], stack: contextlib.AsyncExitStack) -> dict[str, Any]:
    n, m = spec["members"], spec["messages"]
    targets, pids, room = spec["targets"], spec["pids"], spec.get("room", "bench")
    stats = Stats()
    deadline = time.monotonic() + spec.get("setup_timeout", 120)
    t_setup = time.monotonic()
    members: list[Member]
    if spec.get("wt_port"):
        from .wtclient import open_members

        members = list(await open_members(stack, spec["wt_port"], n, room, stats,
                                          sample_every=spec.get("sample_every", 20)))
        failures, error, joined = n - len(members), "WebTransport session refused or timed out", len(members)
    elif spec.get("sse_path"):
        sse, failures, error = await _open_sse(targets, n, spec["sse_path"], stats,
                                               sample_every=spec.get("sample_every", 20), deadline=deadline)
        joined = await _wait_joined(sse, deadline)
        members = list(sse)
    else:
        ws, failures, error = await _open_many(targets, n, spec["dialect"], stats,
                                               sample_every=spec.get("sample_every", 20), deadline=deadline)
        joined = await _join_all(ws, room, deadline)
        members = list(ws)
    for conn in members:
        conn.counting = True
    census = await _census(spec["census"], len(members)) if spec.get("census") and joined == len(members) else None
    publisher = (await _open_many(targets[:1], 1, spec["dialect"], Stats(), deadline=deadline + 10))[0]
    if not publisher or joined < len(members):
        return {"error": f"setup: {len(members)}/{n} connected, {joined} joined; {failures} failed ({error})"}
    pub = publisher[0]
    await asyncio.wait_for(pub.join(room), 30)
    settle = await _quiesce(stats, spec.get("quiet", 0.5), spec.get("quiesce_limit", 120))
    setup_seconds = time.monotonic() - t_setup

    for i, conn in enumerate(members):
        conn.group = i % len(targets)
    runs = []
    for burst in range(spec.get("bursts", 1)):
        if burst:
            await _quiesce(stats, spec.get("quiet", 0.5), 30)
            await _server_idle(pids)
        runs.append(await _burst(spec, stats, members, pub, first=burst * m))
        runs[-1].update(setup_seconds=setup_seconds, quiesce_seconds=settle)
        if census is not None:
            runs[-1]["members_by_worker"] = census
    for conn in [*members, pub]:
        conn.close()
    return {"runs": runs}


async def _census(where: dict[str, Any], expected: int, limit: float = 6.0) -> list[dict[str, Any]]:
    """How many connections each worker of a node holds, from its ``/api/stats`` (``where``: port and api key).

    Workers write their status once a second, so this asks until the counts add up to ``expected``
    (every member joined; the publisher is not connected yet), at most ``limit`` seconds; the last
    answer either way. One process (``--workers 1``) has no worker list: its own total is its one entry.
    """
    request = urllib.request.Request(f"http://{HOST}:{where['port']}/api/stats",
                                     headers={"Authorization": f"Bearer {where['key']}"})

    def ask() -> dict[str, Any]:
        with urllib.request.urlopen(request, timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body

    deadline = time.monotonic() + limit
    counts: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            body = await asyncio.to_thread(ask)
        except (OSError, ValueError) as exc:
            counts = [{"error": f"{type(exc).__name__}: {exc}"}]
        else:
            workers = body.get("workers") or [{"worker": 1, "connections": body["connections"]["total"]}]
            counts = [{"worker": w.get("worker"), "pid": w.get("pid"), "connections": w.get("connections")}
                      for w in workers]
            if sum(c["connections"] or 0 for c in counts) == expected:
                return counts
        await asyncio.sleep(0.3)
    return counts


async def _server_idle(pids: list[int], threshold: float = 0.05, window: float = 0.3, limit: float = 30) -> None:
    """Wait until the servers are idle (the last burst's work is over), at most ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = _cpu(pids)
        await asyncio.sleep(window)
        if _cpu(pids) - before < threshold * window:
            return


async def _burst(spec: dict[str, Any], stats: Stats, members: list[Member], pub: WsConn, *,
                 first: int) -> dict[str, Any]:
    """One measured burst (or paced probe) of M messages numbered from ``first``."""
    m, pids, room, targets = spec["messages"], spec["pids"], spec.get("room", "bench"), spec["targets"]
    expected = len(members) * m
    stats.received = 0
    stats.out_of_order = 0
    stats.last_receive = 0.0
    stats.latencies.clear()
    broker0 = _cpu(spec.get("broker_pids") or [])
    by_pid0 = [procstat.cpu_seconds(pid) for pid in pids]
    cpu0, self0, t0 = _cpu(pids), procstat.self_cpu_seconds(), time.monotonic()
    batch, pace = spec.get("batch", 100), spec.get("pace", 0)
    absolute = spec.get("pace_mode") == "absolute"  # the paced case: message i at t0 + i * pace, not pace after
    for i in range(first, first + m if pace else first):  # a paced probe: one message every ``pace`` seconds
        pub.send(pub.dialect.message(room, _payload(i)))
        if absolute:  # behind (a busy client)? no sleep, catch up; the count of messages bounds the loop
            await asyncio.sleep(max(0.0, t0 + (i - first + 1) * pace - time.monotonic()))
        else:
            await asyncio.sleep(pace)
    for i in range(first, first if pace else first + m, batch):  # the burst: stamped as written, a batch a turn
        pub.send(b"".join(pub.dialect.message(room, _payload(j)) for j in range(i, min(first + m, i + batch))))
        await asyncio.sleep(0)
    end_by = t0 + spec.get("burst_timeout", 60)
    last_progress, last_count = time.monotonic(), 0
    while stats.received < expected and time.monotonic() < end_by:
        await asyncio.sleep(0.01)
        if stats.received != last_count:
            last_count, last_progress = stats.received, time.monotonic()
        elif time.monotonic() - last_progress > spec.get("stall", 5):
            break
    cpu1, self1 = _cpu(pids), procstat.self_cpu_seconds()
    by_pid = [procstat.cpu_seconds(pid) - before for pid, before in zip(pids, by_pid0, strict=True)]
    broker_cpu = _cpu(spec["broker_pids"]) - broker0 if spec.get("broker_pids") else None
    elapsed = max(1e-9, (stats.last_receive or time.monotonic()) - t0)
    received = stats.received
    lat = [x for group in stats.latencies.values() for x in group]
    return {
        "members": len(members), "messages": m, "expected": expected, "received": received,
        "lost": expected - received, "out_of_order": stats.out_of_order,
        "server_cpu": cpu1 - cpu0, "server_cpu_by_process": by_pid, "client_cpu": self1 - self0,
        "broker_cpu": broker_cpu, "seconds": elapsed,
        "server_busy": (cpu1 - cpu0) / elapsed, "client_busy": (self1 - self0) / elapsed,
        "server_us_per_delivery": (cpu1 - cpu0) / max(1, received) * 1e6,
        "client_us_per_delivery": (self1 - self0) / max(1, received) * 1e6,
        "deliveries_per_s": received / elapsed,
        "p50_ms": (_percentile(lat, 0.5) or 0) * 1e3, "p99_ms": (_percentile(lat, 0.99) or 0) * 1e3,
        "latency_samples": len(lat),
        "p50_ms_by_target": [(_percentile(stats.latencies.get(i, []), 0.5) or 0) * 1e3
                             for i in range(len(targets))],
    }


async def echo(spec: dict[str, Any]) -> dict[str, Any]:
    """P pairs, each in its own room: A sends, B sends it back, A times the round trip, K times each."""
    pairs, rounds = spec["pairs"], spec["rounds"]
    targets, pids = spec["targets"], spec["pids"]
    stats = Stats()
    deadline = time.monotonic() + spec.get("setup_timeout", 60)
    conns, failures, error = await _open_many(targets, 2 * pairs, spec["dialect"], stats, deadline=deadline)
    if len(conns) < 2 * pairs:
        return {"error": f"setup: {len(conns)}/{2 * pairs} connected; {failures} failed ({error})"}
    rooms = [f"echo-{i // 2}" for i in range(2 * pairs)]
    joined = await _join_all(conns, rooms, deadline)
    if joined < 2 * pairs:
        return {"error": f"setup: {joined}/{2 * pairs} joined"}
    await _quiesce(stats, 0.3, 30)
    rtts: list[float] = []
    done = asyncio.get_running_loop().create_future()
    remaining = [pairs]
    room_of = {id(c): r for c, r in zip(conns, rooms, strict=True)}

    def answer(conn: WsConn, data: bytes, start: int, end: int, now: float) -> None:
        t = read_t(data, start, end)
        if t is not None:
            conn.send(conn.dialect.message(room_of[id(conn)], f'{{"n":0,"t":{t:.6f},"pad":"{PAD}"}}'))

    def measure(conn: WsConn, data: bytes, start: int, end: int, now: float) -> None:
        t = read_t(data, start, end)
        if t is None:
            return
        rtts.append(now - t)
        conn.count += 1
        if conn.count < rounds:
            conn.send(conn.dialect.message(room_of[id(conn)], _payload(conn.count)))
        else:
            remaining[0] -= 1
            if remaining[0] == 0 and not done.done():
                done.set_result(None)

    for i, conn in enumerate(conns):
        conn.on_message = measure if i % 2 == 0 else answer
    cpu0, self0, t0 = _cpu(pids), procstat.self_cpu_seconds(), time.monotonic()
    for conn in conns[0::2]:
        conn.send(conn.dialect.message(room_of[id(conn)], _payload(0)))
    try:
        await asyncio.wait_for(done, spec.get("timeout", 60))
    except TimeoutError:
        pass
    cpu1, self1, elapsed = _cpu(pids), procstat.self_cpu_seconds(), time.monotonic() - t0
    for conn in conns:
        conn.close()
    return {
        "pairs": pairs, "rounds": rounds, "round_trips": len(rtts), "expected": pairs * rounds,
        "lost": pairs * rounds - len(rtts), "seconds": elapsed, "round_trips_per_s": len(rtts) / elapsed,
        "server_us_per_round_trip": (cpu1 - cpu0) / max(1, len(rtts)) * 1e6,
        "client_us_per_round_trip": (self1 - self0) / max(1, len(rtts)) * 1e6,
        "p50_ms": (_percentile(rtts, 0.5) or 0) * 1e3, "p99_ms": (_percentile(rtts, 0.99) or 0) * 1e3,
    }


async def idle(spec: dict[str, Any]) -> dict[str, Any]:
    """Open C idle connections; report the server's RSS growth per connection, or how many it held.

    With ``room_size``, they join rooms of that many (named per load process), and once all are held
    the first member of each room publishes one message into it: how many members got it, how fast.
    RSS and open fds are summed over every PID of ``pids`` (a node's workers).
    """
    count, targets, pids = spec["connections"], spec["targets"], spec["pids"]
    stats = Stats()
    await asyncio.sleep(0.5)
    rss0 = sum(procstat.rss_bytes(pid) for pid in pids)
    t0 = time.monotonic()
    # Several load processes meet at one wall-clock instant, so "held" is a simultaneous snapshot.
    hold_until = spec.get("hold_until")
    budget = (hold_until - time.time() - 2) if hold_until else spec.get("timeout", 180)
    conns, failures, error = await _open_many(
        targets, count, spec["dialect"], stats, deadline=t0 + budget,
        concurrency=spec.get("concurrency", 200), timeout=spec.get("connect_timeout", 10),
        stop_after_failures=spec.get("stop_after_failures", 500), source_offset=spec.get("source_offset"))
    open_seconds = time.monotonic() - t0
    rooms: dict[str, list[WsConn]] = {}
    size = spec.get("room_size")
    if size:
        for i, conn in enumerate(conns):
            rooms.setdefault(f"cap-{spec.get('source_offset') or 0}-{i // size}", []).append(conn)
        joins = await asyncio.gather(*(_join_all(members, room, t0 + budget + 60) for room, members in rooms.items()))
        joined = sum(joins)
        open_seconds = time.monotonic() - t0
    wait = (hold_until - time.time()) if hold_until else 0
    await asyncio.sleep(max(0.0, wait) + spec.get("hold", 2.0))
    rss1 = sum(procstat.rss_bytes(pid) for pid in pids)
    held = sum(1 for c in conns if not c.closed)
    server_fds = sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)
    result = {
        "attempted": count, "opened": len(conns), "held": held, "server_fds": server_fds,
        "failures": failures, "last_error": error,
        "rss_before": rss0, "rss_after": rss1,
        "kb_per_connection": (rss1 - rss0) / max(1, held) / 1024, "open_seconds": open_seconds,
    }
    if size:
        result |= await _one_message_per_room(rooms, stats, spec.get("deliver_timeout", 60))
        result["joined"] = joined
    for conn in conns:
        conn.close()
    return result


async def _one_message_per_room(rooms: dict[str, list[WsConn]], stats: Stats, timeout: float, *,
                                stall: float = 10.0) -> dict[str, Any]:
    """The first member of every room publishes one message; count the others' deliveries until all came.

    Waits at most ``timeout`` seconds, and stops once nothing arrived for ``stall`` seconds. Every open
    member that got nothing is put down to a cause it can be told apart by (``missed``), with examples.
    """
    expected = []
    for members in rooms.values():
        for conn in members[1:]:
            conn.counting = True
            if not conn.closed:
                expected.append(conn)
    stats.received = 0
    t0 = time.monotonic()
    for room, members in rooms.items():
        if not members[0].closed:
            members[0].send(members[0].dialect.message(room, _payload(0)))
    last_count, last_progress = 0, t0
    while stats.received < len(expected) and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.01)
        if stats.received != last_count:
            last_count, last_progress = stats.received, time.monotonic()
        elif time.monotonic() - last_progress > stall:
            break
    missed: dict[str, int] = {}
    examples: list[str] = []
    waiting = {id(conn) for conn in expected}
    for room, members in rooms.items():
        publisher = members[0]
        for conn in members[1:]:
            if id(conn) not in waiting or conn.count:
                continue
            cause = _why_missed(conn, publisher)
            missed[cause] = missed.get(cause, 0) + 1
            if len(examples) < 5:
                examples.append(f"{room}: member {conn.ident or '?'} ({cause}; publisher {publisher.ident or '?'})")
    return {"deliveries_expected": len(expected), "deliveries": stats.received,
            "deliver_seconds": (stats.last_receive or time.monotonic()) - t0, "missed": missed,
            "missed_examples": examples}


SAME_ID = "its connection id is the publisher's"


def _why_missed(conn: WsConn, publisher: WsConn) -> str:
    """Why ``conn`` got nothing of ``publisher``'s message, as far as the client can tell."""
    if publisher.closed or publisher.joined is None or not publisher.joined.done():
        return "the publisher was closed or never joined"
    if conn.joined is None or not conn.joined.done():
        return "its join was never acknowledged"
    if conn.ident and conn.ident == publisher.ident:  # the server skips the sender's id in the fan-out
        return SAME_ID
    if conn.resynced:
        return "got resync instead"
    if conn.closed:
        return "closed while waiting"
    return "open and joined, nothing came"


SCENARIOS = {"fanout": fanout, "echo": echo, "idle": idle}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    procstat.raise_fd_limit()
    runner: Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        runner = asyncio.run
    started = time.monotonic()
    try:
        result = runner(asyncio.wait_for(SCENARIOS[spec["scenario"]](spec), spec.get("hard_timeout", 600)))
    except Exception as exc:  # one JSON line either way: the harness reports the error beside the peer
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["wall_seconds"] = time.monotonic() - started
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
