"""The ``pubsub.nats`` config section: which servers, how to log in, how the stream keeps history."""

from __future__ import annotations

import os
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from forge_streaming import Check, ConfigSection, Duration, Meta, Parse, Size

SECTION = "pubsub.nats"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _check_servers(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("expected at least one server URL, like nats://127.0.0.1:4222")
    for url in value:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
            raise ValueError(f"expected server URLs like nats://host:4222 or tls://host:4222, got {url!r}")
        try:
            parts.port  # noqa: B018 (parsing it is the check)
        except ValueError:
            raise ValueError(f"expected a numeric port in {url!r}") from None
    return value


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"expected a JetStream name of letters, digits, '-' and '_' (at most 64), got {value!r}")
    return value


def _check_prefix(value: str) -> str:
    if not _PREFIX.fullmatch(value) or value.startswith("$"):
        raise ValueError(f"expected a subject prefix of dot-separated tokens of letters, digits, '-' and '_' "
                         f"(like forge or acme.chat), got {value!r}")
    return value


def _check_ttl(value: float) -> float:
    if value < 2 or value != int(value):
        raise ValueError(f"expected whole seconds, at least 2 (NATS message TTLs count seconds), got {value!r}")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"expected a duration above 0, got {value!r}")
    return value


class NatsSettings(ConfigSection):
    """Settings shared by the NATS pub/sub backend and the NATS room store."""

    servers: Annotated[tuple[str, ...], Parse(_one_or_many), Check(_check_servers)] = ("nats://127.0.0.1:4222",)
    """Seed URLs of the cluster: ``nats://host:4222`` (or ``tls://``, ``ws://``, ``wss://``); the client
    learns the other servers of a cluster from the first it reaches."""
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    """A ``.creds`` file (JWT and NKey seed) for decentralised auth."""
    tls: bool = False
    """Use TLS even with ``nats://`` URLs (a ``tls://`` URL or ``ca_file`` turns it on too)."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    name: str | None = None
    """The connection name the server shows (``/connz``); default ``forge-{node_id}-{pubsub|rooms}``."""

    subject_prefix: Annotated[str, Check(_check_prefix)] = "forge"
    """Room messages go to ``{prefix}.rooms.{room}``, live notices to ``{prefix}.notices.{room}``."""
    stream: Annotated[str, Check(_check_name)] = "FORGE_ROOMS"
    """The JetStream stream holding every room's history, one subject per room."""
    subscribe_mode: Literal["rooms", "wildcard"] = "rooms"
    """``rooms``: a node hears the rooms it has members in (one subscription each); ``wildcard``: one
    subscription to every room, filtered on the node."""
    manage_stream: bool = True
    """Create the stream when it is missing and bring its limits to these settings; off: it must exist."""
    max_msgs_per_subject: Annotated[int, Meta(ge=1)] | None = None
    """Messages the stream keeps per room; default ``rooms.history_size``, at least 1,000: a node that fell
    behind in a burst reads what it missed from the stream, so this is also each node's catch-up buffer."""
    max_bytes: Size | None = None
    """Bytes the whole stream keeps (oldest dropped first); none: no limit."""
    max_age: Duration = 0.0
    """How long a message is kept; 0: for ever (only the count per room limits it)."""
    max_msg_size: Size | None = None
    """The largest message the stream accepts; none: the server's ``max_payload``."""
    storage: Literal["file", "memory"] = "file"
    """``file`` survives a restart of the NATS servers; ``memory`` does not."""
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1
    """Copies of the stream (and presence bucket) in a cluster; 3 survives the loss of one server."""
    batch: bool = True
    """Room messages a node publishes to one room in one turn of its event loop are stored as one message (an
    atomic batch, nats-server 2.12+), each at a stream sequence of its own; off: one stored message each (the
    only form a node of forge-streaming-nats 0.1 reads)."""
    duplicate_window: Duration = 30.0
    """How long the stream remembers message ids, so a publish retried after a lost acknowledgement
    is stored once."""

    presence_bucket: Annotated[str, Check(_check_name)] = "FORGE_PRESENCE"
    """The JetStream key-value bucket of the room store."""
    presence_ttl: Annotated[Duration, Check(_check_ttl)] = 6.0
    """A node that stops refreshing its liveness key (dead, stopped, partitioned) is gone from
    presence after this; it refreshes every third of it. Whole seconds, at least 2."""

    connect_timeout: Annotated[Duration, Check(_positive)] = 5.0
    """How long ``start`` waits for the first connection before the node starts degraded."""
    reconnect_wait: Duration = 0.5
    ping_interval: Annotated[Duration, Check(_positive)] = 5.0
    """A server that stops answering is noticed within about twice this."""
    ack_timeout: Annotated[Duration, Check(_positive)] = 2.0
    """How long one publish waits for JetStream's acknowledgement before it is retried."""
    publish_timeout: Duration = 10.0
    """How long a publish is retried (same message id: stored once) before it is held in the outgoing buffer."""
    outgoing_buffer: Annotated[int, Meta(ge=0)] = 10_000
    """Room messages held while JetStream is unreachable, sent in order once it is back; past it the
    oldest are dropped (and counted)."""
    heartbeat: Annotated[Duration, Check(_positive)] = 2.0
    """Idle heartbeat of this node's consumer: a consumer silent for three of them is recreated."""
    max_pending: Annotated[int, Meta(ge=16)] = 65_536
    """Messages the client may hold unread for this node's consumer before it drops (then recovers)."""

    def __post_init__(self) -> None:
        if self.token is not None and (self.user is not None or self.password is not None):
            raise ValueError("give either token or user/password, not both")
        if (self.user is None) != (self.password is None):
            raise ValueError("give both user and password (or neither)")
        for key in ("creds_file", "ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{key}: expected a readable file, got {path!r} (no such file)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file for a client certificate (or neither)")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None or any(
            url.startswith(("tls://", "wss://")) for url in self.servers)
