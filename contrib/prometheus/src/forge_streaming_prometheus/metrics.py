"""The metrics of one Streaming service, in a registry of its own.

One :class:`StreamingMetrics` per service (not prometheus-client's global
registry), so that several services in one process (tests, an app that
runs two) never count into each other's series. Event counters move from
hooks as things happen; gauges that describe the present (rooms, backend
state, connections) are read from the service when ``/metrics`` is scraped,
so they cannot drift.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter as TallyCounter
from typing import Any

import forge_streaming
from forge_streaming import BackendState, Connection, Envelope, EnvelopeKind, Streaming
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

log = logging.getLogger("forge_streaming.prometheus")

PUBLISH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StreamingMetrics:
    """Prometheus series for one service; fed by the hooks in :mod:`forge_streaming_prometheus.plugin`."""

    def __init__(self, streaming: Streaming) -> None:
        self._streaming = weakref.ref(streaming)
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("forge_streaming", "This node", registry=r)
        self.info.info({"version": forge_streaming.__version__, "node": streaming.node_id})
        self.connections = Gauge("forge_streaming_connections", "Open connections, by transport",
                                 ["transport"], registry=r)
        self.connections_opened = Counter("forge_streaming_connections_opened", "Connections opened, by transport",
                                          ["transport"], registry=r)
        self.connections_closed = Counter("forge_streaming_connections_closed",
                                          "Connections ended, by transport and close code",
                                          ["transport", "code"], registry=r)
        self.rooms = Gauge("forge_streaming_rooms", "Rooms with members on any node", registry=r)
        self.local_rooms = Gauge("forge_streaming_local_rooms", "Rooms with members on this node", registry=r)
        self.members = Gauge("forge_streaming_room_members", "Room memberships of this node's connections",
                             ["transport"], registry=r)
        self.messages_in = Counter("forge_streaming_messages_in",
                                   "Room-protocol frames received, by transport and type",
                                   ["transport", "type"], registry=r)
        self.messages_out = Counter("forge_streaming_messages_out",
                                    "Room messages handed to this node's connections, by transport",
                                    ["transport"], registry=r)
        self.deliveries = Counter("forge_streaming_deliveries",
                                  "Frames (messages and notices) handed to this node's connections", registry=r)
        self.envelopes = Counter("forge_streaming_envelopes_delivered", "Envelopes fanned out on this node, by kind",
                                 ["kind"], registry=r)
        self.drops = Counter("forge_streaming_connections_dropped", "Connections dropped for cause, by reason",
                             ["reason"], registry=r)
        self.errors = Counter("forge_streaming_frames_rejected", "Client frames refused with an error frame, by code",
                              ["code"], registry=r)
        self.publish_seconds = Histogram("forge_streaming_backend_publish_seconds",
                                         "Time the pub/sub backend took to accept a publish", ["backend"],
                                         buckets=PUBLISH_BUCKETS, registry=r)
        self.backend_up = Gauge("forge_streaming_backend_up", "1 when the pub/sub backend is up", ["backend"],
                                registry=r)
        self.backend_state = Gauge("forge_streaming_backend_state", "1 for the pub/sub backend's current state",
                                   ["backend", "state"], registry=r)
        # Members of each room on this node by connection id -> transport, so a
        # delivery can be split by transport in O(transports), not O(members).
        self._members: dict[str, dict[str, str]] = {}
        self._by_transport: dict[str, TallyCounter[str]] = {}
        self._transports_seen: set[str] = set()  # so a gauge goes back to 0, not stale, when a transport empties
        # Labelled children cached for the per-message path (``labels()`` costs a lookup and a lock).
        self._kind_child = {kind: self.envelopes.labels(kind.value) for kind in EnvelopeKind}
        self._out_child: dict[str, Any] = {}

    # -- events (hooks) ------------------------------------------------------------

    def connected(self, connection: Connection) -> None:
        self._transports_seen.add(connection.transport)
        self.connections_opened.labels(connection.transport).inc()

    def disconnected(self, connection: Connection, code: int) -> None:
        self.connections_closed.labels(connection.transport, str(int(code))).inc()

    def joined(self, connection: Connection, room: str) -> None:
        members = self._members.setdefault(room, {})
        if connection.id in members:
            return
        members[connection.id] = connection.transport
        self._by_transport.setdefault(room, TallyCounter())[connection.transport] += 1

    def left(self, connection: Connection, room: str) -> None:
        members = self._members.get(room)
        if members is None or members.pop(connection.id, None) is None:
            return
        tally = self._by_transport[room]
        tally[connection.transport] -= 1
        if tally[connection.transport] <= 0:
            del tally[connection.transport]
        if not members:
            del self._members[room]
            del self._by_transport[room]

    def delivered(self, envelope: Envelope, recipients: int) -> None:
        self.deliveries.inc(recipients)
        self._kind_child[envelope.kind].inc()
        if envelope.kind is not EnvelopeKind.MESSAGE or not recipients:
            return
        tally = self._by_transport.get(envelope.room)
        if not tally:
            return
        sender_transport = self._members[envelope.room].get(envelope.sender) if envelope.sender else None
        for transport, count in tally.items():
            if transport == sender_transport:
                count -= 1  # the kernel does not echo a message to its sender
            if count > 0:
                child = self._out_child.get(transport)
                if child is None:
                    child = self._out_child[transport] = self.messages_out.labels(transport)
                child.inc(count)

    # -- scraping --------------------------------------------------------------------

    async def render(self) -> bytes:
        """Refresh the gauges that describe the present, then the text exposition format."""
        streaming = self._streaming()
        if streaming is not None:
            by_transport: TallyCounter[str] = TallyCounter(c.transport for c in streaming.connections.values())
            seen = set(streaming.transports) | self._transports_seen
            for transport in seen | set(by_transport):
                self.connections.labels(transport).set(by_transport[transport])
            members: TallyCounter[str] = TallyCounter()
            for tally in self._by_transport.values():
                members.update(tally)
            for transport in seen | set(members):
                self.members.labels(transport).set(members[transport])
            self.local_rooms.set(len(self._members))
            try:
                self.rooms.set(len(await streaming.rooms()))
            except Exception:  # a room store that is down must not break the scrape
                log.warning("could not count rooms for /metrics", exc_info=True)
            health = streaming.health()
            name = streaming.backend.name
            self.backend_up.labels(name).set(1 if health.ok else 0)
            for state in BackendState:
                self.backend_state.labels(name, state.value).set(1 if health.state is state else 0)
        return generate_latest(self.registry)


_by_service: weakref.WeakKeyDictionary[Streaming, StreamingMetrics] = weakref.WeakKeyDictionary()


def metrics_for(streaming: Streaming) -> StreamingMetrics:
    """The metrics of ``streaming``, made on first use (the plugin module is shared by every service)."""
    metrics = _by_service.get(streaming)
    if metrics is None:
        metrics = _by_service[streaming] = StreamingMetrics(streaming)
    return metrics
