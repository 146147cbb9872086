"""Several worker processes on one node: ``forge-streaming serve --workers N``.

Python's event loop uses one core, so a node with more cores runs one
process per core. The supervisor (the process the user started) starts N
workers, each ``forge-streaming serve`` with the same arguments; every
worker binds the HTTP port with ``SO_REUSEPORT`` (WebTransport's UDP port
already is), so the OS spreads connections over them. Rooms span the
workers through the configured pub/sub backend, as they span nodes: each
worker is a node of the cluster (``server.node_id`` gets ``-1``, ``-2``, ...
when set). The memory backend cannot do that, so it is refused.

A worker that dies is started again (after a pause that grows while it
keeps dying young). SIGTERM or SIGINT to the supervisor is passed on, the
workers drain their clients, and the supervisor waits for them. A
supervisor killed outright (SIGKILL, a crash) passes nothing on: each
worker looks for it once a second and, once it is gone, drains and exits
as on SIGTERM, rather than hold the port with nobody to stop or restart it.

Each worker writes a small status file (:class:`WorkerBoard`) into a
directory the supervisor made, once a second; ``/healthz`` and
``/api/stats`` of any worker read them all, so one request covers the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .service import Streaming

log = logging.getLogger("forge_streaming.workers")

WORKER_ENV = "FORGE_STREAMING_WORKER"
"""Set by the supervisor in each worker: ``<index>/<count>``, e.g. ``2/4``."""
BOARD_ENV = "FORGE_STREAMING_WORKERS_DIR"
"""Set by the supervisor in each worker: the directory of the workers' status files."""
SUPERVISOR_ENV = "FORGE_STREAMING_SUPERVISOR"
"""Set by the supervisor in each worker: its PID, which the worker's parent stays while it lives."""
NODE_ID_ENV = "FORGE_STREAMING__SERVER__NODE_ID"
"""The environment override of ``server.node_id``: each worker gets its own."""
BOARD_INTERVAL = 1.0
"""Seconds between two writes of a worker's status file."""
STALE_AFTER = 5.0
"""A status file older than this is a worker that is not running (or hangs)."""
RESTART_MAX_PAUSE = 10.0
"""The longest pause before starting again a worker that keeps dying young."""
YOUNG = 5.0
"""A worker that dies within this many seconds of its start died young: the next pause doubles."""


def worker_slot() -> tuple[int, int] | None:
    """``(index, count)`` in a worker process, None in any other."""
    value = os.environ.get(WORKER_ENV, "")
    index, sep, count = value.partition("/")
    if not sep or not index.isdigit() or not count.isdigit():
        return None
    return int(index), int(count)


CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where cgroup v2 is mounted: a container's CPU limit is a ``cpu.max`` file under it."""


def resolve_workers(value: int | str, *, shared: bool, port: int) -> int:
    """How many workers ``serve`` runs: ``value``, or for ``auto`` one per usable core.

    ``auto`` (the default) is a single process where workers could not
    share rooms (``shared`` False: the memory backend keeps rooms in one
    process) or one listening port (``port`` 0: each would get a port of its
    own); a number asks for exactly that, and the caller refuses what cannot work.
    """
    if value != "auto":
        return int(value)
    if not shared or port == 0:
        return 1
    return usable_cores()


def usable_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, capped by the CPU quota of its cgroups.

    ``os.cpu_count()`` counts the host's cores: a container limited to two
    CPUs on a 64-core host would start 64 workers, each with a 32nd of a
    core. A quota of 1.5 CPUs counts as 2 (one worker waiting for the
    other now and then costs less than a core left idle).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(cores, 1)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The smallest CPU quota (in CPUs) of this process's cgroup v2 and its parents; None if none is set.

    ``membership`` is the text of ``/proc/self/cgroup`` (read when None):
    its ``0::/path`` line names the cgroup, whose ``cpu.max`` holds
    ``<quota> <period>`` in microseconds, or ``max`` for no limit.
    """
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    relative = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    if relative is None:
        return None
    folder = root / relative.strip().lstrip("/")
    quotas: list[float] = []
    while True:
        with contextlib.suppress(OSError, ValueError, ZeroDivisionError):
            limit, period = (folder / "cpu.max").read_text().split()
            if limit != "max":
                quotas.append(int(limit) / int(period))
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(quotas) if quotas else None


class Supervisor:
    """Starts ``count`` workers running ``command``, starts them again when they die, stops them on a signal."""

    def __init__(self, command: Sequence[str], count: int, *, node_id: str | None,
                 env: Mapping[str, str] | None = None, stop_timeout: float = 15.0) -> None:
        self.command = list(command)
        self.count = count
        self.node_id = node_id
        self.env = dict(os.environ if env is None else env)
        self.stop_timeout = stop_timeout
        self.board_dir = Path(tempfile.mkdtemp(prefix="forge-streaming-workers-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.started: dict[int, float] = {}
        self.pause: dict[int, float] = {}
        self.restarts = 0
        self._stopping = False

    def _spawn(self, index: int) -> None:
        env = {**self.env, WORKER_ENV: f"{index}/{self.count}", BOARD_ENV: str(self.board_dir),
               SUPERVISOR_ENV: str(os.getpid())}
        if self.node_id:
            env[NODE_ID_ENV] = f"{self.node_id}-{index}"
        self.procs[index] = subprocess.Popen(self.command, env=env)
        self.started[index] = time.monotonic()
        log.info("worker %d of %d started (pid %d)", index, self.count, self.procs[index].pid)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stopping = True

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(1, self.count + 1):
                self._spawn(index)
            while not self._stopping:
                self._watch()
                time.sleep(0.2)
            return self._stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self.board_dir, ignore_errors=True)

    def _watch(self) -> None:
        """Start again every worker that exited (unless the node is stopping)."""
        now = time.monotonic()
        for index, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            lived = now - self.started[index]
            pause = min(self.pause.get(index, 0.5) * 2, RESTART_MAX_PAUSE) if lived < YOUNG else 0.0
            self.pause[index] = max(pause, 0.5)
            log.warning("worker %d (pid %d) exited with %s after %.1fs; starting it again in %.1fs",
                        index, proc.pid, code, lived, pause)
            deadline = now + pause
            while time.monotonic() < deadline and not self._stopping:
                time.sleep(0.1)
            if self._stopping:
                return
            self.restarts += 1
            self._spawn(index)

    def _stop(self) -> int:
        """Pass SIGTERM on (the workers drain their clients), wait, then kill what is left."""
        log.info("stopping %d workers", len(self.procs))
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                log.warning("worker pid %d did not stop within %.0fs; killing it", proc.pid, self.stop_timeout)
                proc.kill()
                proc.wait(5)
        return 0


class WorkerBoard:
    """The workers' status files: each worker writes its own, any worker reads them all.

    The same once-a-second loop looks for the worker's ``supervisor`` (its
    PID): once the worker's parent is another process, the supervisor is gone
    and the worker stops itself with SIGTERM (drained, as when the supervisor
    passes SIGTERM on).
    """

    def __init__(self, directory: Path, index: int, count: int, supervisor: int | None = None) -> None:
        self.directory = directory
        self.index = index
        self.count = count
        self.supervisor = supervisor
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls) -> WorkerBoard | None:
        slot, directory = worker_slot(), os.environ.get(BOARD_ENV)
        if slot is None or not directory:
            return None
        supervisor = os.environ.get(SUPERVISOR_ENV, "")
        return cls(Path(directory), *slot, supervisor=int(supervisor) if supervisor.isdigit() else None)

    def start(self, streaming: Streaming) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(streaming), name="forge-worker-board")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(OSError):
            (self.directory / f"worker-{self.index}.json").unlink()

    async def _run(self, streaming: Streaming) -> None:
        while True:
            if self.supervisor is not None and os.getppid() != self.supervisor:
                log.warning("worker %d: its supervisor (pid %d) is gone; draining and stopping", self.index,
                            self.supervisor)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                self.write(streaming)
            except OSError as exc:
                log.warning("worker %d: cannot write its status file in %s: %s", self.index, self.directory, exc)
            await asyncio.sleep(BOARD_INTERVAL)

    def write(self, streaming: Streaming) -> None:
        health = streaming.health()
        status = {"worker": self.index, "pid": os.getpid(), "node": streaming.node_id,
                  "state": streaming.state.value, "ok": health.ok and streaming.state.value == "running",
                  "backend": {"state": health.state.value, "detail": health.detail},
                  "connections": len(streaming.connections), "local_rooms": streaming.local_rooms(),
                  "time": time.time()}
        path = self.directory / f"worker-{self.index}.json"
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(status))
        temporary.replace(path)  # readers never see half a file

    def read(self) -> list[dict[str, Any]]:
        """Every worker's last status, by index; a missing or stale one says so (``ok`` false)."""
        now = time.time()
        workers = []
        for index in range(1, self.count + 1):
            path = self.directory / f"worker-{index}.json"
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                workers.append({"worker": index, "ok": False, "state": "not running"})
                continue
            age = now - float(status.get("time", 0))
            if not _alive(status.get("pid")):
                status.update(ok=False, state="exited")
            elif age > STALE_AFTER:
                status.update(ok=False, state=f"no status for {age:.0f}s")
            workers.append(status)
        return workers


def _alive(pid: object) -> bool:
    """Whether process ``pid`` exists (the workers of a node run on one host)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command a worker runs: this same ``forge-streaming serve`` invocation."""
    return [sys.executable, "-m", "forge_streaming.cli", *argv]
