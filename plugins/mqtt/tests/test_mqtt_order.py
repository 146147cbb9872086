"""Fault tests of one room's order across nodes (issue 15, item 5): real processes, real broker, real clients.

Several ``forge-streaming serve`` nodes on one real Mosquitto, WebSocket
clients speaking the room protocol, and faults done to the processes
themselves: concurrent publishers on two nodes while members resume again
and again on a third, SIGKILL, SIGSTOP past the keepalive, a restart that
outlasts ``rooms.history_size``, a broker killed and restarted.

What every test states, for every member (a user of the room, across all
its reconnections), is what a client may rely on:

- the positions (``sequence``) of the messages it receives strictly
  increase in the order it receives them;
- every message published while it is a member reaches it exactly once,
  or it was told ``resync`` and the resync's gap covers that message;
- no message twice, across resync and replay too;
- a message has one position, the same on every node, and no two
  messages share one;
- after the fault, delivery resumes: the last message of every publisher
  reaches everyone.

A resync's gap, as a member sees it in the frames it received: from the
resync's ``since`` (or, when that is null or absent, the last position the
member received before the resync) to the first position it received
after the resync. A message nobody received (so with no known position)
lies between its publisher's neighbouring messages that somebody did
receive; a publisher told ``error`` for as many messages is excused
instead (those messages were refused, not lost).

Publishers are WebSocket members too; the kernel does not echo a member's
own messages, so each expects the other publisher's. Every test runs its
own broker, so no retained state of another test can leak into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httpx
import pytest

pytest.importorskip("forge_streaming_websocket")

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(100)]

Key = tuple[str, int]
"""A message's identity: (publisher, number), from its data ``{"p": publisher, "n": number}``."""

RECOVERY = 20.0
"""Seconds within which publishing must work again after a node or the broker failed."""
LEAVE = 10.0
"""Seconds within which members on the other nodes hear ``leave`` for a killed node's users (keepalive 1 s)."""
RATE = 100.0
"""Messages a second from each publisher during a fault (both publishers send in the same instants)."""


# -- processes -------------------------------------------------------------------------------------


class NodeLike(Protocol):
    """What these tests use of the conftest's ``Node``: a ``forge-streaming serve`` process."""

    name: str
    url: str
    ws_url: str
    proc: subprocess.Popen[bytes] | None

    def start(self, timeout: float = 15.0) -> None: ...

    def stop(self, sig: int = signal.SIGTERM) -> None: ...

    def log(self) -> str: ...


class BrokerLike(Protocol):
    """What these tests use of the conftest's ``Broker``: a mosquitto process on a fixed port."""

    port: int
    url: str

    def start(self) -> None: ...

    def kill(self) -> None: ...


class Cluster:
    """The nodes of one test on one broker; the conftest's ``cluster`` fixture stops them all at the end."""

    def __init__(self, broker: BrokerLike, make: Callable[..., list[Any]], **mqtt: Any) -> None:
        self.broker = broker
        self._make = make
        self._mqtt = mqtt

    async def start(self, *names: str) -> list[NodeLike]:
        """Start the first node alone (it is the oldest: a sequencer may run there), then the others at once."""
        first = await asyncio.to_thread(self._make, self.broker, names[0], **self._mqtt)
        rest = await asyncio.gather(*(asyncio.to_thread(self._make, self.broker, name, **self._mqtt)
                                      for name in names[1:]))
        return [cast(NodeLike, node) for made in (first, *rest) for node in made]

    @staticmethod
    def kill(node: NodeLike) -> None:
        """SIGKILL ``node`` (by its PID) and reap it."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(5)
        node.proc = None

    @staticmethod
    @contextlib.contextmanager
    def stopped(node: NodeLike) -> Iterator[None]:
        """SIGSTOP ``node`` for the block; SIGCONT whatever happens, so that teardown can stop it."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            node.proc.send_signal(signal.SIGCONT)

    @staticmethod
    async def healthy(*nodes: NodeLike, timeout: float = RECOVERY) -> None:
        """Wait until every node's ``/healthz`` says 200 (its broker connections are up)."""
        async with httpx.AsyncClient(timeout=2) as http:
            async def ok() -> bool:
                for node in nodes:
                    try:
                        if (await http.get(f"{node.url}/healthz")).status_code != 200:
                            return False
                    except httpx.HTTPError:
                        return False
                return True

            deadline = time.monotonic() + timeout
            while not await ok():
                if time.monotonic() > deadline:
                    raise AssertionError(f"nodes {[n.name for n in nodes]} not healthy within {timeout}s")
                await asyncio.sleep(0.1)


# -- clients ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Received:
    conn: int  # which of the member's connections (0, 1, ...) received it
    at: float  # time.monotonic() on arrival
    frame: dict[str, Any]


def key_of(frame: dict[str, Any]) -> Key | None:
    data = frame.get("data")
    if isinstance(data, dict) and isinstance(data.get("p"), str) and type(data.get("n")) is int:
        return data["p"], data["n"]
    return None


class Member:
    """One user of a room across reconnections: every frame of every connection, read by a background task."""

    def __init__(self, name: str, room: str, node: NodeLike) -> None:
        self.name = name
        self.room = room
        self.node = node
        self.received: list[Received] = []
        self.connections = 0
        self.user_ids: list[str] = []  # one per connection (without auth, a connection's id)
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<{self.name} on {self.node.name}>"

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def connect(self, *, since: int | None = None, node: NodeLike | None = None,
                      timeout: float = 10.0) -> int:
        """Open a new connection and join the room (resuming after ``since``); return the connection's index."""
        if node is not None:
            self.node = node
        index = self.connections
        self.connections += 1
        ws = await connect(f"{self.node.ws_url}/ws", open_timeout=timeout, close_timeout=2, max_queue=None)
        self._ws = ws
        self._reader = asyncio.create_task(self._read(ws, index))
        join: dict[str, Any] = {"type": "join", "room_id": self.room}
        if since is not None:
            join["since"] = since
        await ws.send(json.dumps(join))
        await until(lambda: self.joined(index) is not None or not self.connected, timeout=timeout,
                    what=f"{self.name} joining {self.room} on {self.node.name}")
        joined = self.joined(index)
        if joined is None:
            raise AssertionError(f"{self.name}: connection to {self.node.name} closed before it joined")
        self.user_ids.append(str(joined["user_id"]))
        return index

    async def _read(self, ws: ClientConnection, index: int) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            async for raw in ws:
                self.received.append(Received(index, time.monotonic(), json.loads(raw)))

    def joined(self, conn: int) -> dict[str, Any] | None:
        """The ``room.joined`` data of connection ``conn``, once it came."""
        for r in self.received:
            f = r.frame
            if r.conn == conn and f.get("type") == "system" and f.get("event") == "room.joined":
                data = f.get("data")
                if isinstance(data, dict) and data.get("room_id") == self.room:
                    return data
        return None

    async def disconnect(self) -> None:
        """Close the connection and wait until everything it received is recorded."""
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        if reader is not None:
            try:
                await asyncio.wait_for(reader, 5)
            except TimeoutError:
                reader.cancel()

    async def resume(self, node: NodeLike | None = None) -> int:
        """Reconnect and join again with ``since`` = the last position received."""
        await self.disconnect()
        return await self.connect(since=self.since(), node=node)

    def since(self) -> int | None:
        """Where this member stands: the last position it received, else where its first join stood."""
        positions = [p for r in self.stream() if r.frame.get("type") == "message"
                     and type(p := r.frame.get("sequence")) is int]
        if positions:
            return positions[-1]
        first = self.joined(0)
        return first.get("sequence") if first is not None and type(first.get("sequence")) is int else None

    def stream(self, conn: int | None = None) -> list[Received]:
        """This room's messages (ours: with a key) and resync frames, in the order received."""
        out = []
        for r in self.received:
            f = r.frame
            if conn is not None and r.conn != conn:
                continue
            if f.get("type") == "message" and f.get("room_id") == self.room and key_of(f) is not None:
                out.append(r)
            elif f.get("type") == "system" and f.get("event") == "resync" and isinstance(f.get("data"), dict) \
                    and f["data"].get("room_id") == self.room:
                out.append(r)
        return out

    def keys(self, conn: int | None = None) -> list[Key]:
        return [k for r in self.stream(conn) if (k := key_of(r.frame)) is not None and r.frame["type"] == "message"]

    def resyncs(self, conn: int | None = None) -> list[dict[str, Any]]:
        return [r.frame for r in self.stream(conn) if r.frame.get("type") == "system"]

    def errors(self) -> list[dict[str, Any]]:
        return [r.frame for r in self.received if r.frame.get("type") == "error"]

    def left(self) -> set[str]:
        """The users this member was told left the room."""
        return {str(r.frame.get("user_id")) for r in self.received
                if r.frame.get("type") == "leave" and r.frame.get("room_id") == self.room}


class Publisher(Member):
    """A member that publishes ``{"p": its name, "n": 0, 1, 2, ...}`` at a steady pace."""

    def __init__(self, name: str, room: str, node: NodeLike) -> None:
        super().__init__(name, room, node)
        self.sent: list[int] = []
        self.sent_at: list[float] = []

    async def publish(self, *, per_second: float, count: int | None = None,
                      stop: asyncio.Event | None = None) -> None:
        """Send ``count`` more messages (or until ``stop``), ``per_second``, on the current connection."""
        assert self._ws is not None
        n = self.sent[-1] + 1 if self.sent else 0
        end = math.inf if count is None else n + count
        interval = 1.0 / per_second
        next_at = time.monotonic()
        while n < end and not (stop is not None and stop.is_set()):
            try:
                await self._ws.send(json.dumps({"type": "message", "room_id": self.room,
                                                "data": {"p": self.name, "n": n}}))
            except ConnectionClosed:
                return
            self.sent.append(n)
            self.sent_at.append(time.monotonic())
            n += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def last_sent_before(self, moment: float) -> int:
        """The number of the last message sent before ``moment`` (-1: none)."""
        return max((n for n, at in zip(self.sent, self.sent_at, strict=True) if at < moment), default=-1)


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


# -- what every member must have seen ---------------------------------------------------------------


class Audit:
    """Checks the guarantees above over what ``members`` received of what ``publishers`` sent.

    ``witnesses`` (e.g. the members of a killed node) are not checked themselves, but what they
    received tells where messages stand.
    """

    def __init__(self, publishers: Sequence[Publisher], members: Sequence[Member],
                 witnesses: Sequence[Member] = ()) -> None:
        self.publishers = list(publishers)
        self.members = list(members)
        self.witnesses = list(witnesses)
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.notes: list[str] = []

    def expected(self, member: Member) -> list[Key]:
        return [(p.name, n) for p in self.publishers if p is not member for n in p.sent]

    def complete(self) -> bool:
        """Every member has every message it expects (as far as keys go)."""
        return all(set(self.expected(m)) <= set(m.keys()) for m in self.members)

    def positions(self) -> dict[Key, set[int]]:
        found: dict[Key, set[int]] = defaultdict(set)
        for member in [*self.members, *self.witnesses]:
            for r in member.stream():
                key = key_of(r.frame)
                if r.frame.get("type") == "message" and key is not None and type(r.frame.get("sequence")) is int:
                    found[key].add(r.frame["sequence"])
        return found

    def problem(self, category: str, detail: str) -> None:
        """Record a broken guarantee (the test fails at the end, with every problem found)."""
        self.problems[category].append(detail)

    def check(self) -> Audit:
        positions = self.positions()
        self._check_positions(positions)
        where = self._intervals(positions)
        refused = self._refused(positions)
        for member in self.members:
            self._check_member(member, where, refused)
        return self

    def _check_positions(self, positions: dict[Key, set[int]]) -> None:
        for key, seen in sorted(positions.items()):
            if len(seen) > 1:
                self.problem("one message, several positions (nodes disagree)", f"{key}: {sorted(seen)}")
        by_position: dict[int, set[Key]] = defaultdict(set)
        for key, seen in positions.items():
            for p in seen:
                by_position[p].add(key)
        for p, keys in sorted(by_position.items()):
            if len(keys) > 1:
                self.problem("one position, several messages", f"{p}: {sorted(keys)}")

    def _intervals(self, positions: dict[Key, set[int]]) -> dict[Key, tuple[float, float]]:
        """Where each sent message lies: its position, or between its publisher's neighbours received by anyone."""
        where: dict[Key, tuple[float, float]] = {}
        for pub in self.publishers:
            known = [(n, min(positions[(pub.name, n)])) for n in pub.sent if (pub.name, n) in positions]
            for n in pub.sent:
                if (pub.name, n) in positions:
                    p = float(min(positions[(pub.name, n)]))
                    where[(pub.name, n)] = (p, p)
                else:
                    lo = max((float(p) for m, p in known if m < n), default=-math.inf)
                    hi = min((float(p) for m, p in known if m > n), default=math.inf)
                    where[(pub.name, n)] = (lo, hi)
        return where

    def _refused(self, positions: dict[Key, set[int]]) -> set[Key]:
        """Messages nobody received from a publisher told ``error`` at least that many times."""
        refused: set[Key] = set()
        for pub in self.publishers:
            nobody = [(pub.name, n) for n in pub.sent if (pub.name, n) not in positions]
            errors = len(pub.errors())
            if nobody and len(nobody) <= errors:
                refused.update(nobody)
                self.notes.append(f"{pub.name}: {len(nobody)} messages received by nobody, {errors} error frames")
            elif nobody:
                self.notes.append(f"{pub.name}: {len(nobody)} messages received by nobody (n={nobody[0][1]}.."
                                  f"{nobody[-1][1]}), only {errors} error frames")
        return refused

    @staticmethod
    def gaps(member: Member) -> list[tuple[float, float]]:
        """Each resync as the open interval of positions it may have skipped (see the module's docstring)."""
        stream = member.stream()
        out = []
        for i, r in enumerate(stream):
            if r.frame.get("type") != "system":
                continue
            since = r.frame["data"].get("since")
            before = [float(x.frame["sequence"]) for x in stream[:i] if x.frame.get("type") == "message"
                      and type(x.frame.get("sequence")) is int]
            after = [float(x.frame["sequence"]) for x in stream[i + 1:] if x.frame.get("type") == "message"
                     and type(x.frame.get("sequence")) is int]
            low = float(since) if type(since) is int else (before[-1] if before else -math.inf)
            out.append((low, after[0] if after else math.inf))
        return out

    def assert_complete(self, members: Sequence[Member], why: str) -> None:
        """Members on nodes the fault did not touch: every message, and no resync at all.

        Stricter than the issue's "exactly once or resync": the MQTT sequencer hands its role over
        without loss (the broker keeps what was submitted meanwhile), so nothing may be missing there.
        """
        for member in members:
            got = set(member.keys())
            missing = [k for k in self.expected(member) if k not in got]
            assert not missing and not member.resyncs(), (
                f"{member!r} ({why}): {len(missing)} missing (e.g. {missing[:5]}), {len(member.resyncs())} resync(s)")

    def _check_member(self, member: Member, where: dict[Key, tuple[float, float]], refused: set[Key]) -> None:
        name = repr(member)
        stream = [r for r in member.stream() if r.frame.get("type") == "message"]
        last: int | None = None
        backwards: list[str] = []
        for r in stream:
            pos = r.frame.get("sequence")
            if type(pos) is not int:
                self.problem("message without an integer position", f"{name}: {r.frame}")
                continue
            if last is not None and pos <= last:
                backwards.append(f"{key_of(r.frame)}@{pos} after @{last}")
            last = pos
        if backwards:
            self.problem("positions not strictly increasing", f"{name}: {len(backwards)} of {len(stream)} "
                                                                 f"(e.g. {backwards[:3]})")
        counts = Counter(member.keys())
        twice = {k: c for k, c in counts.items() if c > 1}
        if twice:
            self.problem("received twice", f"{name}: {len(twice)} messages (e.g. {sorted(twice)[:5]})")
        order: dict[str, list[int]] = defaultdict(list)
        for key in dict.fromkeys(member.keys()):
            order[key[0]].append(key[1])
        for pub, ns in order.items():
            swapped = sum(1 for a, b in zip(ns, ns[1:], strict=False) if b < a)
            if swapped:
                self.problem("a publisher's messages out of its order", f"{name}: {swapped} from {pub}")
        expected = self.expected(member)
        gaps = self.gaps(member)
        missing = [k for k in expected if k not in counts and k not in refused]
        silent = [k for k in missing if not any(covers(gap, where[k]) for gap in gaps)]
        if silent:
            self.problem("missing without a resync covering it",
                          f"{name}: {len(silent)} of {len(expected)} (e.g. {silent[:5]}; resync gaps {gaps[:4]})")
        tails = [(p.name, p.sent[-1]) for p in self.publishers if p is not member and p.sent]
        not_resumed = [k for k in tails if k not in counts]
        if not_resumed:
            self.problem("delivery did not resume (a publisher's last message never came)",
                          f"{name}: {not_resumed}")
        self.notes.append(f"{name}: {len(counts)}/{len(expected)} messages, {len(missing)} missing, "
                          f"{len(member.resyncs())} resync(s), {member.connections} connection(s)")

    def summary(self) -> str:
        lines = [f"{category}: {len(items)} case(s)\n    " + "\n    ".join(items[:8])
                 for category, items in self.problems.items()]
        return "\n".join(lines or ["no problem"]) + "\n  notes:\n    " + "\n    ".join(self.notes)

    def assert_clean(self) -> None:
        print(self.summary())
        assert not self.problems, "the room's guarantees broke:\n" + self.summary()


def covers(gap: tuple[float, float], where: tuple[float, float]) -> bool:
    """Whether a resync's gap (open interval) may hold a message at ``where`` (a position, or an open interval)."""
    (low, high), (first, last) = gap, where
    if first == last:
        return low < first < high
    return low < last and high > first


# -- scenes -----------------------------------------------------------------------------------------


class Scene:
    """The members of one test: made, connected and always closed."""

    def __init__(self, room: str) -> None:
        self.room = room
        self.members: list[Member] = []

    async def member(self, name: str, node: NodeLike) -> Member:
        member = Member(name, self.room, node)
        self.members.append(member)
        await member.connect()
        return member

    async def publisher(self, name: str, node: NodeLike) -> Publisher:
        publisher = Publisher(name, self.room, node)
        self.members.append(publisher)
        await publisher.connect()
        return publisher

    async def close(self) -> None:
        await asyncio.gather(*(m.disconnect() for m in self.members), return_exceptions=True)


@contextlib.asynccontextmanager
async def scene(room: str) -> AsyncIterator[Scene]:
    s = Scene(room)
    try:
        yield s
    finally:
        await s.close()


async def settle(audit: Audit, *, quiet: float = 1.0, timeout: float = 15.0) -> None:
    """Wait until every member has what it expects, or nobody received anything for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    total, still_since = -1, time.monotonic()
    everyone = [*audit.members, *audit.witnesses]
    while time.monotonic() < deadline:
        if audit.complete():
            break
        now_total = sum(len(m.received) for m in everyone)
        if now_total != total:
            total, still_since = now_total, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # a duplicate would come about now


async def wait_for_everyone(members: Sequence[Member], publishers: Sequence[Publisher], after: dict[str, int], *,
                            timeout: float, what: str) -> float:
    """Wait until every member received, from every other publisher that sent one, a message numbered above
    ``after``."""
    started = time.monotonic()

    def reached() -> bool:
        return all(any(k[0] == p.name and k[1] > after[p.name] for k in m.keys())
                   for m in members for p in publishers if p is not m and p.sent and p.sent[-1] > after[p.name])

    await until(reached, timeout=timeout, what=what)
    return time.monotonic() - started


@pytest.fixture
def order_cluster(own_broker: Any, cluster: Any) -> Callable[..., Cluster]:
    """``order_cluster(**pubsub_mqtt)``: a Cluster on this test's own broker."""
    return lambda **mqtt: Cluster(own_broker, cluster, **mqtt)


# -- the tests --------------------------------------------------------------------------------------


async def test_concurrent_publishers_on_two_nodes_members_resuming_again_and_again_on_a_third(
        order_cluster: Callable[..., Cluster]) -> None:
    """300 messages from each of two nodes at once; two members on a third node resume every 50-100 ms."""
    a, b, c = await order_cluster().start("a", "b", "c")
    rng = random.Random(15)
    async with scene("order") as s:
        pub_a, pub_b = await s.publisher("pub-a", a), await s.publisher("pub-b", b)
        steady = [await s.member("steady-a", a), await s.member("steady-b", b), await s.member("steady-c", c)]
        resumers = [await s.member("resumer-1", c), await s.member("resumer-2", c)]
        done = asyncio.Event()
        resumes = Counter[str]()

        async def keep_resuming(member: Member) -> None:
            # From a real position: a member that received nothing yet stands at its join's position, which
            # is 0 ("unknown") for a room without messages, and a resume from 0 is a resync by design.
            await until(lambda: any(r.frame.get("type") == "message" for r in member.received), 10,
                        what=f"{member.name}'s first message")
            while not done.is_set():
                await asyncio.sleep(rng.uniform(0.05, 0.1))
                await member.resume()
                resumes[member.name] += 1

        loops = [asyncio.create_task(keep_resuming(m)) for m in resumers]
        try:
            await asyncio.gather(pub_a.publish(per_second=100, count=300), pub_b.publish(per_second=100, count=300))
        finally:
            done.set()
            await asyncio.gather(*loops)
        for member in resumers:  # one last resume, after the last message
            await member.resume()
        audit = Audit([pub_a, pub_b], [pub_a, pub_b, *steady, *resumers])
        await settle(audit)
        print(f"resumes: {dict(resumes)}")
        assert min(resumes.values()) >= 10, f"the members resumed too rarely to test anything: {resumes}"
        audit.check().assert_clean()
        audit.assert_complete([*steady, *resumers], "no fault: every resume is exact")


@pytest.mark.parametrize("victim", ["first", "last"], ids=["oldest-node-killed", "youngest-node-killed"])
async def test_sigkill_a_node_while_two_nodes_publish(order_cluster: Callable[..., Cluster], victim: str) -> None:
    """The killed node is the oldest (where a sequencer may run) or the youngest; it has members, no publisher."""
    nodes = await order_cluster(keepalive="1s").start("a", "b", "c")
    dead = nodes[0] if victim == "first" else nodes[-1]
    x, y = [n for n in nodes if n is not dead]
    async with scene("kill") as s:
        pub_x, pub_y = await s.publisher("pub-x", x), await s.publisher("pub-y", y)
        survivors: list[Member] = [pub_x, pub_y, await s.member("steady-x", x), await s.member("steady-y", y)]
        victims = [await s.member("victim-1", dead), await s.member("victim-2", dead)]
        victim_users = {v.user_ids[0] for v in victims}
        await until(lambda: all(victim_users <= {str(r.frame.get("user_id")) for r in m.received
                                                  if r.frame.get("type") == "join"} for m in survivors),
                    what="the survivors hearing the victims join")
        stop = asyncio.Event()
        publishing = [asyncio.create_task(p.publish(per_second=RATE, stop=stop)) for p in (pub_x, pub_y)]
        try:
            await asyncio.sleep(1.5)
            Cluster.kill(dead)
            killed_at = time.monotonic()
            await asyncio.sleep(0.2)
            after = {p.name: p.last_sent_before(time.monotonic()) for p in (pub_x, pub_y)}
            recovery = await wait_for_everyone(survivors, [pub_x, pub_y], after, timeout=RECOVERY,
                                               what=f"publishing to work again within {RECOVERY}s of the kill")
            await until(lambda: all(victim_users <= m.left() for m in survivors),
                        timeout=max(0.1, killed_at + LEAVE - time.monotonic()),
                        what=f"a leave frame for each of the killed node's users on every surviving member "
                             f"within {LEAVE}s of the kill")
            left = max(r.at for m in survivors for r in m.received if r.frame.get("type") == "leave") - killed_at
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*publishing)
        print(f"publishing worked again {recovery + 0.2:.2f}s after the kill; every leave came by {left:.2f}s")
        audit = Audit([pub_x, pub_y], survivors, witnesses=victims)
        await settle(audit)
        audit.check().assert_clean()
        audit.assert_complete(survivors, "on a surviving node")


@pytest.mark.parametrize("victim", ["first", "last"], ids=["oldest-node-stopped", "youngest-node-stopped"])
async def test_sigstop_a_node_past_the_keepalive_then_sigcont(order_cluster: Callable[..., Cluster],
                                                             victim: str) -> None:
    """A node with members, no publisher, frozen 3.5 s (keepalive 1 s: the broker takes it for dead), then resumed.

    The frozen node is the oldest (a sequencer there comes back believing it still is one) or the youngest.
    """
    nodes = await order_cluster(keepalive="1s").start("a", "b", "c")
    frozen_node = nodes[0] if victim == "first" else nodes[-1]
    x, y = [n for n in nodes if n is not frozen_node]
    async with scene("stop") as s:
        pub_x, pub_y = await s.publisher("pub-x", x), await s.publisher("pub-y", y)
        frozen = [await s.member("frozen-1", frozen_node), await s.member("frozen-2", frozen_node)]
        steady = [await s.member("steady-x", x), await s.member("steady-y", y)]
        everyone: list[Member] = [pub_x, pub_y, *frozen, *steady]
        stop = asyncio.Event()
        publishing = [asyncio.create_task(p.publish(per_second=RATE, stop=stop)) for p in (pub_x, pub_y)]
        try:
            await asyncio.sleep(1.0)
            with Cluster.stopped(frozen_node):
                await asyncio.sleep(3.5)
            await Cluster.healthy(frozen_node)
            after = {p.name: p.last_sent_before(time.monotonic()) for p in (pub_x, pub_y)}
            await wait_for_everyone(everyone, [pub_x, pub_y], after, timeout=RECOVERY,
                                    what="delivery to every member after SIGCONT")
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*publishing)
        audit = Audit([pub_x, pub_y], everyone)
        await settle(audit)
        audit.check().assert_clean()
        audit.assert_complete([pub_x, pub_y, *steady], "on a node that was not frozen")


async def test_restart_a_node_for_longer_than_history_size_then_resume(
        order_cluster: Callable[..., Cluster], monkeypatch: pytest.MonkeyPatch) -> None:
    """history_size 20; node c is down while 120+ messages go by: its members' resume is a resync.

    Then, in a quiet room, members that missed fewer than 20 messages get an exact replay: no
    resync, the missed messages once, in the order and at the positions the others saw them.
    """
    history_size = 20
    monkeypatch.setenv("FORGE_STREAMING__ROOMS__HISTORY_SIZE", str(history_size))  # the nodes inherit it
    a, b, c = await order_cluster().start("a", "b", "c")
    async with scene("restart") as s:
        pub_a, pub_b = await s.publisher("pub-a", a), await s.publisher("pub-b", b)
        steady_a, steady_b = await s.member("steady-a", a), await s.member("steady-b", b)
        away = [await s.member("away-1", c), await s.member("away-2", c)]
        audit = Audit([pub_a, pub_b], [pub_a, pub_b, steady_a, steady_b, *away])
        stop = asyncio.Event()
        publishing = [asyncio.create_task(p.publish(per_second=40, stop=stop)) for p in (pub_a, pub_b)]
        sinces: dict[str, int | None] = {}
        rejoined: dict[str, int] = {}
        try:
            await asyncio.sleep(1.0)
            down_from = len(pub_a.sent) + len(pub_b.sent)
            await asyncio.to_thread(c.stop)
            for member in away:
                await member.disconnect()
            await until(lambda: len(pub_a.sent) + len(pub_b.sent) - down_from > 6 * history_size, timeout=20,
                        what="six history sizes of messages while c is down")
            await asyncio.to_thread(c.start)
            for member in away:
                sinces[member.name] = member.since()
                rejoined[member.name] = await member.resume()
            await asyncio.sleep(1.5)
        finally:
            stop.set()
            await asyncio.gather(*publishing)
        for member in away:  # history could not cover the gap: the new connection starts with resync
            first = member.stream(rejoined[member.name])[:1]
            if not first or first[0].frame.get("event") != "resync":
                audit.problem("a resume across more than history_size messages without resync first",
                              f"{member!r} (since {sinces[member.name]}): {first[0].frame if first else None}")
            elif (since := first[0].frame["data"].get("since")) is not None and since != sinces[member.name]:
                audit.problem("a resync that does not name the gap",
                              f"{member!r} resumed from {sinces[member.name]}, resync since {since}")
        await settle(audit)

        # The room is quiet now. steady-b stays; away-1 (on c) and steady-a (on a) miss a dozen messages.
        resumers = [away[0], steady_a]
        for member in resumers:
            await member.disconnect()
        before = len(steady_b.keys())
        await asyncio.gather(pub_a.publish(per_second=200, count=6), pub_b.publish(per_second=200, count=6))
        await until(lambda: len(steady_b.keys()) >= before + 12, what="steady-b receiving the dozen")
        missed = [(key_of(r.frame), r.frame.get("sequence")) for r in steady_b.stream()
                  if r.frame.get("type") == "message"][-12:]
        for member in resumers:
            index = await member.resume()
            await until(replayed(member, index, 12), what=f"{member!r} replaying the dozen it missed")
        await asyncio.sleep(0.5)  # anything more would have come by now
        for member in resumers:
            got = [(key_of(r.frame), r.frame.get("sequence")) for r in member.stream(member.connections - 1)]
            if got != missed:
                audit.problem("not an exact replay of what a member missed within history",
                              f"{member!r}: got {got}, missed {missed}")
        await settle(audit)
        audit.check().assert_clean()


def replayed(member: Member, conn: int, count: int) -> Callable[[], bool]:
    """Whether connection ``conn`` of ``member`` has received ``count`` messages (or was closed)."""
    return lambda: len(member.keys(conn)) >= count or member.connections - 1 != conn or not member.connected


async def test_broker_killed_and_restarted_while_two_nodes_publish(
        order_cluster: Callable[..., Cluster], own_broker: Any) -> None:
    """Mosquitto SIGKILLed for a second mid-stream: every member is told resync, then delivery resumes."""
    broker = cast(BrokerLike, own_broker)
    a, b, c = await order_cluster().start("a", "b", "c")
    async with scene("broker") as s:
        pub_a, pub_b = await s.publisher("pub-a", a), await s.publisher("pub-b", b)
        steady = [await s.member("steady-a", a), await s.member("steady-b", b), await s.member("steady-c", c)]
        everyone: list[Member] = [pub_a, pub_b, *steady]
        stop = asyncio.Event()
        publishing = [asyncio.create_task(p.publish(per_second=RATE, stop=stop)) for p in (pub_a, pub_b)]
        try:
            await asyncio.sleep(1.0)
            broker.kill()
            killed_at = time.monotonic()
            await asyncio.sleep(1.0)
            broker.start()
            await Cluster.healthy(a, b, c)
            await until(lambda: all(any(r.at > killed_at for r in m.received if r.frame.get("event") == "resync")
                                    for m in everyone), timeout=RECOVERY, what="a resync for every member")
            after = {p.name: p.last_sent_before(time.monotonic()) for p in (pub_a, pub_b)}
            await wait_for_everyone(everyone, [pub_a, pub_b], after, timeout=RECOVERY,
                                    what="delivery after the broker came back")
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*publishing)
        audit = Audit([pub_a, pub_b], everyone)
        await settle(audit)
        audit.check().assert_clean()
