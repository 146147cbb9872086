"""The startup case (issue 19): it starts both servers, times them to a 200 and reports; no timing asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from forge_streaming_bench import cases, report, startup
from forge_streaming_bench.__main__ import ALL_CASES

pytestmark = pytest.mark.timeout(120)


def test_startup_is_a_registered_case() -> None:
    assert "startup" in ALL_CASES and cases.CASES["startup"] is startup.startup


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("forge_streaming_websocket") is None,
                    reason="the WebSocket transport plugin is not installed")
def test_startup_case_times_ours_and_the_minimal_app_and_renders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setattr(startup, "ROUNDS", 1)
    opts = cases.Options(sizes=[20], deliveries=400, repeats=1, echo_pairs=5, echo_rounds=5, idle_connections=50,
                         capacity_target=0, probe_messages=10, servers=["ours"], workdir=tmp_path)
    case = startup.startup(opts)
    row = case.rows[0]
    assert "error" not in row, row
    assert row["ours_s"] > 0 and row["minimal_s"] > 0 and len(row["ours_runs"]) == 1
    assert row["ratio"] == pytest.approx(row["ours_s"] / row["minimal_s"])
    text = "\n".join(report.SECTIONS["startup"](case))
    assert "forge-streaming serve" in text and "uvicorn app:app" in text


def test_import_profile_names_the_kernel() -> None:
    names = [name.strip() for name, _, _ in startup.import_profile("import forge_streaming", top=50)]
    assert "forge_streaming" in names
