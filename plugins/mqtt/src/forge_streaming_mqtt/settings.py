"""The ``pubsub.mqtt`` config section: which broker, how to talk to it, how to behave when it is gone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from forge_streaming import Check, ConfigSection, Duration, Meta

SECTION = "pubsub.mqtt"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


class MqttSettings(ConfigSection):
    """Settings shared by the MQTT pub/sub backend and the MQTT room store."""

    url: Annotated[str, Check(_check_url)] = "mqtt://127.0.0.1:1883"
    """``mqtt://host[:port]`` (1883) or ``mqtts://host[:port]`` (8883, TLS); may carry ``user:password@``."""
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    """Base of the MQTT client ids; default ``{topic_prefix}-{node_id}``. Suffixed ``-pubsub`` / ``-rooms``."""
    topic_prefix: Annotated[str, Check(_check_prefix)] = "forge"
    qos: Literal[0, 1, 2] = 0
    """QoS of room messages and room subscriptions. 0 by default: a node's session is not kept across
    reconnects (clean start), so QoS 1 adds acknowledgements and the broker's in-flight window
    (Mosquitto: 20) without a guarantee QoS 0 lacks; a lost connection is covered by ``resync``."""
    keepalive: Annotated[Duration, Check(_check_keepalive)] = 10.0
    """MQTT keep-alive; a node that dies silently leaves presence within 1.5x this."""
    tls: bool = False
    ca_file: str | None = None
    connect_timeout: Duration = 5.0
    """How long ``start`` waits for the first connection before the node starts degraded."""
    reconnect_min: Duration = 0.1
    reconnect_max: Duration = 5.0
    outgoing_buffer: Annotated[int, Meta(ge=0)] = 10_000
    """Room messages kept while the broker is unreachable; past it the oldest are dropped (and counted)."""
    max_inflight: Annotated[int, Meta(ge=1, le=65535)] = 20
    """Unacknowledged QoS 1/2 publishes in flight; keep it at or below the broker's receive maximum
    (Mosquitto's ``max_inflight_messages``, 20 by default): paho-mqtt does not read it from the broker."""
    history_timeout: Duration = 1.0
    """How long a resume waits for another node to answer a history request."""
    subscribe_mode: Literal["rooms", "wildcard"] = "rooms"
    ingest: bool = True
    """Convert device publishes on ``{prefix}/rooms/{room}/publish`` into room messages."""

    def broker(self) -> BrokerAddress:
        """The broker address, with explicit username/password/tls overriding the URL."""
        address = parse_url(self.url)
        return BrokerAddress(
            host=address.host,
            port=address.port,
            tls=address.tls or self.tls or self.ca_file is not None,
            username=self.username if self.username is not None else address.username,
            password=self.password if self.password is not None else address.password,
        )


def _check_url(value: str) -> str:
    parse_url(value)
    return value


def _check_prefix(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/") or any(c in value for c in "+#\0"):
        raise ValueError(f"expected a topic prefix without '+', '#' or a leading/trailing '/', got {value!r}")
    if value.startswith("$"):
        raise ValueError(f"expected a topic prefix not starting with '$' (reserved by brokers), got {value!r}")
    return value


def _check_keepalive(value: float) -> float:
    if value < 1:
        raise ValueError(f"expected a keep-alive of at least 1s (MQTT counts whole seconds), got {value!r}")
    return value


def parse_url(url: str) -> BrokerAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"expected a broker URL like mqtt://host:1883 or mqtts://host:8883, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a broker URL with a host, like mqtt://127.0.0.1:1883, got {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"expected a broker URL with a numeric port, got {url!r}") from None
    return BrokerAddress(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
