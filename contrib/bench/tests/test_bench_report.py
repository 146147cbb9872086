"""The paced case's report: ratios to ours and to raw websockets, and the issue's two targets judged per cell."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forge_streaming_bench import cases, report


def _row(server: str, n: int, pace_ms: float, cpu: float) -> dict[str, Any]:
    return {"server": server, "label": server, "n": n, "pace_ms": pace_ms, "messages": 100,
            "server_us_per_delivery": cpu, "deliveries_per_s": 1000.0, "p50_ms": 1.0, "p99_ms": 2.0, "lost": 0,
            "out_of_order": 0, "client_us_per_delivery": 1.0, "runs": 1}


def _case(rows: list[dict[str, Any]]) -> cases.Case:
    return cases.Case("paced", "Paced WebSocket fan-out", rows=rows)


def test_paced_targets_are_judged_on_the_worst_cell() -> None:
    case = _case([_row("ours", 100, 2.0, 7.0), _row("ours-window-10ms", 100, 2.0, 4.0),
                  _row("websockets", 100, 2.0, 10.0), _row("ours", 100, 10.0, 9.0),
                  _row("ours-window-10ms", 100, 10.0, 6.0),
                  _row("websockets", 100, 10.0, 10.0)])
    rows = {row[0]: row for row in report.targets({"paced": case})}
    plain = next(v for k, v in rows.items() if "without a write window" in k)
    window = next(v for k, v in rows.items() if "10 ms window" in k)
    assert plain[1].startswith("0.70x, 0.90x") and plain[2] == "missed"  # 0.90x at every 10 ms misses 0.8x
    assert window[1].startswith("0.40x, 0.60x") and window[2] == "missed"
    case.rows[4]["server_us_per_delivery"] = 5.0
    case.rows[3]["server_us_per_delivery"] = 8.0
    rows = {row[0]: row for row in report.targets({"paced": case})}
    assert {v[2] for k, v in rows.items() if k.startswith("Paced")} == {"met"}


def test_paced_targets_and_table_take_the_rounds_own_ratios_when_the_case_alternated() -> None:
    # medians 8.0 / 10.0 = 0.80x, but the rounds' own ratios were 0.70x, 0.75x, 0.90x: 0.75x is the figure
    ours = _row("ours", 100, 2.0, 8.0) | {"paired_ratio": 0.75, "paired_rounds": [0.70, 0.75, 0.90]}
    case = _case([ours, _row("websockets", 100, 2.0, 10.0)])
    plain = next(row for row in report.targets({"paced": case}) if "without a write window" in row[0])
    assert plain[1].startswith("0.75x") and plain[2] == "met"
    assert "| ours | 8.00 | 1.00x | 0.75x |" in "\n".join(report.paced_section(case))


def test_paced_targets_not_measured_without_the_case_or_the_peer() -> None:
    for given in ({}, {"paced": _case([_row("ours", 100, 2.0, 7.0)])}):
        verdicts = {row[0]: row[2] for row in report.targets(given) if row[0].startswith("Paced")}
        assert set(verdicts.values()) == {report.NOT_MEASURED}


def test_paced_section_shows_both_ratios() -> None:
    case = _case([_row("ours", 1000, 10.0, 8.0), _row("websockets", 1000, 10.0, 10.0)])
    text = "\n".join(report.paced_section(case))
    assert "N = 1,000 members, one message every 10 ms" in text
    assert "| ours | 8.00 | 1.00x | 0.80x |" in text and "| websockets | 10.00 | 1.25x | 1.00x |" in text


def test_paced_runs_are_bounded_in_messages() -> None:
    opts = cases.Options(sizes=[100], deliveries=100, repeats=9, echo_pairs=1, echo_rounds=1, idle_connections=1,
                         capacity_target=0, probe_messages=1, servers=["ours"], workdir=Path("."),
                         paced_seconds=1e6)
    assert cases.paced_messages(opts, 0.002) == cases.PACED_MAX_MESSAGES
    opts.paced_seconds = 0.0
    assert cases.paced_messages(opts, 0.010) == 20
