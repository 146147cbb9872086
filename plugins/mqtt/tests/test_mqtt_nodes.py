"""Nodes as separate ``forge-streaming serve`` processes on one real broker, with real clients."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("forge_streaming_websocket")

from forge_streaming.testing import RoomClient  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402


@contextlib.asynccontextmanager
async def ws_member(node: Any, room: str) -> AsyncIterator[RoomClient]:
    async with connect(f"{node.ws_url}/ws") as ws:
        member = RoomClient(ws)
        await member.join(room)
        try:
            yield member
        finally:
            await member.close()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def test_three_nodes_websocket_members_and_http_publish(broker: Any, cluster: Any) -> None:
    a, b, c = cluster(broker, "a", "b", "c")
    async with ws_member(a, "chat") as alice, ws_member(b, "chat") as bob:
        await asyncio.to_thread(c.publish, "chat", "from c")
        await alice.send("chat", "from alice")
        await until(lambda: bob.data() == ["from c", "from alice"], what="bob hearing c and alice")
        await bob.send("chat", "from bob")
        await until(lambda: alice.data() == ["from c", "from bob"], what="alice hearing c and bob")
        await asyncio.sleep(0.3)
        assert bob.data() == ["from c", "from alice"] and alice.data() == ["from c", "from bob"], "duplicates"
        rooms = await asyncio.to_thread(c.rooms)  # node c has no members, yet sees both
        assert len(rooms["chat"]) == 2


async def test_websocket_on_a_and_sse_on_b_exchange_messages(broker: Any, cluster: Any) -> None:
    if importlib.util.find_spec("forge_streaming_sse") is None:
        pytest.skip("forge_streaming_sse is not installed")
    from httpx_sse import aconnect_sse

    a, b = cluster(broker, "a", "b")
    got: list[dict[str, Any]] = []
    session: dict[str, Any] = {}
    async with ws_member(a, "mixed") as alice, httpx.AsyncClient(base_url=b.url, timeout=10) as http:

        async def read_sse() -> None:
            async with aconnect_sse(http, "GET", "/sse", params={"rooms": "mixed"}) as source:
                async for event in source.aiter_sse():
                    if event.event == "session":
                        session.update(json.loads(event.data))
                    elif event.data:
                        got.append(json.loads(event.data))

        reader = asyncio.create_task(read_sse())
        try:
            await until(lambda: any(f.get("event") == "room.joined" for f in got), what="sse join")
            await until(lambda: len([f for f in alice.of("join")]) >= 1, what="alice told of the sse member")
            await alice.send("mixed", {"text": "hello sse"})
            await until(lambda: [f["data"] for f in got if f.get("type") == "message"] == [{"text": "hello sse"}],
                        what="sse member receiving from websocket member")
            send_url = session["send_url"]
            r = await http.post(send_url if send_url.startswith("/") else httpx.URL(send_url).raw_path.decode(),
                                headers={"X-Stream-Token": session["token"]},
                                content=json.dumps({"type": "message", "room_id": "mixed", "data": "hello ws"}))
            assert r.status_code == 202, r.text
            await until(lambda: alice.data() == ["hello ws"], what="websocket member receiving from sse member")
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader


async def test_broker_killed_and_restarted_mid_stream(own_broker: Any, cluster: Any) -> None:
    a, b = cluster(own_broker, "a", "b")
    async with ws_member(a, "live") as alice, ws_member(b, "live") as bob:
        stop = asyncio.Event()
        sent: list[int] = []

        async def publisher() -> None:  # a steady stream from node a, through the outage
            n = 0
            async with httpx.AsyncClient(timeout=5) as http:
                while not stop.is_set():
                    r = await http.post(f"{a.url}/api/publish", json={"room_id": "live", "data": n},
                                        headers={"Authorization": "Bearer test-key"})
                    if r.status_code == 200:
                        sent.append(n)
                    n += 1
                    await asyncio.sleep(0.02)

        task = asyncio.create_task(publisher())
        try:
            await until(lambda: len(bob.data()) >= 10, what="traffic before the outage")
            own_broker.kill()

            async def health(node: Any) -> int:
                async with httpx.AsyncClient(timeout=5) as http:
                    return (await http.get(f"{node.url}/healthz")).status_code

            status = 200
            for _ in range(500):  # up to ~10 s on a loaded machine; it normally takes milliseconds
                status = await health(b)
                if status == 503:
                    break
                await asyncio.sleep(0.02)
            assert status == 503, "/healthz did not report the broker outage"
            async with httpx.AsyncClient(timeout=5) as http:
                body = (await http.get(f"{b.url}/healthz")).json()
            assert body["backend"]["state"] in ("down", "connecting") and body["backend"]["name"] == "mqtt"
            await asyncio.sleep(0.5)
            own_broker.start()
            await until(lambda: "resync" in bob.events() and "resync" in alice.events(), what="resync on both")
            mark = len(sent)
            await until(lambda: len(sent) > mark + 10, what="publishing going on")
            last = sent[-1]
            await until(lambda: last in bob.data(), what="delivery resumed after the broker came back")
            assert await health(a) == 200 and await health(b) == 200
        finally:
            stop.set()
            await task
        got = bob.data()
        assert len(got) == len(set(got)), "duplicates after reconnect"
        assert got == sorted(got), "per-publisher order broken"


async def test_sigkilled_node_leaves_presence_everywhere(broker: Any, cluster: Any) -> None:
    a, b, c = cluster(broker, "a", "b", "c")
    async with ws_member(a, "p") as alice, ws_member(b, "p") as bob:
        await until(lambda: len(c.rooms().get("p", [])) == 2, what="both members in presence on c")
        bob_id = next(f["data"]["user_id"] for f in bob.of("system") if f.get("event") == "room.joined")
        await until(lambda: ("join", bob_id) in [(f["type"], f["user_id"]) for f in alice.frames if "user_id" in f],
                    what="alice hearing bob join")
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(5)
        await until(lambda: len(c.rooms().get("p", [])) == 1 and len(a.rooms().get("p", [])) == 1,
                    timeout=10, what="the killed node's member leaving presence on a and c")
        assert a.rooms()["p"] == c.rooms()["p"]
        # alice is told: her list of who is here must not keep a dead node's users for good (issue 15, item 3)
        await until(lambda: [f["user_id"] for f in alice.of("leave")] == [bob_id], timeout=10,
                    what="a leave frame for the killed node's user")
        await alice.send("p", "still here")  # the survivors still talk
        await until(lambda: True)
        del bob


async def test_mosquitto_pub_into_a_room_reaches_a_websocket_client(broker: Any, cluster: Any) -> None:
    (a,) = cluster(broker, "a", topic_prefix="iot")
    async with ws_member(a, "sensors") as member:
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "iot/rooms/sensors/publish",
                        "-m", '{"data": {"temp": 21}, "user_id": "thermo-1"}'], check=True, timeout=10)
        await until(lambda: member.data() == [{"temp": 21}], what="the device message")
        frame = member.of("message")[0]
        assert frame["user_id"] == "device:thermo-1" and isinstance(frame["sequence"], int)


async def test_a_node_that_stalls_past_the_brokers_queue_tells_its_members_to_resync(
        small_queue_broker: Any, cluster: Any, publish_as_node: Any) -> None:
    (b,) = cluster(small_queue_broker, "b", limits={"send_buffer": "64MiB"})  # bob takes the whole burst
    async with ws_member(b, "burst") as bob:
        # b stops reading; the broker keeps one message queued for it, its socket buffers fill, the rest is dropped
        b.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.to_thread(publish_as_node, small_queue_broker.port, "forge", "burst", "x",
                                    [f"s:{n}" for n in range(1, 3001)], padding=4000)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        settled, last = 0, -1
        while settled < 10:  # b has read its backlog when bob's count stays put for half a second
            await asyncio.sleep(0.05)
            settled, last = (settled + 1, last) if len(bob.frames) == last else (0, len(bob.frames))
        await asyncio.to_thread(publish_as_node, small_queue_broker.port, "forge", "burst", "x", ["s:3001"])
        await until(lambda: "resync" in bob.events(), timeout=15, what="resync after the broker dropped messages")
        counts = [m["data"]["count"] for m in bob.of("message")] if bob.of("message") else []
        assert len(counts) < 3001 and counts == sorted(counts, key=lambda c: int(c[2:])), "a hole, in order"
        _, health = await asyncio.to_thread(b.health)
        assert "lost between the broker and this node" in health["backend"]["detail"], health


async def test_a_node_stopped_past_its_keepalive_is_a_leave_and_back_a_join(own_broker: Any, cluster: Any) -> None:
    """A partition (SIGSTOP past the 2 s keepalive): the others hear 'leave'; when it comes back, 'join'."""
    a, b = cluster(own_broker, "a", "b")
    async with ws_member(a, "p") as alice, ws_member(b, "p") as bob:
        bob_id = next(f["data"]["user_id"] for f in bob.of("system") if f.get("event") == "room.joined")

        def heard() -> list[str]:
            return [f["type"] for f in alice.frames if f.get("user_id") == bob_id and f["type"] in ("join", "leave")]

        await until(lambda: heard() == ["join"], what="alice hearing bob join")
        await until(lambda: len(a.rooms().get("p", [])) == 2, what="bob in presence on a")
        b.proc.send_signal(signal.SIGSTOP)
        try:
            await until(lambda: heard() == ["join", "leave"], timeout=15,
                        what=f"a leave once b's will fired (heard {heard()}, presence on a {a.rooms()})")
        finally:
            b.proc.send_signal(signal.SIGCONT)
        await until(lambda: heard() == ["join", "leave", "join"], timeout=15, what="a join once b is back")
        await until(lambda: len(a.rooms().get("p", [])) == 2, what="bob in presence on a again")
