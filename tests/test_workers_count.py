"""How many workers ``forge-streaming serve`` runs when nobody says (``server.workers: auto``).

One per core the process may use, on a shared backend and a fixed port; a
container's CPU quota counts, not the host's cores (``os.cpu_count()``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from forge_streaming.workers import cgroup_cpu_quota, resolve_workers, usable_cores


def _cgroup(root: Path, relative: str, cpu_max: str) -> None:
    folder = root / relative
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")


def test_a_number_is_taken_as_it_is() -> None:
    assert resolve_workers(3, shared=False, port=8080) == 3
    assert resolve_workers(1, shared=True, port=0) == 1


def test_auto_is_one_process_where_workers_could_not_share_rooms_or_the_port() -> None:
    assert resolve_workers("auto", shared=False, port=8080) == 1
    assert resolve_workers("auto", shared=True, port=0) == 1


def test_auto_on_a_shared_backend_is_one_worker_per_usable_core() -> None:
    assert resolve_workers("auto", shared=True, port=8080) == usable_cores()


def test_usable_cores_are_the_affinity_without_a_quota(tmp_path: Path) -> None:
    assert usable_cores(tmp_path) == len(os.sched_getaffinity(0))


def test_a_quota_caps_the_cores_and_a_fraction_counts_as_a_whole_core(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None
    _cgroup(tmp_path, "", "150000 100000")
    assert cgroup_cpu_quota(tmp_path, "0::/\n") == 1.5
    assert usable_cores(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    _cgroup(tmp_path, "", "50000 100000")
    assert usable_cores(tmp_path) == 1  # half a core: still one worker


def test_the_smallest_quota_on_the_way_to_the_root_counts(tmp_path: Path) -> None:
    membership = "12:cpu:/ignored-v1-line\n0::/system.slice/app.service\n"
    _cgroup(tmp_path, "system.slice/app.service", "max 100000")
    assert cgroup_cpu_quota(tmp_path, membership) is None
    _cgroup(tmp_path, "system.slice", "300000 100000")
    _cgroup(tmp_path, "", "max 100000")
    assert cgroup_cpu_quota(tmp_path, membership) == 3.0
    _cgroup(tmp_path, "system.slice/app.service", "200000 100000")
    assert cgroup_cpu_quota(tmp_path, membership) == 2.0


@pytest.mark.parametrize("membership", ["", "1:name=systemd:/\n"])
def test_no_cgroup_v2_line_is_no_quota(tmp_path: Path, membership: str) -> None:
    _cgroup(tmp_path, "", "100000 100000")
    assert cgroup_cpu_quota(tmp_path, membership) is None


@pytest.mark.parametrize("text", ["garbage", "1 2 3", "100000 0"])
def test_an_unreadable_cpu_max_is_no_quota(tmp_path: Path, text: str) -> None:
    _cgroup(tmp_path, "", text)
    assert cgroup_cpu_quota(tmp_path, "0::/\n") is None
