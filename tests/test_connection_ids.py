"""Connection ids are unique across the processes of a cluster, and the sender is skipped only on its own node.

Found by the bench's capacity case with ``serve --workers 3``: ids were a
per-process counter and the clock's millisecond, so two workers opening
their k-th connection in the same millisecond gave the same id, and the
fan-out skipped the member of one whose id was the publisher's of the other
(4 of 49,500 deliveries missing). An anonymous connection's id is also its
user id, so presence merged them too.
"""

from __future__ import annotations

import json
import subprocess
import sys

from forge_streaming import Envelope, EnvelopeKind, Streaming, frames
from forge_streaming.testing import open_connection

FIRST_ID_AT_A_FIXED_TIME = """
import time
time.time = lambda: 1764550000.123  # both processes open their first connection in the same millisecond
from forge_streaming.testing import RecordingConnection
print(RecordingConnection(None).id)
"""


def test_ids_of_connections_opened_at_once_in_two_processes_differ() -> None:
    ids = {subprocess.run([sys.executable, "-c", FIRST_ID_AT_A_FIXED_TIME], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip() for _ in range(2)}
    assert len(ids) == 2, ids


def test_ids_within_a_process_are_unique() -> None:
    from forge_streaming.testing import RecordingConnection

    service = Streaming({})
    ids = {RecordingConnection(service).id for _ in range(2000)}
    assert len(ids) == 2000


async def test_a_message_from_another_node_reaches_the_member_whose_id_is_its_senders() -> None:
    service = Streaming({})
    await service.start()
    try:
        member = await open_connection(service)
        await member.join_room("r")
        payload = frames.encode({"type": "message", "room_id": "r", "data": "hi"})
        service.on_envelope(Envelope("r", payload, EnvelopeKind.MESSAGE, 1, member.id, "another-node"))
        assert [m["data"] for m in member.frames("message")] == ["hi"]
        service.on_envelope(Envelope("r", payload, EnvelopeKind.MESSAGE, 2, member.id, service.node_id))
        assert len(member.frames("message")) == 1, "its own message, from its own node, is not echoed"
    finally:
        await service.stop()


def test_the_id_format_is_short() -> None:
    first = subprocess.run([sys.executable, "-c", FIRST_ID_AT_A_FIXED_TIME], capture_output=True, text=True,
                           check=True, timeout=60).stdout.strip()
    assert len(first) <= 20 and json.dumps(first) == f'"{first}"', first
