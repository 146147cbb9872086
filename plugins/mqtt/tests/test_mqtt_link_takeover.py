"""A link whose connection is taken over while it waits for a SUBACK learns it at once, not at the timeout.

Seen with the sequencer role: two nodes took the free role in the same
millisecond, the second one's connection took the client id over while
the first was still subscribing in its ``on_connect``. The broker closed
the first connection, but aiomqtt leaves a pending SUBSCRIBE waiting for
its answer until its own timeout (``connect_timeout``, 5 s by default):
for those seconds the first node believed it held the role. Real
Mosquitto; the takeover is made certain by connecting the second client
synchronously (the event loop cannot read the broker's DISCONNECT
meanwhile) just before the first one subscribes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from forge_streaming_mqtt.link import LinkState, MqttLink
from forge_streaming_mqtt.settings import MqttSettings
from paho.mqtt.enums import CallbackAPIVersion

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]

CLIENT_ID = "test-link-takeover"
AIOMQTT_TIMEOUT = 5.0  # what a pending SUBSCRIBE would wait for without the fix


def _take_over(port: int) -> paho.Client:
    """Connect a second client under the same id and wait for its CONNACK, blocking the event loop."""
    other = paho.Client(CallbackAPIVersion.VERSION2, client_id=CLIENT_ID, protocol=paho.MQTTv5)
    other.connect("127.0.0.1", port)
    deadline = time.monotonic() + 5
    while not other.is_connected() and time.monotonic() < deadline:
        other.loop(timeout=0.05)
    assert other.is_connected(), "the second client was not accepted"
    return other


async def test_a_connection_taken_over_during_its_subscribe_ends_at_once(broker: Any) -> None:
    settings = MqttSettings(url=f"mqtt://127.0.0.1:{broker.port}", connect_timeout=AIOMQTT_TIMEOUT)
    taken: list[paho.Client] = []
    subscribe_error: list[BaseException] = []
    ended = asyncio.Event()

    async def on_connect(client: aiomqtt.Client) -> None:
        taken.append(_take_over(broker.port))
        try:
            await link.subscribe(["forge-test/takeover"], qos=1)
        except aiomqtt.MqttError as exc:
            subscribe_error.append(exc)
            raise

    link = MqttLink(settings, client_id=CLIENT_ID, role="test", on_message=lambda m: None,
                    on_connect=on_connect, on_disconnect=ended.set, once=True)
    started = time.monotonic()
    try:
        await link.start()
        await asyncio.wait_for(ended.wait(), AIOMQTT_TIMEOUT + 5)
        took = time.monotonic() - started
        assert subscribe_error, "the SUBSCRIBE on a connection taken over did not fail"
        assert link.state is LinkState.STOPPED
        # what ended it: the lost connection, not aiomqtt's timeout (the time is for the message only)
        assert "connection lost" in str(subscribe_error[0]), \
            f"the subscribe ended with {subscribe_error[0]!r} after {took:.1f} s, not when the connection was lost"
    finally:
        await link.stop()
        for other in taken:
            other.disconnect()
