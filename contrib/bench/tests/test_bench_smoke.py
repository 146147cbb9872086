"""Smoke run of the benchmark code: tiny N and M, our server and the raw websockets peer only.

Not a benchmark and no timing assertions: it checks that the harness still
starts servers, drives them from its load process, counts every delivery
and writes the report, so the code does not rot between benchmark runs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from forge_streaming_bench import cases, report
from forge_streaming_bench.__main__ import main

pytestmark = pytest.mark.timeout(120)
needs_websocket = pytest.mark.skipif(importlib.util.find_spec("forge_streaming_websocket") is None,
                                     reason="the WebSocket transport plugin is not installed")


def _options(tmp_path: Path, servers: list[str]) -> cases.Options:
    return cases.Options(sizes=[20], deliveries=400, repeats=1, echo_pairs=5, echo_rounds=5, idle_connections=50,
                         capacity_target=0, probe_messages=10, servers=servers, workdir=tmp_path)


@pytest.mark.slow
@needs_websocket
def test_fanout_counts_every_delivery_on_ours_and_raw_websockets(tmp_path: Path) -> None:
    case = cases.fanout(_options(tmp_path, ["ours", "websockets"]))
    assert not case.not_measured
    by_server = {row["server"]: row for row in case.rows}
    assert set(by_server) == {"ours", "websockets"}
    for row in by_server.values():
        assert "error" not in row, row
        assert row["received"] == row["expected"] == 20 * 20
        assert row["lost"] == 0 and row["out_of_order"] == 0
        assert row["server_us_per_delivery"] > 0
        assert row["latency_samples"] > 0


@pytest.mark.slow
@needs_websocket
def test_echo_and_idle_cases_run(tmp_path: Path) -> None:
    opts = _options(tmp_path, ["ours", "websockets"])
    opts.repeats = 2
    echo = cases.echo(opts)
    by_server = {row["server"]: row for row in echo.rows}
    assert by_server["ours"]["round_trips"] == by_server["websockets"]["round_trips"] == 25, echo.rows
    # the servers ran in turn, one run each per round: the target's ratio is paired per round
    assert len(by_server["ours"]["paired_rounds"]) == 2, echo.rows
    assert by_server["ours"]["paired_ratio"] in by_server["ours"]["paired_rounds"]
    target = next(row for row in report.targets({"echo": echo}) if row[0].startswith("Echo round trip"))
    assert target[1] == f"{by_server['ours']['paired_ratio']:.2f}x" and "2 alternating rounds" in target[3], target
    opts.servers = ["ours"]
    memory = cases.memory(opts)
    assert memory.rows[0]["held"] == 50, memory.rows


@pytest.mark.slow
@needs_websocket
def test_command_writes_the_report(tmp_path: Path) -> None:
    output = tmp_path / "BENCHMARKS.md"
    code = main(["--cases", "fanout", "--servers", "ours,websockets", "--sizes", "10", "--deliveries", "100",
                 "--repeats", "1", "--output", str(output), "--workdir", str(tmp_path / "work")])
    assert code == 0
    text = output.read_text()
    assert "WebSocket room fan-out" in text and "websockets.broadcast" in text
    assert "<= 1.0x raw websockets.broadcast" in text
    assert report.NOT_MEASURED in text  # the cases not asked for are listed as not measured


def test_unknown_case_is_refused(tmp_path: Path) -> None:
    assert main(["--cases", "nope", "--output", str(tmp_path / "B.md")]) == 2


@pytest.mark.slow
@needs_websocket
def test_sse_case_pairs_ours_on_sse_with_ours_on_websocket(tmp_path: Path) -> None:
    case = cases.sse(_options(tmp_path, ["ours"]))
    by_server = {row["server"]: row for row in case.rows}
    assert set(by_server) == {"ours", "ours-ws"}, case.rows
    for row in by_server.values():
        assert row["received"] == row["expected"] == 20 * 20 and row["lost"] == 0, row
    assert len(by_server["ours"]["paired_rounds"]) == cases.SSE_ROUNDS
    assert any("alternating runs" in note for note in case.notes)


@pytest.mark.slow
@needs_websocket
@pytest.mark.skipif(importlib.util.find_spec("forge_streaming_mqtt") is None, reason="the MQTT plugin is not installed")
def test_mqtt_case_measures_two_nodes_beside_one(tmp_path: Path) -> None:
    case = cases.mqtt(_options(tmp_path, ["ours"]))
    if case.not_measured:
        pytest.skip(str(case.not_measured))
    by_server = {row["server"]: row for row in case.rows}
    assert set(by_server) == {"one-node", "two-nodes"}, case.rows
    two = by_server["two-nodes"]
    assert two["received"] == two["expected"] == 20 * 20 and two["lost"] == 0, two
    assert len(two["server_cpu_by_process"]) == 2 and two["probe_p50_ms"] > 0
    assert len(two["paired_rounds"]) == cases.MQTT_ROUNDS
    assert "two nodes" in "\n".join(report.mqtt_section(case))


@pytest.mark.slow
@needs_websocket
def test_paced_case_runs_ours_with_and_without_window_beside_raw_websockets(tmp_path: Path) -> None:
    opts = _options(tmp_path, ["ours", "websockets"])
    opts.paced_seconds = 0.04  # 20 messages at either pace (the floor): bounded in count
    opts.repeats = 2  # two rounds, every server once per round
    case = cases.paced(opts)
    assert not case.not_measured
    servers = ["ours", *(f"ours-window-{ms}ms" for ms in cases.WINDOWS_MS), "websockets"]
    assert [(r["server"], r["pace_ms"]) for r in case.rows] == [(s, p * 1e3) for p in cases.PACES for s in servers]
    for row in case.rows:
        assert "error" not in row, row
        assert row["received"] == row["expected"] == 20 * 20 and row["lost"] == 0 and row["out_of_order"] == 0, row
        assert row["server_us_per_delivery"] > 0 and row["runs"] == 2
        # ours' rows carry the rounds' own ratios to raw websockets (the targets' figure)
        assert len(row.get("paired_rounds", [])) == (2 if row["server"].startswith("ours") else 0), row
    text = "\n".join(report.paced_section(case))
    assert "one message every 2 ms" in text and "flush_window 10ms" in text
    targets = {row[0]: row for row in report.targets({"paced": case})}
    window_target = next(t for t in targets if "10 ms window" in t)
    assert targets[window_target][2] in ("met", "missed")  # measured, whichever way it went here


@pytest.mark.slow
@needs_websocket
@pytest.mark.skipif(importlib.util.find_spec("forge_streaming_mqtt") is None, reason="the MQTT plugin is not installed")
def test_workers_case_measures_two_workers_beside_one_every_process_counted(tmp_path: Path) -> None:
    opts = _options(tmp_path, ["ours"])
    opts.paced_seconds = 0.2  # 20 messages every 10 ms: bounded in count
    case = cases.workers(opts)
    if case.not_measured:
        pytest.skip(str(case.not_measured))
    rows = {(row["server"], row["mode"]): row for row in case.rows}
    assert set(rows) == {(s, m) for s in ("one-worker", "two-workers") for m in ("burst", "paced")}, case.rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["received"] == row["expected"] == 20 * row["messages"] and row["lost"] == 0, row
    for mode in ("burst", "paced"):
        one, two = rows[("one-worker", mode)], rows[("two-workers", mode)]
        assert len(one["server_cpu_by_process"]) == 2  # the process and its broker
        assert len(two["server_cpu_by_process"]) == 4  # the supervisor, two workers, the broker
        assert [w["connections"] for w in one["members_by_worker"]] == [20]
        assert len(two["members_by_worker"]) == 2 and sum(w["connections"] for w in two["members_by_worker"]) == 20
        assert len(two["paired_rounds"]) == cases.WORKERS_ROUNDS
    text = "\n".join(report.workers_section(case))
    assert "Paced: N = 20 members, one message every 10 ms" in text and "supervisor" in text
    verdict = next(row[2] for row in report.targets({"workers": case}) if row[0].startswith("Two workers"))
    assert verdict in ("met", "missed")  # measured, whichever way it went here
