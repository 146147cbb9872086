"""``forge-streaming serve --workers 2`` on the MQTT backend: one port, rooms shared, a dead worker restarted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from forge_streaming.testing import ServerProcess, free_port
from websockets.asyncio.client import ClientConnection, connect

VENV_BIN = Path(sys.executable).parent
API_KEY = "workers-key"

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(90)]


class Supervised:
    """A ``forge-streaming serve --workers N`` process (the supervisor), stopped by its PID."""

    def __init__(self, broker: Any, workdir: Path, workers: int | None, cores: set[int] | None = None) -> None:
        """``workers`` None: no ``--workers``, serve's default; ``cores``: the CPUs the process may run on."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {"server": {"node_id": "multi", "drain_timeout": "1s"},
                  "pubsub": {"backend": "mqtt", "mqtt": {"url": broker.url, "topic_prefix": f"w{self.port}",
                                                         "keepalive": "2s"}},
                  "rooms": {"store": "mqtt"}, "api": {"key": API_KEY}}
        path = workdir / "multi.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log = workdir / "multi.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "forge-streaming"), "serve", "--port", str(self.port), "--config", str(path),
                 *([] if workers is None else ["--workers", str(workers)])], stdout=out, stderr=out,
                preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores))

    def health(self) -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"{self.url}/healthz", timeout=2)
        return response.status_code, response.json()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/stats", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=2)
        return dict(response.json())

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode


async def until_healthy(node: Supervised, workers: int, timeout: float = 30.0,
                        gone: int | None = None) -> dict[str, Any]:
    """Wait until /healthz is 200 and lists ``workers`` workers, every one ok (and none with PID ``gone``)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        assert node.proc.poll() is None, f"the supervisor exited: {node.log.read_text()[-3000:]}"
        try:
            status, body = await asyncio.to_thread(node.health)
            last = body
            listed = body.get("workers", [])
            if status == 200 and len(listed) == workers and all(w["ok"] and w["pid"] != gone for w in listed):
                return body
        except httpx.HTTPError as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"not healthy with {workers} workers in {timeout}s: {last}; {node.log.read_text()[-3000:]}")


async def joined(url: str, room: str) -> ClientConnection:
    ws = await connect(url)
    await ws.send(json.dumps({"type": "join", "room_id": room}))
    while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("event") != "room.joined":
        pass
    return ws


async def messages(ws: ClientConnection, count: int) -> list[Any]:
    got: list[Any] = []
    while len(got) < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame.get("type") == "message":
            got.append(frame["data"])
    return got


async def test_two_workers_share_one_port_and_the_rooms_and_a_dead_worker_comes_back(
        broker: Any, tmp_path: Path) -> None:
    node = Supervised(broker, tmp_path, workers=2)
    try:
        body = await until_healthy(node, 2)
        assert sorted(w["node"] for w in body["workers"]) == ["multi-1", "multi-2"]
        members = [await joined(f"ws://127.0.0.1:{node.port}/ws", "shared") for _ in range(16)]
        deadline = time.monotonic() + 5  # each worker writes its status once a second
        while True:
            workers = (await asyncio.to_thread(node.stats))["workers"]
            per_worker = {w["worker"]: w.get("connections", 0) for w in workers}
            if sum(per_worker.values()) == 16 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert all(per_worker.get(i, 0) > 0 for i in (1, 2)), f"the OS spread 16 clients over both: {per_worker}"
        await members[0].send(json.dumps({"type": "message", "room_id": "shared", "data": "to every worker"}))
        for ws in members[1:]:
            assert await messages(ws, 1) == ["to every worker"]
        for ws in members:
            await ws.close()

        victim = body["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)
        again = await until_healthy(node, 2, gone=victim["pid"])  # the dead worker was started again
        late = await joined(f"ws://127.0.0.1:{node.port}/ws", "shared")
        other = await joined(f"ws://127.0.0.1:{node.port}/ws", "shared")
        await late.send(json.dumps({"type": "message", "room_id": "shared", "data": "after the restart"}))
        assert await messages(other, 1) == ["after the restart"]
        await late.close()
        await other.close()
        pids = [w["pid"] for w in again["workers"]]
    finally:
        code = node.stop()
    assert code == 0, node.log.read_text()[-3000:]
    for pid in pids:  # the supervisor stopped its workers before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_several_workers_on_the_memory_backend_are_refused(tmp_path: Path) -> None:
    done = subprocess.run([str(VENV_BIN / "forge-streaming"), "serve", "--port", str(free_port()), "--workers", "2"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "pubsub.backend is 'memory'" in done.stderr and "--workers 1" in done.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to run on")
async def test_on_a_shared_backend_serve_runs_one_worker_per_core_it_may_use(broker: Any, tmp_path: Path) -> None:
    """No ``--workers``, no ``server.workers``: the default ``auto`` counts the cores of the process's affinity."""
    node = Supervised(broker, tmp_path, workers=None, cores=set(sorted(os.sched_getaffinity(0))[:2]))
    try:
        body = await until_healthy(node, 2)
        assert sorted(w["node"] for w in body["workers"]) == ["multi-1", "multi-2"]
        assert "with 2 workers" in node.log.read_text()
    finally:
        code = node.stop()
    assert code == 0, node.log.read_text()[-3000:]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to run on")
def test_on_the_memory_backend_auto_is_one_process(tmp_path: Path) -> None:
    """``auto`` (the default) on the memory backend is one process: rooms in memory cannot span workers."""
    server = ServerProcess(tmp_path, "--workers", "auto")
    try:
        assert "workers" not in httpx.get(f"{server.url}/healthz", timeout=5).json()
        assert "worker" not in server.output()
    finally:
        assert server.stop() == 0  # SIGINT: drained, exit status 0


async def test_workers_whose_supervisor_was_killed_drain_and_exit(broker: Any, tmp_path: Path) -> None:
    """``kill -9`` of the supervisor (no SIGTERM to pass on): its workers notice, drain and exit within seconds,
    instead of holding the port and the broker's rooms with nobody to stop them."""
    node = Supervised(broker, tmp_path, workers=2)
    pids: list[int] = []
    try:
        body = await until_healthy(node, 2)
        pids = [w["pid"] for w in body["workers"]]
        member = await joined(f"ws://127.0.0.1:{node.port}/ws", "orphans")
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(5)
        deadline = time.monotonic() + 15  # a look once a second, then drain_timeout (1 s)
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            alive = [pid for pid in alive if _running(pid)]
        assert alive == [], f"workers still running after their supervisor died: {alive}"
        with pytest.raises(Exception):  # noqa: B017 - closed by the drain (a close frame) or by the exit
            while True:
                await asyncio.wait_for(member.recv(), 5)
        assert "supervisor" in node.log.read_text() and "is gone" in node.log.read_text()
    finally:
        for pid in pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        node.stop()


def _running(pid: int) -> bool:
    """True while ``pid`` is a live process (not yet exited, or exited but not reaped: a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
