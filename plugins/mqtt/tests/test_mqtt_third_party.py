"""The private parts of paho-mqtt and aiomqtt that batching.py and link.py rely on, by name.

pyproject.toml pins both libraries to the versions these parts were checked
against (aiomqtt 2.5.1, paho-mqtt 2.2.0). Should a release within the pin (or
a wider pin later) move one of them, this test names it, instead of the
plugin failing as a hang or a silently lost message.
"""

from __future__ import annotations

import inspect

import aiomqtt
import paho.mqtt.client as paho
from forge_streaming.testing import run

AIOMQTT_METHODS = {  # BatchingClient overrides or calls these
    "_on_socket_open": ["client", "userdata", "sock"],
    "_on_socket_close": ["client", "userdata", "sock"],
    "_on_socket_register_write": ["client", "userdata", "sock"],
    "_on_socket_unregister_write": ["client", "userdata", "sock"],
    "_misc_loop": [],
}
AIOMQTT_ATTRIBUTES = ["_client", "_queue", "_disconnected", "_loop", "_socket_options", "_misc_task",
                      "pending_calls_threshold"]
PAHO_METHODS = {  # the fast PUBLISH handler replaces _handle_publish; link.py queues QoS 0 packets itself
    "_handle_publish": [],
    "_send_puback": ["mid"],
    "_packet_queue": ["command", "packet", "mid", "qos", "info"],
}
PAHO_ATTRIBUTES = ["_sock", "_in_packet", "_protocol", "_manual_ack", "_out_packet", "on_publish"]


def test_the_private_parts_used_exist_with_the_expected_signatures() -> None:
    async def scenario() -> None:
        client = aiomqtt.Client("127.0.0.1", 1, protocol=aiomqtt.ProtocolVersion.V5)  # never connects
        for name, parameters in AIOMQTT_METHODS.items():
            assert list(inspect.signature(getattr(client, name)).parameters) == parameters, f"aiomqtt {name}"
        missing = [name for name in AIOMQTT_ATTRIBUTES if not hasattr(client, name)]
        assert not missing, f"aiomqtt.Client lacks {missing}"
        inner = client._client
        assert isinstance(inner, paho.Client)
        for name, parameters in PAHO_METHODS.items():
            assert list(inspect.signature(getattr(inner, name)).parameters) == parameters, f"paho {name}"
        missing = [name for name in PAHO_ATTRIBUTES if not hasattr(inner, name)]
        assert not missing, f"paho.Client lacks {missing}"
        assert {"command", "packet"} <= set(inner._in_packet), "paho's incoming packet record changed"
        assert list(inspect.signature(aiomqtt.Message).parameters) == [
            "topic", "payload", "qos", "retain", "mid", "properties"], "aiomqtt.Message is built positionally"

    run(scenario())
