"""The contract kit: test suites every backend and room store runs against itself.

Subclass in a test module and say how to build the thing under test::

    from forge_streaming.testing import PubSubBackendContract

    class TestMyBackend(PubSubBackendContract):
        def make_backend(self):
            return MyBackend(...)

Each test runs its own event loop (``asyncio.run``) with a time bound, so
the kit needs no pytest plugin. A backend that spans nodes also defines
``make_backend`` so that two calls make two nodes on one shared medium
(the memory backend is one node only: it sets ``multi_node = False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Collection, Coroutine
from pathlib import Path
from typing import Any

from .connection import CloseCode, Connection, ConnectionRequest
from .errors import ConnectionClosed, Refused
from .frames import Message, OutboundFrame
from .hookspecs import hookimpl
from .pubsub import BackendState, Envelope, EnvelopeKind, PubSubBackend
from .rooms import Member, RoomStore
from .service import Streaming

DEFAULT_TIMEOUT = 10.0


def _skip(reason: str) -> None:
    """Skip the running test under pytest (a multi-node test must not pass without a second node)."""
    import pytest

    pytest.skip(reason)


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
                     interval: float = 0.01) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; fail after ``timeout`` seconds.

    Returns the truthy value. The one wait helper of the project's tests.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await _maybe_await(predicate())
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


class RoomClient:
    """A room-protocol client for tests: keeps every frame it receives, joins and sends.

    ``ws`` is any connection with ``async send(text)``, ``async close()`` and
    ``async for`` over the text frames it receives (a websockets client).
    """

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                self.frames.append(json.loads(raw))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def data(self) -> list[Any]:
        """The ``data`` of every room message received, in order."""
        return [f["data"] for f in self.of("message")]

    def messages(self) -> list[tuple[int, Any]]:
        """``(position, data)`` of every room message received, in order."""
        return [(f["sequence"], f["data"]) for f in self.of("message")]

    def events(self) -> list[str]:
        return [f.get("event", "") for f in self.of("system")]

    def joined(self, room: str) -> dict[str, Any]:
        """The ``room.joined`` frame's data for ``room``."""
        return next(f["data"] for f in self.of("system") if f.get("event") == "room.joined"
                    and f["data"]["room_id"] == room)

    async def join(self, room: str, since: int | None = None, timeout: float = 15.0) -> None:
        frame: dict[str, Any] = {"type": "join", "room_id": room}
        if since is not None:
            frame["since"] = since
        await self.ws.send(json.dumps(frame))
        await eventually(lambda: any(f.get("event") == "room.joined" and f["data"]["room_id"] == room
                                     for f in self.of("system")), timeout, what=f"joining {room}")

    async def send(self, room: str, data: Any) -> None:
        await self.ws.send(json.dumps({"type": "message", "room_id": room, "data": data}))

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()


def run(coro: Coroutine[Any, Any, Any], timeout: float = DEFAULT_TIMEOUT) -> Any:
    """Run ``coro`` in a fresh event loop, failing after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class RecordingListener:
    """A BackendListener that keeps what it receives and lets tests wait for it."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []
        self.resyncs: list[str] = []
        self.resynced_rooms: list[list[str] | None] = []  # per resync: its rooms, None for every room
        self.ingested: list[tuple[str, Any, str]] = []
        self._changed = asyncio.Event()

    def on_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        self._changed.set()

    async def ingest(self, room: str, data: Any, *, user_id: str) -> None:
        self.ingested.append((room, data, user_id))
        self._changed.set()

    def on_resync(self, reason: str, rooms: Collection[str] | None = None) -> None:
        self.resyncs.append(reason)
        self.resynced_rooms.append(None if rooms is None else sorted(rooms))
        self._changed.set()

    async def wait_for(self, predicate: Callable[[list[Envelope]], bool], timeout: float = 5.0) -> None:
        async def waiter() -> None:
            while not predicate(self.envelopes):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(waiter(), timeout)

    def payloads(self, room: str | None = None) -> list[bytes]:
        return [e.payload for e in self.envelopes if room is None or e.room == room]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class PubSubBackendContract:
    """What every pub/sub backend promises the kernel."""

    multi_node = True
    """False for a backend that cannot span nodes (memory): skips the two-node tests."""

    def make_backend(self) -> PubSubBackend | Awaitable[PubSubBackend]:
        raise NotImplementedError("define make_backend() in your test class")

    async def _started(self, node: str) -> tuple[PubSubBackend, RecordingListener]:
        backend: PubSubBackend = await _maybe_await(self.make_backend())
        listener = RecordingListener()
        await backend.start(node, listener)
        return backend, listener

    @staticmethod
    def _envelope(room: str, n: int, *, sender: str | None = None, node: str = "n1") -> Envelope:
        """A room message as the kernel publishes it: no position yet (the backend sets it)."""
        return Envelope(room=room, payload=f'{{"n":{n}}}'.encode(), kind=EnvelopeKind.MESSAGE, sender=sender,
                        node=node)

    @staticmethod
    def _assert_one_order(envelopes: list[Envelope], room: str) -> list[int]:
        """``room``'s positions as delivered: each set, each above the one before (so none twice)."""
        positions = [e.sequence for e in envelopes if e.room == room and e.kind is EnvelopeKind.MESSAGE]
        assert all(isinstance(p, int) and p > 0 for p in positions), f"a room message without a position: {positions}"
        numbers = [p for p in positions if p is not None]
        out_of_order = [(a, b) for a, b in zip(numbers, numbers[1:], strict=False) if b <= a]
        assert not out_of_order, f"positions not strictly increasing in delivery order: {out_of_order[:5]}"
        return numbers

    def test_publish_reaches_subscriber_with_every_field(self) -> None:
        async def scenario() -> None:
            backend, listener = await self._started("n1")
            try:
                await backend.subscribe("room-a")
                sent = Envelope(room="room-a", payload='{"x":"é"}'.encode(), kind=EnvelopeKind.MESSAGE,
                                sender="ws-1", node="n1", id="m-1")
                await backend.publish(sent)
                binary = Envelope(room="room-a", payload=b'{"type":"message"}\n\x00\xff', kind=EnvelopeKind.MESSAGE,
                                  node="n1", binary=True)
                await backend.publish(binary)
                await listener.wait_for(lambda e: len(e) >= 2)
                got = listener.envelopes[0]
                assert (got.room, got.payload, got.kind, got.sender, got.id) == (
                    "room-a", sent.payload, EnvelopeKind.MESSAGE, "ws-1", "m-1")
                assert isinstance(got.sequence, int) and got.sequence > 0, "the backend sets the position"
                assert (listener.envelopes[1].payload, listener.envelopes[1].binary) == (binary.payload, True)
                notice = Envelope(room="room-a", payload=b'{"type":"typing"}', kind=EnvelopeKind.NOTICE, node="n1")
                await backend.publish(notice)
                await listener.wait_for(lambda e: len(e) >= 3)
                assert listener.envelopes[2].kind is EnvelopeKind.NOTICE
                assert listener.envelopes[2].sequence is None
            finally:
                await backend.stop()

        run(scenario())

    def test_order_is_kept_per_publisher(self) -> None:
        async def scenario() -> None:
            backend, listener = await self._started("n1")
            try:
                await backend.subscribe("room-a")
                for n in range(200):
                    await backend.publish(self._envelope("room-a", n))
                await listener.wait_for(lambda e: len(e) >= 200)
                assert listener.payloads() == [f'{{"n":{n}}}'.encode() for n in range(200)]
            finally:
                await backend.stop()

        run(scenario())

    def test_positions_are_unique_and_increase_per_room(self) -> None:
        async def scenario() -> None:
            backend, listener = await self._started("n1")
            try:
                await backend.subscribe("room-a")
                await backend.subscribe("room-b")
                for n in range(150):
                    await backend.publish(self._envelope("room-a" if n % 3 else "room-b", n))
                await listener.wait_for(lambda e: len(e) >= 150)
                assert len(self._assert_one_order(listener.envelopes, "room-a")) == 100
                assert len(self._assert_one_order(listener.envelopes, "room-b")) == 50
                latest = await backend.position("room-a")
                last_a = [e for e in listener.envelopes if e.room == "room-a"][-1]
                assert latest is None or latest == last_a.sequence, (
                    "position() is None (unknown) or the room's latest position")
                before = await backend.position("room-quiet")
                if before is not None:
                    await backend.subscribe("room-quiet")
                    await backend.publish(self._envelope("room-quiet", 1))
                    await listener.wait_for(lambda e: any(x.room == "room-quiet" for x in e))
                    first = listener.envelopes[-1].sequence or 0
                    assert first > before, "a room's first position is above where the room stood"
            finally:
                await backend.stop()

        run(scenario())

    def test_unsubscribed_rooms_are_not_delivered(self) -> None:
        async def scenario() -> None:
            backend, listener = await self._started("n1")
            try:
                await backend.subscribe("room-a")
                await backend.subscribe("room-a")  # idempotent
                await backend.publish(self._envelope("room-b", 1))
                await backend.publish(self._envelope("room-a", 2))
                await listener.wait_for(lambda e: len(e) >= 1)
                await backend.unsubscribe("room-a")
                await backend.unsubscribe("room-a")  # idempotent
                await backend.subscribe("room-c")
                await backend.publish(self._envelope("room-a", 3))
                await backend.publish(self._envelope("room-c", 4))
                await listener.wait_for(lambda e: any(x.room == "room-c" for x in e))
                assert [e.room for e in listener.envelopes] == ["room-a", "room-c"]
            finally:
                await backend.stop()

        run(scenario())

    def test_health_is_up_once_started(self) -> None:
        async def scenario() -> None:
            backend, _ = await self._started("n1")
            try:
                assert backend.health().state is BackendState.UP
            finally:
                await backend.stop()

        run(scenario())

    def test_two_nodes_each_receive_every_message_once(self) -> None:
        if not self.multi_node:
            _skip("this backend spans one node only (multi_node = False)")

        async def scenario() -> None:
            a, la = await self._started("node-a")
            b, lb = await self._started("node-b")
            try:
                await a.subscribe("shared")
                await b.subscribe("shared")
                await asyncio.sleep(0.2)
                for n in range(50):
                    await (a if n % 2 else b).publish(self._envelope("shared", n, node="node-a" if n % 2 else "node-b"))
                await la.wait_for(lambda e: len(e) >= 50)
                await lb.wait_for(lambda e: len(e) >= 50)
                await asyncio.sleep(0.2)
                for listener in (la, lb):
                    got = sorted(listener.payloads())
                    assert got == sorted(f'{{"n":{n}}}'.encode() for n in range(50)), "lost or duplicated"
            finally:
                await a.stop()
                await b.stop()

        run(scenario())

    def test_concurrent_publishers_on_three_nodes_give_one_order(self) -> None:
        """Every node hands the room's messages back in one order, under the same positions."""
        if not self.multi_node:
            _skip("this backend spans one node only (multi_node = False)")

        async def scenario() -> None:
            nodes = [await self._started(f"node-{name}") for name in "abc"]
            try:
                for backend, _ in nodes:
                    await backend.subscribe("shared")
                await asyncio.sleep(0.3)

                async def publisher(index: int) -> None:
                    backend = nodes[index][0]
                    for n in range(100):
                        await backend.publish(self._envelope("shared", index * 1000 + n, node=f"node-{'abc'[index]}"))
                        if n % 10 == 0:
                            await asyncio.sleep(0)

                await asyncio.gather(*(publisher(i) for i in range(3)))
                for _, listener in nodes:
                    await listener.wait_for(lambda e: len(e) >= 300, timeout=10)
                await asyncio.sleep(0.2)
                orders = []
                for _, listener in nodes:
                    positions = self._assert_one_order(listener.envelopes, "shared")
                    assert len(positions) == 300, f"{len(positions)} of 300 delivered"
                    orders.append([(e.sequence, e.payload) for e in listener.envelopes])
                assert orders[0] == orders[1] == orders[2], "nodes disagree on the room's order or positions"
            finally:
                for backend, _ in nodes:
                    await backend.stop()

        run(scenario(), timeout=30)


class RoomStoreContract:
    """What every room store promises the kernel."""

    multi_node = True

    def make_store(self) -> RoomStore | Awaitable[RoomStore]:
        raise NotImplementedError("define make_store() in your test class")

    async def _started(self, node: str) -> RoomStore:
        store: RoomStore = await _maybe_await(self.make_store())
        await store.start(node)
        return store

    def test_members_in_join_order_and_idempotent(self) -> None:
        async def scenario() -> None:
            store = await self._started("n1")
            try:
                await store.add_member("r", Member("c1", "alice", "n1", "websocket"))
                await store.add_member("r", Member("c2", "bob", "n1", "sse"))
                await store.add_member("r", Member("c1", "alice", "n1", "websocket"))
                await store.add_member("r", Member("c3", "alice", "n1", "sse"))
                assert [m.connection_id for m in await store.members("r")] == ["c1", "c2", "c3"]
                assert await store.users("r") == ["alice", "bob"]
            finally:
                await store.stop()

        run(scenario())

    def test_empty_rooms_disappear(self) -> None:
        async def scenario() -> None:
            store = await self._started("n1")
            try:
                await store.add_member("b", Member("c1", "alice", "n1"))
                await store.add_member("a", Member("c2", "bob", "n1"))
                assert await store.rooms() == ["a", "b"]
                await store.remove_member("b", "c1")
                await store.remove_member("b", "c1")
                await store.remove_member("nowhere", "c9")
                assert await store.rooms() == ["a"]
                assert await store.members("b") == []
            finally:
                await store.stop()

        run(scenario())

    def test_two_nodes_share_membership(self) -> None:
        if not self.multi_node:
            _skip("this backend spans one node only (multi_node = False)")

        async def scenario() -> None:
            a = await self._started("node-a")
            b = await self._started("node-b")
            try:
                await a.add_member("r", Member("a1", "alice", "node-a"))
                await b.add_member("r", Member("b1", "bob", "node-b"))

                async def both_see_both() -> None:
                    while True:
                        users_a, users_b = set(await a.users("r")), set(await b.users("r"))
                        if users_a == users_b == {"alice", "bob"}:
                            return
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(both_see_both(), 5)
                await b.remove_member("r", "b1")

                async def bob_gone() -> None:
                    while "bob" in await a.users("r"):
                        await asyncio.sleep(0.05)

                await asyncio.wait_for(bob_gone(), 5)
            finally:
                await a.stop()
                await b.stop()

        run(scenario())


# -- running real servers in tests -----------------------------------------------------


_handed_out: set[int] = set()


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default start


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    """Wait until something accepts TCP connections on ``host``:``port`` (a broker or server a test started)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")


def free_port(host: str = "127.0.0.1") -> int:
    """A port number free on ``host`` for both TCP and UDP (HTTP and HTTP/3 share it).

    Drawn below the kernel's ephemeral range: a port the OS picked (bind to 0) can be taken by any
    outgoing connection's local end before the server that was meant to use it binds it, which made
    "address already in use" a flake. Ports already handed out by this process are not reused.
    """
    import random
    import socket

    high = min(_ephemeral_start(), 65536) - 1
    low = max(1024, high - 12_000)
    for _ in range(200):
        # an ephemeral range that starts too low leaves no room below it: let the OS pick, as before
        port = random.randint(low, high) if high - low >= 1000 else 0
        if port in _handed_out:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                tcp.bind((host, port))
                port = int(tcp.getsockname()[1])
                udp.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no port free for both TCP and UDP on {host} between {low} and {high}")


class RunningServer:
    """A uvicorn server started by a test: its URLs and its Streaming service."""

    def __init__(self, host: str, port: int, streaming: Any) -> None:
        self.host = host
        self.port = port
        self.streaming = streaming
        self.url = f"http://{host}:{port}"
        self.ws_url = f"ws://{host}:{port}"


def serve(target: Any, *, host: str = "127.0.0.1", port: int | None = None,
          startup_timeout: float = 10.0) -> Any:
    """``async with serve(streaming_or_app) as server:`` runs uvicorn in this event loop.

    Uses the same server as ``forge-streaming serve`` (the transports'
    protocol classes, the HTTP header and body deadlines, draining
    shutdown). Stops on exit.
    """
    from contextlib import asynccontextmanager

    from .cli import _find_streaming, build_server
    from .service import Streaming

    @asynccontextmanager
    async def running() -> Any:
        streaming = _find_streaming(target)
        chosen = port if port is not None else free_port(host)
        if streaming is not None:
            streaming.http_address = (host, chosen)  # before the app is built: WebTransport's port
        app = target.asgi_app() if isinstance(target, Streaming) else target
        server = build_server(app, streaming, host=host, port=chosen, log_level="warning",
                              timeout_graceful_shutdown=5)
        task = asyncio.ensure_future(server.serve())
        deadline = asyncio.get_running_loop().time() + startup_timeout
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during startup")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("server did not start in time")
            await asyncio.sleep(0.01)
        try:
            yield RunningServer(host, chosen, streaming)
        finally:
            server.should_exit = True
            try:
                await asyncio.wait_for(task, 15)
            except TimeoutError:
                task.cancel()

    return running()


class DropRecorder:
    """A plugin that records ``streaming_connection_dropped``: ``(connection id, reason)`` in ``reasons``."""

    def __init__(self) -> None:
        self.reasons: list[tuple[str, str]] = []

    @hookimpl
    def streaming_connection_dropped(self, connection: Connection, reason: str) -> None:
        self.reasons.append((connection.id, reason))


# -- a connection without a transport, for testing hooks and the kernel ---------------


class RecordingConnection(Connection):
    transport = "fake"

    """A connection whose I/O is a list (what it was sent) and a queue (what it reads).

    ``open_connection`` runs it through the kernel's lifecycle with a
    handler that holds it open until :meth:`close`.
    """

    def __init__(self, streaming: Streaming, *, path: str = "/fake", query: str = "",
                 headers: dict[str, str] | None = None, client: tuple[str, int] = ("127.0.0.1", 5000)) -> None:
        super().__init__(ConnectionRequest("fake", path, query, headers or {}, client), streaming)
        self.sent: list[bytes] = []
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.refused: tuple[int, str, str] | None = None
        self.accepted = asyncio.Event()
        self.serving: asyncio.Future[None] | None = None

    async def accept(self) -> None:
        self.accepted.set()

    async def refuse(self, status: int, code: str, reason: str) -> None:
        self.refused = (status, code, reason)
        self.accepted.set()

    def deliver(self, frame: OutboundFrame) -> None:
        if self.is_open:
            self.sent.append(frame.payload)

    async def read_message(self) -> Message:
        item = await self.inbox.get()
        if item is None:
            raise ConnectionClosed(CloseCode.NORMAL)
        return Message(item)

    async def write_message(self, message: str | bytes) -> None:
        self.sent.append(message.encode() if isinstance(message, str) else message)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        self.ended(code, reason)
        if self.serving is not None and self.serving is not asyncio.current_task():
            await asyncio.shield(self.serving)

    def frames(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(p) for p in self.sent]
        return [f for f in out if kind is None or f.get("type") == kind]


async def _hold(conn: Connection) -> None:
    await conn.wait_ended()


async def open_connection(streaming: Streaming, **kwargs: Any) -> RecordingConnection:
    """A :class:`RecordingConnection` served by ``streaming`` until closed; Refused if it was refused."""
    conn = RecordingConnection(streaming, **kwargs)
    conn.serving = asyncio.ensure_future(streaming.serve_connection(conn, _hold))
    accepted = asyncio.ensure_future(conn.accepted.wait())
    await asyncio.wait({accepted, conn.serving}, return_when=asyncio.FIRST_COMPLETED)
    accepted.cancel()
    if conn.refused is not None:
        status, code, reason = conn.refused
        raise Refused(reason, status=status, code=code)
    if conn.serving.done():
        conn.serving.result()
    return conn


# -- `forge-streaming serve` as a subprocess -------------------------------------------


class ServerProcess:
    """``forge-streaming serve`` in a process of its own on loopback, for tests that
    need a real process: signals, restarts, several nodes. Stopped by its PID.

    ``config`` is YAML text written next to the log in ``workdir``; ``port``
    defaults to a free one (give the old port to restart "the same" server).
    It is one process (``--workers 1``, unless ``args`` say ``--workers``),
    so that a signal to :attr:`pid` reaches the server itself, whatever the
    backend: on MQTT or NATS ``serve``'s default is a worker per core.
    """

    def __init__(self, workdir: str | os.PathLike[str], *args: str, port: int | None = None,
                 config: str | None = None, env: dict[str, str] | None = None,
                 ready_timeout: float = 20.0) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        stamp = f"{self.port}-{uuid.uuid4().hex[:6]}"
        self.log = self.workdir / f"server-{stamp}.log"
        command = [str(Path(sys.executable).parent / "forge-streaming"), "serve",
                   "--host", "127.0.0.1", "--port", str(self.port), *args]
        if not any(arg == "--workers" or arg.startswith("--workers=") for arg in args):
            command += ["--workers", "1"]
        if config is not None:
            path = self.workdir / f"config-{stamp}.yaml"
            path.write_text(config)
            command += ["--config", str(path)]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env={**os.environ, "FORGE_STREAMING_CONFIG": "", **(env or {})})
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answers: up, even if its backend is not
            except OSError:
                time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (SIGINT drains), wait, and kill if it does not go; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode
