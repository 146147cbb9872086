"""Batched socket I/O under paho-mqtt: many MQTT packets per syscall and per loop iteration.

paho-mqtt reads a packet with several tiny ``recv()`` calls (the command
byte, each remaining-length byte, then the body) and writes every queued
packet with its own ``send()``; aiomqtt's reader callback handles one
packet per event-loop iteration. A burst of room messages from the broker
would then become one loop iteration per message, so the kernel would
write every delivery to every member with its own syscall.

Here, for the same public behaviour:

- :class:`BatchingSocket` wraps the socket paho uses. ``recv`` is served
  from one large read; while writes are *corked* ``send`` appends to a
  buffer, sent with one syscall when the writer callback is done.
- :class:`BatchingClient` (an ``aiomqtt.Client``) registers its own reader
  callback, which keeps handing paho packets while bytes are already
  buffered (up to ``MAX_PACKETS_PER_READ``, for fairness with the rest of
  the loop), so every message that arrived together is dispatched in the
  same loop iteration and the kernel coalesces each member's frames into
  one write. Its writer callback corks the socket around paho's
  ``loop_write`` (PUBACKs, PUBLISHes: one ``send`` for all of them).

Packets are still parsed, acknowledged and handed over by paho, in order,
one at a time; only the grouping into syscalls and loop iterations changes.
A TLS connection keeps aiomqtt's own socket callbacks (one packet per
iteration): OpenSSL's buffering and write-retry rules were not worth the risk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

from .wire import parse_user_properties

log = logging.getLogger("forge_streaming.mqtt")

READ_SIZE = 64 * 1024  # one recv() takes what the kernel holds, up to this
MAX_PACKETS_PER_READ = 512  # packets handed to paho in one loop iteration, at most
_IPPROTO_TCP = socket.IPPROTO_TCP
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux
MAX_WRITE_BUFFER = 4 * 1024 * 1024  # past this, corked writes stop accepting and paho keeps the rest queued


class BatchingSocket:
    """What paho needs of a socket, with buffered ``recv`` and corkable ``send``."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._inner_pending = getattr(sock, "pending", None)  # TLS: decrypted bytes held by the SSL object
        self._quickack = _QUICKACK is not None
        self._rbuf = b""
        self._rpos = 0
        self._wbuf = bytearray()
        self.corked = False

    # -- reading ------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Received bytes not yet handed to paho (including a TLS socket's decrypted ones)."""
        held = len(self._rbuf) - self._rpos
        return held + self._inner_pending() if self._inner_pending is not None else held

    def pending(self) -> int:  # paho's and aiomqtt's TLS check
        return self.buffered

    def recv(self, bufsize: int) -> bytes:
        pos = self._rpos
        if pos >= len(self._rbuf):
            data: bytes = self._sock.recv(max(bufsize, READ_SIZE))  # BlockingIOError / SSLWantReadError pass through
            if self._quickack:
                self._ack_now()
            if len(data) <= bufsize:
                self._rbuf, self._rpos = b"", 0
                return data
            self._rbuf, pos = data, 0
        end = pos + bufsize
        self._rpos = end
        if pos == 0 and end >= len(self._rbuf):
            return self._rbuf
        return self._rbuf[pos:end]

    def _ack_now(self) -> None:
        # Linux delays the ACK of data we do not answer at once (the broker's PUBACK for our publish) by
        # up to 40 ms, and a broker with Nagle's algorithm on (Mosquitto's default, set_tcp_nodelay false)
        # holds its next small packet to us (e.g. our own message coming back) until that ACK arrives:
        # measured, 35 ms at p99 of paced messages instead of 0.3 ms. Quick ACKs must be re-armed per read.
        try:
            self._sock.setsockopt(_IPPROTO_TCP, _QUICKACK, 1)
        except (OSError, AttributeError, ValueError):
            self._quickack = False

    # -- writing ------------------------------------------------------------------

    @property
    def unsent(self) -> int:
        return len(self._wbuf)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self._wbuf or self.corked:
            if len(self._wbuf) >= MAX_WRITE_BUFFER:
                raise BlockingIOError()  # paho keeps the packet queued and retries later
            self._wbuf += data
            return len(data)
        return int(self._sock.send(data))

    def flush(self) -> bool:
        """Send what corked writes buffered; True once everything is out (or can never go out)."""
        if self._wbuf:
            try:
                sent = self._sock.send(self._wbuf)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            except OSError:
                # The connection is broken: drop the bytes and let paho find out on its next read
                # (the socket reports readable with the error), as it would from its own send().
                self._wbuf.clear()
                return True
            del self._wbuf[:sent]
        return not self._wbuf

    def close(self) -> None:
        if self._wbuf:  # e.g. a DISCONNECT paho wrote just before closing: best effort
            with contextlib.suppress(OSError):
                self._sock.send(self._wbuf)
            self._wbuf.clear()
        self._rbuf, self._rpos = b"", 0
        self._sock.close()

    def __getattr__(self, name: str) -> Any:  # fileno, setblocking, settimeout, getpeercert, ...
        return getattr(self._sock, name)


class BatchingClient(aiomqtt.Client):
    """``aiomqtt.Client`` whose socket callbacks move many packets per loop iteration and syscall.

    It also decodes the common incoming PUBLISH (QoS 0/1, MQTT v5, only User Properties: what
    nodes send) itself: paho's generic property parser costs tens of microseconds a message.
    Anything else goes to paho's own handler.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        paho_client = self._client
        paho_client._handle_publish = _fast_publish_handler(paho_client, self._queue)  # type: ignore[method-assign]  # noqa: SLF001

    def _fail(self, exc: BaseException) -> None:
        disconnected: asyncio.Future[None] = self._disconnected
        if not disconnected.done():
            disconnected.set_exception(exc)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any = None) -> None:
        """Also end every SUBSCRIBE still waiting for the broker's answer: none will come.

        aiomqtt leaves them waiting for its timeout (``connect_timeout``). A link whose
        connection was taken over during its ``on_connect`` (the sequencer role) would go on
        believing itself connected that long.
        """
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        for mid, waiting in self._pending_subscribes.items():
            if not waiting.done():
                waiting.set_exception(aiomqtt.MqttError(
                    f"connection lost ({reason_code}) before the broker answered SUBSCRIBE {mid}"))

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:  # noqa: ARG002
        # paho calls this from the executor thread that runs connect(), right after creating the
        # socket and before using it: from here on paho reads and writes through the wrapper.
        if isinstance(sock, ssl.SSLSocket):
            # TLS keeps aiomqtt's one-packet-at-a-time I/O: the batching was not shown safe with
            # OpenSSL's own buffering and write-retry rules (incoming publishes are still decoded fast).
            super()._on_socket_open(client, userdata, sock)
            return
        wrapped = sock if isinstance(sock, BatchingSocket) else BatchingSocket(sock)
        client._sock = wrapped  # noqa: SLF001
        # aiomqtt applies ``socket_options`` (TCP_NODELAY) after connecting, and only to a plain
        # socket.socket, which the wrapper is not: apply them here, to the real socket.
        if isinstance(sock, socket.socket):
            for option in self._socket_options:
                sock.setsockopt(*option)

        def on_readable() -> None:
            try:
                for _ in range(MAX_PACKETS_PER_READ):
                    # a packet's callbacks may close the socket: check after each one
                    if client.loop_read() != paho.MQTT_ERR_SUCCESS or client._sock is not wrapped:  # noqa: SLF001
                        return
                    if wrapped.buffered <= 0:
                        break  # nothing more without a syscall: the next readiness event brings it
                else:
                    # This iteration's share is done but packets wait in our buffer, where no readiness
                    # event will announce them (the socket may be empty): read on in the next iteration.
                    self._loop.call_soon(on_readable)
                # PUBACKs, and publishes the broker's PUBACKs released, go out now, before this
                # iteration's fan-out is flushed to the members: the broker works meanwhile.
                if client.want_write():
                    self._write_out(client, wrapped)
            except Exception as exc:  # like aiomqtt: a broken read means a broken connection
                self._fail(exc)

        def create_misc_task() -> None:
            self._misc_task = self._loop.create_task(self._misc_loop())

        self._loop.call_soon_threadsafe(self._loop.add_reader, wrapped.fileno(), on_readable)
        self._loop.call_soon_threadsafe(create_misc_task)

    def _write_out(self, client: paho.Client, sock: BatchingSocket) -> None:
        """Everything paho has queued, in one ``send``; keeps watching the socket while some is left."""
        if not sock.flush():
            return  # the socket is still full: the writer callback stays registered, paho's packets wait
        sock.corked = True
        try:
            client.loop_write()  # every queued packet goes into the buffer...
        finally:
            sock.corked = False
        # ...and out in one syscall. paho stopped watching if it has nothing queued (see
        # _on_socket_unregister_write); we stop once our buffer is out too.
        if client._sock is sock and sock.flush() and not client.want_write():  # noqa: SLF001
            fileno = sock.fileno()
            if fileno >= 0:
                self._loop.remove_writer(fileno)

    def _call_in_loop(self, method: Any, *args: Any) -> None:
        """Run a loop method now when on the loop's thread (no self-pipe wake-up), else thread-safely."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            method(*args)
        else:
            self._loop.call_soon_threadsafe(method, *args)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not isinstance(sock, BatchingSocket):
            super()._on_socket_register_write(client, userdata, sock)
            return

        def on_writable() -> None:
            try:
                current = client._sock  # noqa: SLF001
                if isinstance(current, BatchingSocket):
                    self._write_out(client, current)
                elif current is not None:
                    client.loop_write()
            except Exception as exc:  # like aiomqtt: a broken write means a broken connection
                self._fail(exc)

        self._call_in_loop(self._loop.add_writer, sock.fileno(), on_writable)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:  # noqa: ARG002
        # paho has nothing queued, but what it handed over may still wait in our buffer: keep watching
        # then (_write_out stops once the buffer is out).
        if isinstance(sock, BatchingSocket) and sock.unsent and client._sock is sock:  # noqa: SLF001
            return
        fileno = sock.fileno()
        if fileno >= 0:
            self._loop.remove_writer(fileno)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fileno = sock.fileno()
        if fileno >= 0 and isinstance(sock, BatchingSocket):
            self._loop.remove_writer(fileno)  # we may have kept watching after paho stopped
        super()._on_socket_close(client, userdata, sock)


def _fast_publish_handler(client: paho.Client, queue: asyncio.Queue[aiomqtt.Message]) -> Any:
    """paho's ``_handle_publish`` for QoS 0/1 v5 PUBLISHes with only User Properties; paho's for the rest.

    The message goes straight into aiomqtt's queue (the plugin's dispatching queue) as an
    ``aiomqtt.Message``: no paho ``MQTTMessage`` (whose receipt holds a ``threading.Condition``),
    no topic matching against per-topic callbacks (aiomqtt registers none), no conversion.
    """
    original = client._handle_publish  # noqa: SLF001
    v5 = client._protocol == paho.MQTTv5  # noqa: SLF001
    success = paho.MQTT_ERR_SUCCESS
    message_type = aiomqtt.Message

    def handle() -> Any:
        packet = client._in_packet  # noqa: SLF001
        header = packet["command"]
        qos = (header & 0x06) >> 1
        data = packet["packet"]
        if not v5 or qos == 2 or len(data) < 2:
            return original()
        pos = 2 + ((data[0] << 8) | data[1])
        try:
            topic = data[2:pos].decode("utf-8")
        except UnicodeDecodeError:
            return original()
        if qos:
            if pos + 2 > len(data):
                return original()
            mid = (data[pos] << 8) | data[pos + 1]
            pos += 2
        else:
            mid = 0
        parsed = parse_user_properties(data, pos)
        if parsed is None:
            return original()  # other properties, or malformed: paho decides
        properties, pos = parsed
        try:
            message = message_type(topic, bytes(data[pos:]), qos, bool(header & 0x01), mid,
                                   properties)  # type: ignore[arg-type]
        except ValueError:  # a topic aiomqtt refuses (empty, wildcards): paho's path reports it
            return original()
        try:
            queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("MQTT message queue is full; discarding a message on %r", topic)
        if qos == 1 and not client._manual_ack:  # noqa: SLF001
            return client._send_puback(mid)  # noqa: SLF001
        return success

    return handle
