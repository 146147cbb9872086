"""The workers case's report and target, and how the capacity case tells why a member missed its room's message."""

from __future__ import annotations

import asyncio
from typing import Any

from forge_streaming_bench import cases, loadgen, report
from forge_streaming_bench.__main__ import ALL_CASES
from forge_streaming_bench.wsclient import Dialect, Stats, WsConn


def _row(server: str, mode: str, cpu: float, ratio: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "server": server, "label": server, "n": 1000, "mode": mode, "pace_ms": 10.0 if mode == "paced" else None,
        "messages": 200, "server_us_per_delivery": cpu, "deliveries_per_s": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0,
        "lost": 0, "out_of_order": 0, "client_us_per_delivery": 1.0, "runs": 3,
        "server_cpu_by_process": [0.0004, 0.031, 0.030, 0.0005] if server == "two-workers" else [0.058, 0.0003],
        "members_by_worker": ([{"worker": 1, "connections": 514}, {"worker": 2, "connections": 486}]
                              if server == "two-workers" else [{"worker": 1, "connections": 1000}])}
    if ratio is not None:
        row |= {"paired_ratio": ratio, "paired_rounds": [ratio]}
    return row


def _target(case: cases.Case) -> list[str]:
    return next(row for row in report.targets({"workers": case}) if row[0].startswith("Two workers"))


def test_workers_is_a_registered_case() -> None:
    assert "workers" in ALL_CASES and cases.CASES["workers"] is cases.workers


def test_workers_target_is_judged_on_the_worse_of_burst_and_paced() -> None:
    rows = [_row("one-worker", "burst", 0.29), _row("two-workers", "burst", 0.32, 1.09),
            _row("one-worker", "paced", 5.4), _row("two-workers", "paced", 6.3, 1.17)]
    case = cases.Case("workers", "Two workers over Mosquitto", rows=rows)
    target = _target(case)
    assert target[1] == "burst 1.09x, paced 1.17x" and target[2] == "met"
    rows[3]["paired_ratio"] = 1.25
    assert _target(case)[2] == "missed"
    del rows[3]["paired_ratio"]  # one of the two measured is not the target measured
    assert _target(case)[2] == report.NOT_MEASURED
    assert _target(cases.Case("workers", "x"))[2] == report.NOT_MEASURED


def test_workers_section_names_every_process_and_the_members_per_worker() -> None:
    case = cases.Case("workers", "Two workers over Mosquitto",
                      rows=[_row("one-worker", "burst", 0.29), _row("two-workers", "burst", 0.32, 1.09)])
    text = "\n".join(report.workers_section(case))
    assert "| serve 58.0 + Mosquitto 0.3 | 1000 |" in text
    assert "| supervisor 0.4 + worker 1 31.0 + worker 2 30.0 + Mosquitto 0.5 | 514 + 486 |" in text
    assert "| 1.10x |" in text  # 0.32 / 0.29


def test_spread_note_says_when_a_worker_held_no_member() -> None:
    both: list[list[dict[str, Any]] | None] = [[{"connections": 514}, {"connections": 486}]]
    assert "both workers held members in every run" in cases._spread_note("burst", both)
    assert "NOT every run" in cases._spread_note("burst", [*both, [{"connections": 1000}, {"connections": 0}]])


def _frame(text: bytes) -> bytes:
    assert len(text) < 126
    return bytes((0x81, len(text))) + text


def test_a_member_learns_its_connection_id_from_its_join_and_notices_a_resync() -> None:
    async def check() -> None:
        conn = WsConn(b"", Dialect(), Stats())
        conn.upgraded = True
        joined = conn.join("r")
        conn.data_received(_frame(b'{"type":"system","event":"room.joined","data":{"room_id":"r",'
                                  b'"user_id":"ws-2a-04711","users":[]}}'))
        assert joined.done() and conn.ident == "ws-2a-04711"
        conn.counting = True
        conn.data_received(_frame(b'{"type":"system","event":"resync","data":{"room_id":"r"}}'))
        assert conn.resynced and conn.count == 0

    asyncio.run(check())


def test_a_missed_delivery_is_put_down_to_what_the_client_can_tell() -> None:
    async def check() -> None:
        loop = asyncio.get_running_loop()

        def member(ident: str, *, joined: bool = True) -> WsConn:
            conn = WsConn(b"", Dialect(), Stats())
            conn.ident = ident
            conn.joined = loop.create_future()
            if joined:
                conn.joined.set_result(None)
            return conn

        publisher = member("ws-a9-27246")
        assert loadgen._why_missed(member("ws-a9-27246"), publisher) == loadgen.SAME_ID
        assert loadgen._why_missed(member("ws-aa-27246", joined=False), publisher) == "its join was never acknowledged"
        resynced = member("ws-ab-27246")
        resynced.resynced = True
        assert loadgen._why_missed(resynced, publisher) == "got resync instead"
        assert loadgen._why_missed(member("ws-ac-27246"), publisher) == "open and joined, nothing came"
        assert "publisher" in loadgen._why_missed(member("x"), member("p", joined=False))

    asyncio.run(check())


def test_capacity_section_shows_the_causes_of_missed_deliveries() -> None:
    row = {"server": "workers", "label": "3 workers", "target": 50_000, "held": 50_001, "kb_per_connection": 27.0,
           "open_seconds": 66.0, "deliveries": 49_496, "deliveries_expected": 49_500, "deliver_seconds": 1.05,
           "server_fds": 50_053, "failures": 0, "server_alive": True, "errors": [],
           "missed": {loadgen.SAME_ID: 4}, "missed_examples": ["cap-0-7: member ws-a9-27246 (...)"]}
    text = "\n".join(report.capacity_section(cases.Case("capacity", "c", rows=[row])))
    assert f"49,496 of 49,500 (missed: 4 {loadgen.SAME_ID})" in text
    assert "a member that got nothing: cap-0-7: member ws-a9-27246" in text
