"""One MQTT connection that stays up: connect, lose, back off, reconnect, forever.

aiomqtt does not reconnect by itself, and a broker without persistence
forgets every subscription when it restarts, so each (re)connection runs
the owner's ``on_connect`` to subscribe and republish from scratch.

Two choices keep the hot path free of task switches:

- incoming messages are handed to the owner's ``on_message`` straight
  from the socket-read callback, through a queue class whose
  ``put_nowait`` dispatches instead of queueing (aiomqtt's public
  ``queue_type`` option), rather than one ``asyncio`` task per message;
- :meth:`publish_nowait` hands a message to paho-mqtt without waiting for
  its PUBACK: paho tracks QoS 1/2 flows itself, in call order, within a
  bounded queue. aiomqtt's own ``publish()`` would wait a broker round
  trip per message;
- the client is a :class:`~.batching.BatchingClient`: every packet that
  arrived together is handled in one loop iteration (so the kernel
  coalesces each member's frames of a burst into one write), with one
  ``recv`` and one ``send`` per batch instead of several per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from forge_streaming import BackendHealth, BackendState
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .batching import BatchingClient
from .settings import MqttSettings
from .wire import UserProperties, qos0_publish_packet

log = logging.getLogger("forge_streaming.mqtt")

MessageHandler = Callable[[aiomqtt.Message], None]
ConnectHandler = Callable[[aiomqtt.Client], Awaitable[None]]


class Sent(enum.Enum):
    OK = "ok"  # handed to paho: it goes out in call order, QoS flow tracked by paho
    FULL = "full"  # paho's bounded queue is full (the broker is slower than us): wait and retry
    DOWN = "down"  # not connected


class _NoReceipt:
    """Stands in for paho's ``MQTTMessageInfo`` on our QoS 0 publishes: paho marks it published."""

    __slots__ = ()

    def _set_as_published(self) -> None:
        pass


_NO_RECEIPT = _NoReceipt()


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    STOPPED = "stopped"


def _dispatching_queue(handler: MessageHandler) -> type[asyncio.Queue[aiomqtt.Message]]:
    class DispatchQueue(asyncio.Queue[aiomqtt.Message]):
        def put_nowait(self, item: aiomqtt.Message) -> None:
            try:
                handler(item)
            except Exception:  # a bad message must never take the connection down
                log.exception("handling an MQTT message on %r failed", item.topic.value)

    return DispatchQueue


class MqttLink:
    """A self-healing connection; ``role`` names it in logs and in its client id."""

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        role: str,
        on_message: MessageHandler,
        on_connect: ConnectHandler,
        on_disconnect: Callable[[], None] | None = None,
        will: aiomqtt.Will | Callable[[], aiomqtt.Will] | None = None,
        session_expiry: int | None = None,
        manual_ack: bool = False,
        once: bool = False,
    ) -> None:
        """``once``: one connection attempt, never a reconnect; when it fails or ends, the link stops
        and ``on_disconnect`` is called (whether or not it was ever up). For a client id whose holder
        holds a role: connecting again would take the id over from whoever holds it now."""
        self.settings = settings
        self.client_id = client_id
        self.role = role
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._will = will
        # seconds the broker keeps this client's session (subscriptions, queued QoS 1 messages) while it is
        # away; None: a clean session on every connection
        self._session_expiry = session_expiry
        self._manual_ack = manual_ack  # QoS 1 messages are acknowledged by ack(), not on arrival
        self._once = once
        self._broker = settings.broker()
        self._max_queued = max(settings.outgoing_buffer, 1000)  # paho's outgoing queue, in messages
        self.state = LinkState.CONNECTING
        self.last_error = ""
        self.connects = 0
        self.client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()

    @property
    def url(self) -> str:
        scheme = "mqtts" if self._broker.tls else "mqtt"
        return f"{scheme}://{self._broker.host}:{self._broker.port}"

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background; wait up to ``connect_timeout`` for the first connection."""
        self.state = LinkState.CONNECTING
        self._task = task = asyncio.create_task(self._run(), name=f"forge-mqtt-{self.role}")
        up = asyncio.ensure_future(self._up.wait())
        try:
            await asyncio.wait([up, task], timeout=self.settings.connect_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
        if not self._up.is_set() and not task.done() and not self._once:  # (once: the attempt logs its end)
            log.warning("MQTT %s: broker %s not reachable after %.1fs (%s); starting degraded, retrying",
                        self.role, self.url, self.settings.connect_timeout, self.last_error or "no answer")

    async def stop(self) -> None:
        self.state = LinkState.STOPPED
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.client = self._paho = None

    @property
    def stopped(self) -> bool:
        """:meth:`stop` was called (read anew each time: the connection loop checks it after every wait)."""
        return self.state is LinkState.STOPPED

    def health(self) -> BackendHealth:
        if self.state is LinkState.UP:
            return BackendHealth(BackendState.UP, f"connected to {self.url}")
        if self.state is LinkState.CONNECTING:
            return BackendHealth(BackendState.CONNECTING, f"connecting to {self.url}")
        return BackendHealth(BackendState.DOWN, f"broker {self.url} unreachable: {self.last_error}; reconnecting")

    # -- the connection loop -------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        tls_context = None
        if self._broker.tls:
            tls_context = ssl.create_default_context(cafile=self.settings.ca_file)
        will = self._will() if callable(self._will) else self._will  # a callable: a new will per connection
        client = BatchingClient(
            self._broker.host,
            self._broker.port,
            username=self._broker.username,
            password=self._broker.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=self._session_expiry is None,
            keepalive=max(1, round(self.settings.keepalive)),
            will=will,
            timeout=max(self.settings.connect_timeout, 1.0),
            tls_context=tls_context,
            queue_type=_dispatching_queue(self._on_message),
            max_inflight_messages=self.settings.max_inflight,
            max_queued_outgoing_messages=self._max_queued,  # past it: Sent.FULL
            logger=logging.getLogger("forge_streaming.mqtt.paho"),
            properties=_connect_properties(self._session_expiry),
            # small packets (PUBACKs, single messages) must not wait for Nagle's algorithm
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        client.pending_calls_threshold = 1_000_000  # we never wait on publishes; subscribes are few
        # Nothing here uses aiomqtt's publish() (it waits a broker round trip per message; see
        # publish_and_wait), so its on_publish callback is off: paho would otherwise build a
        # reason code and a properties object for every QoS 0 packet it sends.
        client._client.on_publish = None  # noqa: SLF001
        if self._manual_ack:
            client._client.manual_ack_set(True)  # noqa: SLF001
        return client

    async def _run(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop`.

        The loop also looks at ``state`` itself, not only at the
        cancellation: a ``stop()`` in the loop turn where the broker's
        CONNACK arrives is lost inside aiomqtt's connect (Python 3.11's
        ``asyncio.wait_for`` then returns instead of raising), and the link
        would otherwise go on connecting under a client id its owner gave up.
        """
        delay = self.settings.reconnect_min
        while not self.stopped:
            client = self._make_client()
            try:
                async with client:
                    if self.stopped:  # stopped as the broker accepted us
                        return
                    self.client = client
                    self._paho = getattr(client, "_client", None)
                    await self._on_connect(client)
                    if self.stopped:
                        return
                    self.state = LinkState.UP
                    self.connects += 1
                    self._up.set()
                    delay = self.settings.reconnect_min
                    log.info("MQTT %s: connected to %s as %s", self.role, self.url, self.client_id)
                    async for _ in client.messages:  # never yields: messages are dispatched on arrival
                        pass
            except asyncio.CancelledError:
                self._forget()
                raise
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc) or type(exc).__name__
            except Exception as exc:  # a bug in on_connect: say so loudly, then retry like any failure
                if self.stopped:
                    return
                log.exception("MQTT %s: setting up the connection to %s failed", self.role, self.url)
                self.last_error = f"{type(exc).__name__}: {exc}"
            if self.stopped:
                return
            was_up = self.state is LinkState.UP
            self._forget()
            self.state = LinkState.DOWN
            if self._once:
                self.state = LinkState.STOPPED
                log.info("MQTT %s: connection to %s %s (%s); not connecting again", self.role, self.url,
                         "lost" if was_up else "failed", self.last_error or "no answer")
                if not was_up and self._on_disconnect is not None:  # (_forget told it when it was up)
                    self._on_disconnect()
                return
            if was_up:
                log.warning("MQTT %s: lost broker %s (%s); reconnecting", self.role, self.url, self.last_error)
            else:
                log.debug("MQTT %s: cannot connect to %s (%s); retry in %.2fs", self.role, self.url,
                          self.last_error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.reconnect_max)

    def _forget(self) -> None:
        self.client = self._paho = None
        self._up.clear()
        if self.state is LinkState.UP and self._on_disconnect is not None:
            self._on_disconnect()

    # -- using the connection ------------------------------------------------------

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int, retain: bool = False,
                       properties: Any = None) -> Sent:
        """Hand a message to the connection without waiting for the broker."""
        client = self._paho
        if client is None:
            return Sent.DOWN
        if qos == 0 and not retain and isinstance(properties, UserProperties):
            return self._publish_qos0(client, topic, payload, properties)
        rc = client.publish(topic, payload, qos, retain, properties).rc
        if rc == paho.MQTT_ERR_SUCCESS:
            return Sent.OK
        return Sent.FULL if rc == paho.MQTT_ERR_QUEUE_SIZE else Sent.DOWN

    def _publish_qos0(self, client: paho.Client, topic: str, payload: bytes, properties: UserProperties) -> Sent:
        """What paho's ``publish`` does for QoS 0, minus its receipt object, plus a bound on its queue.

        The packet joins paho's outgoing queue like any other, so it leaves in call order with
        everything paho sends. paho bounds QoS 1/2 messages only; a QoS 0 publish counts the packets
        waiting in that queue (they wait only while the socket and our 4 MiB write buffer are full).
        """
        if client._sock is None:  # noqa: SLF001
            return Sent.DOWN
        if len(client._out_packet) >= self._max_queued:  # noqa: SLF001
            return Sent.FULL
        packet = qos0_publish_packet(topic.encode(), properties, payload)
        client._packet_queue(paho.PUBLISH, packet, 0, 0, _NO_RECEIPT)  # type: ignore[arg-type]  # noqa: SLF001
        return Sent.OK

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge a QoS 1 message (``manual_ack`` links): the PUBACK leaves after what was sent before it."""
        client = self._paho
        if client is not None and message.qos:
            client.ack(message.mid, message.qos)

    async def publish_and_wait(self, topic: str, payload: bytes, *, qos: int, retain: bool = False,
                               timeout: float = 2.0) -> bool:
        """Publish and wait until the broker has it (QoS 1/2) or it is sent (QoS 0); False if not in time."""
        client = self._paho
        if client is None:
            return False
        info = client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return False
        deadline = asyncio.get_running_loop().time() + timeout
        while not info.is_published():
            if asyncio.get_running_loop().time() >= deadline or self._paho is not client:
                return False
            await asyncio.sleep(0.01)
        return True

    async def subscribe(self, topics: list[str], qos: int) -> None:
        """Subscribe now if connected (waiting for the broker's SUBACK); otherwise on_connect will."""
        client = self.client
        if client is None or not topics:
            return
        for start in range(0, len(topics), 100):
            await client.subscribe([(t, qos) for t in topics[start:start + 100]])

    async def unsubscribe(self, topics: list[str]) -> None:
        client = self.client
        if client is None or not topics:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(topics)


def _connect_properties(session_expiry: int | None = None) -> Properties:
    # Receive Maximum: how many unacknowledged QoS 1/2 messages the broker may send us. Without it
    # Mosquitto sends 20 and waits for our PUBACKs; we handle and acknowledge every message as it is
    # read, so let the broker send a burst at once (it arrives in one read and one fan-out).
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = 65535
    if session_expiry is not None:
        props.SessionExpiryInterval = session_expiry
    return props


def publish_properties() -> Properties:
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def read_user_properties(message: aiomqtt.Message) -> dict[str, str]:
    props: Any = message.properties
    pairs = getattr(props, "UserProperty", None) if props is not None else None
    return dict(pairs) if pairs else {}

