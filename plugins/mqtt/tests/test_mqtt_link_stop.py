"""``MqttLink.stop()`` ends the link even when its cancellation lands in the loop turn of the broker's CONNACK.

Seen once in ~30 starts of three workers competing for the sequencer role:
a worker gave its sequencer link up (``stop()``) just as the broker
accepted it. Python 3.11's ``asyncio.wait_for`` (which aiomqtt uses while
connecting) then returns the result instead of raising the cancellation,
so the link went on: it called the owner's ``on_connect`` (the sequencer's
failed an assertion), and reconnected as ``{prefix}-sequencer`` every few
seconds, knocking the real holder off each time, while ``stop()`` never
returned. Real Mosquitto; the race is made certain by stopping the link
from inside aiomqtt's CONNACK callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiomqtt
import pytest
from forge_streaming_mqtt.link import LinkState, MqttLink
from forge_streaming_mqtt.settings import MqttSettings

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]


@pytest.fixture
def stop_on_connack(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """Once armed with a link, its ``stop()`` is started in the very loop turn a CONNACK arrives."""
    state: dict[str, Any] = {"link": None, "stopper": None}
    original = aiomqtt.Client._on_connect  # noqa: SLF001

    def on_connack(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        link = state["link"]
        if link is not None and state["stopper"] is None:
            state["stopper"] = asyncio.get_running_loop().create_task(link.stop())

    monkeypatch.setattr(aiomqtt.Client, "_on_connect", on_connack)
    yield state


async def test_a_link_stopped_as_the_broker_accepts_it_stops(broker: Any, stop_on_connack: dict[str, Any]) -> None:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", reconnect_min=0.05, reconnect_max=0.2)
    connected_after_stop = 0

    async def on_connect(client: aiomqtt.Client) -> None:
        nonlocal connected_after_stop
        if link.state is LinkState.STOPPED:
            connected_after_stop += 1

    link = MqttLink(settings, client_id="test-link-stop", role="test", on_message=lambda m: None,
                    on_connect=on_connect)
    stop_on_connack["link"] = link
    starting = asyncio.ensure_future(link.start())
    try:
        await asyncio.sleep(0.05)
        while stop_on_connack["stopper"] is None:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.shield(stop_on_connack["stopper"]), 5)  # stop() returns
        await asyncio.sleep(0.5)  # several reconnect delays: a link still running would connect again
        assert link.state is LinkState.STOPPED
        assert connected_after_stop == 0, "the owner's on_connect was called after it stopped the link"
        assert link.client is None
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        task = link._task  # noqa: SLF001 (a link that did not stop: end it, then fail above)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
