"""BENCHMARKS.md and the PNG: tables per case, ratios to ours, targets met or missed.

A ratio is always "peer figure / our figure" for costs (CPU, latency,
memory): above 1.0x the peer costs more than we do.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cases import MQTT_ROUNDS, SSE_ROUNDS, WORKERS_ROUNDS, Case

NOT_MEASURED = "not measured"


def _f(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{suffix}"
    if isinstance(value, int):
        return f"{value:,}{suffix}"
    return str(value)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.2f}x"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _ours(rows: list[dict[str, Any]], n: int | None = None, server: str = "ours") -> dict[str, Any] | None:
    for row in rows:
        if row["server"] == server and (n is None or row.get("n") == n) and "error" not in row:
            return row
    return None


def _figure(row: dict[str, Any] | None, key: str) -> float | None:
    """``row[key]``, or None without a row (the ratio base may be missing)."""
    return row[key] if row is not None else None


def headline_n(case: Case | None) -> int | None:
    """N = 1,000 when measured (the issue's latency target is there), else the largest N."""
    if case is None:
        return None
    sizes = sorted({r.get("n", 0) for r in case.rows if "error" not in r})
    return 1000 if 1000 in sizes else (sizes[-1] if sizes else None)


def fanout_section(case: Case) -> list[str]:
    out: list[str] = []
    for n in sorted({r.get("n", 0) for r in case.rows if r.get("n")}):
        rows = [r for r in case.rows if r.get("n") == n]
        base = _ours(rows) or _ours(rows, server="ours")
        m = next((r.get("messages") for r in rows if r.get("messages")), None)
        out.append(f"**N = {n:,} members, burst of M = {_f(m)} messages** ({_f((m or 0) * n)} deliveries per run)")
        out.append("")
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["label"], f"error: {r['error'][:120]}"] + [""] * 8)
                continue
            table.append([
                r["label"], _f(r["server_us_per_delivery"], 2), _ratio(r["server_us_per_delivery"],
                                                                       _figure(base, "server_us_per_delivery")),
                _f(r["deliveries_per_s"], 0), _f(r["p50_ms"], 1), _f(r["p99_ms"], 1),
                _ratio(r["p99_ms"], _figure(base, "p99_ms")), f"{r['lost']} / {r['out_of_order']}",
                _f(r["client_us_per_delivery"], 2), f"{r.get('runs', 1)}",
            ])
        out += _table(["server", "server CPU µs/delivery", "CPU vs ours", "deliveries/s", "p50 ms", "p99 ms",
                       "p99 vs ours", "lost / out of order", "client CPU µs/delivery", "runs"], table)
        out.append("")
        for r in rows:
            if r.get("empty_runs"):
                out.append(f"- {r['label']}: {r['empty_runs']} of {r['empty_runs'] + r['runs']} bursts delivered "
                           "nothing within 5 s (its clients or the publisher were dropped; see its log); the "
                           "figures are from the bursts that delivered, the lost count from the worst burst.")
        if any(r.get("empty_runs") for r in rows):
            out.append("")
    return out


def paced_section(case: Case) -> list[str]:
    """Per N and pace: every server's CPU per delivery, vs ours (window off) and vs raw websockets."""
    out: list[str] = []
    cells = sorted({(r["n"], r["pace_ms"]) for r in case.rows if r.get("n") and "pace_ms" in r})
    for n, pace_ms in cells:
        rows = [r for r in case.rows if r.get("n") == n and r.get("pace_ms") == pace_ms]
        base = _ours(rows)
        peer = _ours(rows, server="websockets")
        m = next((r.get("messages") for r in rows if r.get("messages")), None)
        out += [f"**N = {n:,} members, one message every {pace_ms:g} ms** ({_f(m)} messages, "
                f"{_f((m or 0) * n)} deliveries per run)", ""]
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["label"], f"error: {r['error'][:120]}"] + [""] * 8)
                continue
            cpu = r["server_us_per_delivery"]
            vs_raw = (f"{r['paired_ratio']:.2f}x" if r.get("paired_ratio")  # the rounds' own ratios, median
                      else _ratio(cpu, _figure(peer, "server_us_per_delivery")))
            table.append([r["label"], _f(cpu, 2), _ratio(cpu, _figure(base, "server_us_per_delivery")),
                          vs_raw, _f(r["deliveries_per_s"], 0),
                          _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), f"{r['lost']} / {r['out_of_order']}",
                          _f(r["client_us_per_delivery"], 2), f"{r.get('runs', 1)}"])
        out += _table(["server", "server CPU µs/delivery", "CPU vs ours", "CPU vs raw websockets", "deliveries/s",
                       "p50 ms", "p99 ms", "lost / out of order", "client CPU µs/delivery", "runs"], table)
        out.append("")
    return out


def paced_ratios(case: Case | None, server: str) -> list[tuple[int, float, float]]:
    """(N, pace ms, ``server``'s CPU per delivery / raw websockets') for every paced cell both measured."""
    if case is None:
        return []
    out = []
    for n, pace_ms in sorted({(r["n"], r["pace_ms"]) for r in case.rows if r.get("n") and "pace_ms" in r}):
        rows = [r for r in case.rows if r.get("n") == n and r.get("pace_ms") == pace_ms]
        ours, peer = _ours(rows, server=server), _ours(rows, server="websockets")
        if ours and ours.get("paired_ratio"):  # median of the alternating rounds' own ratios
            out.append((n, pace_ms, ours["paired_ratio"]))
        elif ours and peer and peer["server_us_per_delivery"]:
            out.append((n, pace_ms, ours["server_us_per_delivery"] / peer["server_us_per_delivery"]))
    return out


def echo_section(case: Case) -> list[str]:
    base = _ours(case.rows)
    table = []
    for r in case.rows:
        if "error" in r:
            table.append([r["label"], f"error: {r['error'][:120]}"] + [""] * 6)
            continue
        table.append([r["label"], _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), _ratio(r["p99_ms"], _figure(base, "p99_ms")),
                      _f(r["round_trips_per_s"], 0), _f(r["server_us_per_round_trip"], 1),
                      _ratio(r["server_us_per_round_trip"], _figure(base, "server_us_per_round_trip")),
                      _f(r["lost"])])
    pairs = next((r.get("pairs") for r in case.rows if r.get("pairs")), None)
    rounds = next((r.get("rounds") for r in case.rows if r.get("rounds")), None)
    return [f"{_f(pairs)} pairs of connections, each pair in its own room, all at once: A sends, B relays it "
            f"back, A times the round trip and sends the next ({_f(rounds)} round trips per pair). "
            "Each round trip is two room messages through the server.", ""] + _table(
        ["server", "RTT p50 ms", "RTT p99 ms", "p99 vs ours", "round trips/s", "server CPU µs/round trip",
         "CPU vs ours", "lost"], table) + [""]


def memory_section(case: Case) -> list[str]:
    base = _ours(case.rows)
    table = []
    for r in case.rows:
        if "error" in r:
            table.append([r["label"], f"error: {r['error'][:120]}", "", "", ""])
            continue
        table.append([r["label"], f"{r['held']:,} / {r['attempted']:,}", _f(r["kb_per_connection"], 1),
                      _ratio(r["kb_per_connection"], _figure(base, "kb_per_connection")),
                      f"{r['rss_before'] / 2**20:,.0f} → {r['rss_after'] / 2**20:,.0f}"])
    return ["Connections opened (WebSocket handshake done, then idle; no room joined), held 3 s, server RSS "
            "(VmRSS) after minus before, divided by connections held.", ""] + _table(
        ["server", "held / attempted", "KB per connection", "vs ours", "RSS MiB before → after"], table) + [""]


def capacity_section(case: Case) -> list[str]:
    table = []
    for r in case.rows:
        if "error" in r:
            table.append([r["label"], f"error: {r['error'][:160]}"] + [""] * 8)
            continue
        delivered = f"{r.get('deliveries', 0):,} of {r.get('deliveries_expected', 0):,}"
        if r.get("missed"):  # each member that got nothing, put down to a cause the client can tell
            delivered += " (missed: " + "; ".join(f"{n:,} {cause}" for cause, n in r["missed"].items()) + ")"
        table.append([r["label"], f"{r['target']:,}", f"{r['held']:,}", _f(r.get("kb_per_connection"), 1),
                      _f(r.get("open_seconds"), 0), delivered, _f(r.get("deliver_seconds"), 2),
                      f"{r.get('server_fds', 0):,}", f"{r['failures']:,}",
                      f"{r['server_alive']}" + (f"; {'; '.join(r['errors'])[:160]}" if r.get("errors") else "")])
    out = _table(["server", "target", "held (clients' count)", "KB per connection", "seconds to open and join",
                  "deliveries of one message per room", "seconds to deliver", "server's open fds (largest process)",
                  "failed attempts", "alive after; first errors"], table) + [""]
    examples = [f"- {r['label']}, a member that got nothing: {e}" for r in case.rows for e in
                r.get("missed_examples") or []]
    return out + (examples + [""] if examples else [])


def mqtt_section(case: Case) -> list[str]:
    table = []
    for r in case.rows:
        if "error" in r:
            table.append([r["label"], f"error: {r['error'][:160]}"] + [""] * 8)
            continue
        cap = 1e6 / r["server_us_per_delivery"] if r.get("server_us_per_delivery") else None
        by_node = " + ".join(f"{seconds * 1e3:.1f}" for seconds in r.get("server_cpu_by_process") or [])
        table.append([r["label"], _f(r["server_us_per_delivery"], 2), by_node or "-", _f(cap, 0),
                      _f(r["deliveries_per_s"], 0),
                      _f(r["p50_ms"], 1), _f(r["probe_p50_ms"], 2), _f(r["probe_p99_ms"], 2),
                      _f(r["broker_cpu"] * 1e3 if r.get("broker_cpu") is not None else None, 1),
                      f"{r['lost']} / {r['out_of_order']}"])
    return _table(["setup", "server CPU µs/delivery (all nodes)", "CPU ms per burst, by node",
                   "deliveries per node CPU-second",
                   "deliveries/s (wall)", "burst p50 ms", "probe p50 ms", "probe p99 ms", "broker CPU ms per burst",
                   "lost / out of order"], table) + [""]


def _by_process(seconds: list[float]) -> str:
    """CPU ms of each process of a workers-case setup: the node's process(es) in order, then the broker."""
    if not seconds:
        return "-"
    names = ["serve"] if len(seconds) == 2 else ["supervisor", *(f"worker {i}" for i in range(1, len(seconds) - 1))]
    return " + ".join(f"{name} {value * 1e3:.1f}" for name, value in zip([*names, "Mosquitto"], seconds, strict=True))


def workers_section(case: Case) -> list[str]:
    """Burst and paced: one worker and two workers, CPU per delivery with every process counted, and the ratio."""
    out: list[str] = []
    for mode in ("burst", "paced"):
        rows = [r for r in case.rows if r.get("mode") == mode or ("error" in r and mode == "burst")]
        if not rows:
            continue
        base = _ours(rows, server="one-worker")
        m = next((r.get("messages") for r in rows if r.get("messages")), None)
        n = next((r.get("n") for r in rows if r.get("n")), 0)
        what = (f"a burst of M = {_f(m)} messages" if mode == "burst"
                else f"one message every {_f(rows[0].get('pace_ms'), 0)} ms, {_f(m)} messages")
        out += [f"**{mode.capitalize()}: N = {n:,} members, {what}**", ""]
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["label"], f"error: {r['error'][:160]}"] + [""] * 9)
                continue
            cpu = r["server_us_per_delivery"]
            spread = " + ".join(f"{w.get('connections')}" for w in r.get("members_by_worker") or []) or "-"
            table.append([r["label"], _f(cpu, 2), _ratio(cpu, _figure(base, "server_us_per_delivery")),
                          _by_process(r.get("server_cpu_by_process") or []), spread, _f(r["deliveries_per_s"], 0),
                          _f(r["p50_ms"], 2), _f(r["p99_ms"], 2), f"{r['lost']} / {r['out_of_order']}",
                          _f(r["client_us_per_delivery"], 2), f"{r.get('runs', 1)}"])
        out += _table(["setup", "server CPU µs/delivery (every process)", "vs one worker",
                       "CPU ms per run, by process", "members per worker", "deliveries/s", "p50 ms", "p99 ms",
                       "lost / out of order", "client CPU µs/delivery", "runs"], table)
        out.append("")
    return out


SECTIONS = {"fanout": fanout_section, "paced": paced_section, "echo": echo_section, "memory": memory_section,
            "capacity": capacity_section, "sse": fanout_section,
            "webtransport": fanout_section, "mqtt": mqtt_section, "nats": mqtt_section, "workers": workers_section}


def targets(cases: dict[str, Case]) -> list[list[str]]:
    """Each target of issue 8 with the measured ratio beside it and met/missed."""
    rows: list[list[str]] = []

    def add(target: str, measured: float | None, text: str, ok: bool | None, where: str) -> None:
        verdict = NOT_MEASURED if measured is None else ("met" if ok else "missed")
        rows.append([target, text if measured is not None else "-", verdict, where])

    fan = cases.get("fanout")
    n = headline_n(fan)
    rows_n = [r for r in fan.rows if r.get("n") == n] if fan else []
    ours = _ours(rows_n)
    ws = _ours(rows_n, server="websockets")
    sio = _ours(rows_n, server="socketio")
    r1 = ours["server_us_per_delivery"] / ws["server_us_per_delivery"] if ours and ws else None
    add("WebSocket fan-out CPU/delivery <= 1.0x raw websockets.broadcast", r1, f"{r1:.2f}x" if r1 else "",
        r1 is not None and r1 <= 1.0, f"N = {n}")
    r2 = sio["server_us_per_delivery"] / ours["server_us_per_delivery"] if ours and sio else None
    add(">= 6x better than python-socketio", r2, f"{r2:.1f}x better" if r2 else "", r2 is not None and r2 >= 6,
        f"N = {n}")
    p99 = ours["p99_ms"] / ws["p99_ms"] if ours and ws and n == 1000 else None
    add("p99 latency at N = 1,000 no worse than raw websockets", p99, f"{p99:.2f}x theirs" if p99 else "",
        p99 is not None and p99 <= 1.0, "N = 1,000" if n == 1000 else "N = 1,000 not run")

    paced = cases.get("paced")
    for server, limit, target in (("ours", 0.8, "Paced fan-out CPU/delivery <= 0.8x raw websockets without a write "
                                   "window"),
                                  ("ours-window-10ms", 0.5, "Paced fan-out CPU/delivery <= 0.5x raw websockets with "
                                   "a 10 ms window (`websocket.flush_window: 10ms`)")):
        cells = paced_ratios(paced, server)
        worst = max((r for _, _, r in cells), default=None)
        text = ", ".join(f"{r:.2f}x" for _, _, r in cells)
        where = "; ".join(f"N = {n:,} every {p:g} ms" for n, p, _ in cells)
        where = f"{where}: every cell must meet it (each the median of the alternating rounds' own ratios)"
        add(target, worst, f"{text} (worst {worst:.2f}x)" if worst is not None else "",
            worst is not None and worst <= limit, where if cells else "paced case")

    sse = cases.get("sse")
    sn = headline_n(sse)
    srows = [r for r in sse.rows if r.get("n") == sn] if sse else []
    ours_sse, peer = _ours(srows), _ours(srows, server="sse-starlette")
    r3 = ours_sse.get("paired_ratio") if ours_sse else None
    add("SSE CPU/delivery <= 1.3x our WebSocket figure", r3, f"{r3:.2f}x" if r3 else "", r3 is not None and r3 <= 1.3,
        f"N = {sn}, same server, median of {SSE_ROUNDS} alternating rounds")
    r4 = peer["server_us_per_delivery"] / ours_sse["server_us_per_delivery"] if ours_sse and peer else None
    add("SSE >= 2x better than sse-starlette with a queue per client", r4, f"{r4:.1f}x better" if r4 else "",
        r4 is not None and r4 >= 2, f"N = {sn}")

    mem = cases.get("memory")
    ours_mem = _ours(mem.rows) if mem else None
    kb = ours_mem["kb_per_connection"] if ours_mem else None
    at = ours_mem["held"] if ours_mem else 0
    add("Idle memory <= 8 KB per WebSocket connection at 10,000 connections", kb,
        f"{kb:.1f} KB at {at:,}" if kb is not None else "", kb is not None and kb <= 8 and at >= 10_000,
        "needs >= 10,000 held to count as met")
    echo = cases.get("echo")
    ours_echo = _ours(echo.rows) if echo else None
    raw_echo = _ours(echo.rows, server="websockets") if echo else None
    r6 = ours_echo.get("paired_ratio") if ours_echo else None
    if r6 is None and ours_echo and raw_echo and raw_echo.get("server_us_per_round_trip"):  # a run without rounds
        r6 = ours_echo["server_us_per_round_trip"] / raw_echo["server_us_per_round_trip"]
    add("Echo round trip CPU <= 1.0x raw websockets", r6, f"{r6:.2f}x" if r6 else "", r6 is not None and r6 <= 1.0,
        f"echo case, server CPU per round trip, median of {len(ours_echo.get('paired_rounds', []))} alternating rounds"
        if ours_echo and ours_echo.get("paired_rounds") else "echo case, server CPU per round trip")
    wt = cases.get("webtransport")
    wt_n = headline_n(wt)
    wt_rows = [r for r in wt.rows if r.get("n") == wt_n] if wt else []
    ours_wt, ours_ws = _ours(wt_rows, server="ours-wt"), _ours(wt_rows)
    r7 = (ours_wt["server_us_per_delivery"] / ours_ws["server_us_per_delivery"]
          if ours_wt and ours_ws and ours_ws.get("server_us_per_delivery") else None)
    add("WebTransport CPU/delivery <= 3x our WebSocket", r7, f"{r7:.1f}x" if r7 else "", r7 is not None and r7 <= 3,
        f"N = {wt_n:,}, same node" if wt_n else "webtransport case")
    boot = cases.get("startup")
    ours_boot = _ours(boot.rows) if boot else None
    r8 = ours_boot["ratio"] if ours_boot else None
    add("Startup to the first 200 <= 1.5x a minimal uvicorn + Starlette app", r8, f"{r8:.2f}x" if r8 else "",
        r8 is not None and r8 <= 1.5, "startup case, medians of alternating rounds")
    cap = cases.get("capacity")
    held_rows = [r for r in cap.rows if "error" not in r] if cap else []
    best = max(held_rows, key=lambda r: int(r["held"])) if held_rows else None
    held = best["held"] if best else None
    delivered = best is not None and best.get("deliveries", 0) >= best.get("deliveries_expected", 1) > 0
    add("50,000 connections held on one node (with workers), each delivered a room publish", held,
        f"{held:,} held by {best['label']}; {best.get('deliveries', 0):,} of {best.get('deliveries_expected', 0):,} "
        "delivered" if best else "", held is not None and held >= 50_000 and delivered, "see capacity notes")

    for name, engine in (("mqtt", "Mosquitto"), ("nats", "NATS JetStream")):
        mq = cases.get(name)
        one = _ours(mq.rows, server="one-node") if mq else None
        two = _ours(mq.rows, server="two-nodes") if mq else None
        r5 = two.get("paired_ratio") if two else None
        add(f"Two nodes over {engine}: per-node throughput >= 0.8x single node", r5, f"{r5:.2f}x" if r5 else "",
            r5 is not None and r5 >= 0.8,
            f"deliveries per node CPU-second, median of {MQTT_ROUNDS} alternating rounds")
        hop = (two["probe_p50_ms"] - one["probe_p50_ms"]) if one and two and two.get("probe_p50_ms") else None
        add(f"{engine} hop adds <= 2 ms at p50", hop, f"+{hop:.2f} ms" if hop is not None else "",
            hop is not None and hop <= 2.0, "paced probe, two nodes minus one node")

    wk = cases.get("workers")
    ratios = {r["mode"]: r["paired_ratio"] for r in (wk.rows if wk else [])
              if r["server"] == "two-workers" and "error" not in r and r.get("paired_ratio")}
    worst = max(ratios.values()) if len(ratios) == 2 else None
    add("Two workers sharing rooms cost <= 1.2x one worker's server CPU per delivery (all processes, broker "
        "included), paced and burst", worst, ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in ratios.items()),
        worst is not None and worst <= 1.2,
        f"workers case: two workers / one worker, each over Mosquitto, median of {WORKERS_ROUNDS} alternating rounds")
    return rows


def _transport_bars(cases: dict[str, Case]) -> list[tuple[str, float, bool]]:
    """(label, server CPU µs/delivery, ours?) for every transport and setup at its headline N."""
    bars: list[tuple[str, float, bool]] = []
    for name, servers in (("sse", ("ours", "sse-starlette")), ("webtransport", ("ours-wt",)),
                          ("mqtt", ("one-node", "two-nodes")), ("nats", ("two-nodes",)),
                          ("workers", ("one-worker", "two-workers"))):  # the workers case: its burst rows
        case = cases.get(name)
        n = headline_n(case)
        for server in servers:
            row = _ours([r for r in case.rows if r.get("n") == n], server=server) if case else None
            if row:
                bars.append((f"{row['label']}, N = {n:,}", row["server_us_per_delivery"], server != "sse-starlette"))
    return bars


def plot(cases: dict[str, Case], path: Path) -> str | None:
    """WebSocket fan-out against the peers, and every other transport and setup; None when done, else why not."""
    fan = cases.get("fanout")
    n = headline_n(fan)
    rows = [r for r in fan.rows if r.get("n") == n and "error" not in r] if fan else []
    if not rows:
        return "no fan-out figures to plot"
    try:
        # optional (the [peers] extra): typed when installed, absent from a test install
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return "matplotlib not installed (pip install -e 'contrib/bench[peers]')"
    others = _transport_bars(cases)
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(14 if others else 8, 4.6), dpi=110, squeeze=False)
    ax = axes[0][0]
    values = [r["server_us_per_delivery"] for r in rows]
    bars = ax.bar([r["label"] for r in rows], values,
                  color=["#d9480f" if r["server"] == "ours" else "#868e96" for r in rows])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=9)
    ax.set_ylabel("server CPU µs per delivery (lower is better)")
    m = rows[0].get("messages")
    ax.set_title(f"WebSocket room fan-out: N = {n:,}, bursts of M = {m:,} (median run)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    if others:
        ax = axes[0][1]
        labels, widths, ours = zip(*others, strict=True)
        bars = ax.barh(labels, widths, color=["#d9480f" if o else "#868e96" for o in ours])
        for bar, value in zip(bars, widths, strict=True):
            ax.annotate(f" {value:.2f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center",
                        fontsize=9)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("server CPU µs per delivery, log scale (lower is better)")
        ax.set_title("SSE, WebTransport, two nodes and two workers over Mosquitto", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write(path: Path, png: Path, cases: dict[str, Case], *, command: str, date: str, machine: dict[str, str],
          settings: list[str], plot_note: str | None, skipped: dict[str, str]) -> None:
    out = ["# Benchmarks", "",
           "Generated by the benchmark suite (`contrib/bench`, `python -m forge_streaming_bench`); "
           "do not edit by hand, run it again.", "",
           f"- command: `{command}`", f"- date: {date}"]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    out += [f"- {line}" for line in settings]
    out += ["", "## Targets", ""]
    out += _table(["target", "measured", "verdict", "where"], targets(cases))
    out += ["", f"![server CPU per delivery]({png.name})" if plot_note is None else f"(no plot: {plot_note})", ""]
    for name, case in cases.items():
        out += [f"## {case.title}", ""]
        out += SECTIONS[name](case)
        for server, why in case.not_measured.items():
            out.append(f"- {server}: {NOT_MEASURED} ({why})")
        out += [f"- {note}" for note in case.notes]
        out += [f"- case took {case.seconds:.0f} s", ""]
    for name, why in skipped.items():
        out += [f"## {name}", "", f"{NOT_MEASURED}: {why}", ""]
    out += NOTES
    path.write_text("\n".join(out) + "\n")


NOTES = [
    "## How it is measured", "",
    "- Every server under test is its own process on 127.0.0.1 with a free port: ours is "
    "`forge-streaming serve` (uvicorn with the transports' own protocol classes) with the memory backend and the "
    "first-party plugins only (`plugins.allow`: contrib plugins such as jwt and prometheus are not loaded). "
    "The peers are minimal apps in `contrib/bench/src/forge_streaming_bench/peers/`: they relay the publisher's "
    "text unchanged (no id, sequence, history or presence), so they do less per message than ours.",
    "- The load generator is one separate process (uvloop): a raw asyncio Protocol that does the WebSocket "
    "handshake by hand, parses only frame headers (server frames are unmasked) and counts bench messages with one "
    "regex scan per received chunk; it parses the send timestamp only on 1 member in 20 (latency samples). "
    "SSE members use the same counting on the de-chunked stream.",
    "- Server CPU per delivery = server utime+stime over the burst (summed over its threads from "
    "/proc/PID/task/*/schedstat, ns resolution) / deliveries counted by the clients. The window opens when the "
    "setup traffic (joins, presence) has stopped and closes when the last member has every message or no "
    "progress is made for 5 s.",
    "- The publisher writes its burst in batches of 100 messages per event-loop turn, so the server reads many "
    "messages at once. Ours then puts all the frames a member gets in one loop iteration into one write "
    "(kernel `delivery.py`); the peers make one write per frame. That is most of the fan-out difference, and "
    "it is what bursts look like. The echo case has one message in flight per pair, so nothing coalesces there: "
    "it shows the per-message cost of the kernel's path (parse, hooks, publish, encode) instead.",
    "- Latency is per message from the publisher writing it to a member reading it, so in a burst it includes "
    "the wait behind the earlier messages of the burst (the burst drain time dominates p99). Lost = expected "
    "minus received; out of order = messages whose number is not above the previous one on that member.",
    "- The client's own cost is the 'client CPU µs/delivery' column. For the peers it is below the server's "
    "figure. For ours the server coalesces a member's frames into one write, which makes the server's cost per "
    "delivery comparable to the client's: the client's ceiling then bounds ours' deliveries/s and latency on 2 "
    "cores (its CPU per delivery does not, as it is the server's own CPU time).",
    "- The fd limit: the harness raises RLIMIT_NOFILE's soft limit to the hard limit with "
    "`resource.setrlimit` before starting anything, and every server and load process inherits it. The hard "
    "limit itself can only be raised with privileges (`ulimit -Hn 200000` as root, `LimitNOFILE=` in systemd, "
    "`--ulimit nofile=200000:200000` for a container). Past ~28k connections per source/destination pair the "
    "load processes use several 127.0.0.x source addresses.",
    "- Numbers from a busy machine are noisy; the ratios between servers measured side by side in the same run "
    "are the figures to compare. Medians of the repeated runs (by server CPU per delivery) are shown; lost and "
    "out-of-order counts are the worst of the runs.",
]
