"""The ``forge-streaming`` command: serve, plugins, check-config, publish, stats.

Also the server both ``serve`` and the test kit run (:func:`build_server`):
uvicorn with the transports' protocol classes, a draining shutdown, and
deadlines uvicorn lacks (:class:`HttpGuard`: complete request headers within
``server.header_timeout``, a body within ``server.body_timeout``, at most
``limits.max_pending_connections`` connections still sending headers). And
the log filter that keeps tokens and secrets out of every log line
(:class:`RedactingFilter`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import uvicorn

from . import __version__
from .config import ENV_CONFIG_FILE, LimitSettings, ServerSettings, build_config, merge, read_yaml, unwrap_forge
from .errors import ConfigError, StreamingError
from .plugins import make_plugin_manager
from .service import Streaming
from .workers import Supervisor, resolve_workers, worker_command, worker_slot

log = logging.getLogger("forge_streaming.cli")


# -- logging --------------------------------------------------------------------------------

SECRET_NAMES = ("access_token", "refresh_token", "id_token", "token", "jwt", "api_key", "apikey", "key",
                "password", "passwd", "secret", "client_secret")
"""Query parameters and JSON/dict keys whose values never reach a log line."""

SECRET_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "x-stream-token", "cookie")

REDACTED = "[redacted]"

_NAMES = "|".join(sorted(SECRET_NAMES, key=len, reverse=True))
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # ?token=..., &api_key=..., password=...
    (re.compile(r"(?i)(?<![\w-])(" + _NAMES + r")=(?!\[redacted\])[^&\s'\"#;,)\]]+"), r"\1=" + REDACTED),
    # "token": "...", 'password': b'...', "key": 123
    (re.compile(r"(?i)(['\"](?:" + _NAMES + r")['\"]\s*:\s*)(?:b?'[^']*'|b?\"[^\"]*\"|[^\s,}\]]+)"),
     r"\1'" + REDACTED + "'"),
    # header: value, 'header': 'value', (b'header', b'value')
    (re.compile(r"(?i)(\b(?:" + "|".join(SECRET_HEADERS) + r")\b['\"]?\s*[:=,]\s*(?:b?['\"])?)[^'\"\r\n]+"),
     r"\1" + REDACTED),
    (re.compile(r"(?i)\b(bearer|basic)\s+(?!\[redacted\])[A-Za-z0-9._~+/=-]+"), r"\1 " + REDACTED),
    # JWTs anywhere else (path segments, bodies, reprs): header.payload.signature, base64url
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
)


def redact(text: str) -> str:
    """``text`` with tokens and secrets replaced by ``[redacted]`` (see :class:`RedactingFilter`)."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Keeps tokens and secrets out of log lines: query parameters named like :data:`SECRET_NAMES`,
    ``Authorization`` and similar headers, bearer credentials and JWTs, in the message, its
    arguments (uvicorn's access line has the path with its query as an argument) and tracebacks.

    Arguments are redacted one by one and keep their place, so a formatter that unpacks them
    (uvicorn's ``AccessFormatter``) still works.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(self._arg(arg) for arg in args)
        elif isinstance(args, Mapping):
            record.args = {key: self._arg(value) for key, value in args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True

    @staticmethod
    def _arg(arg: Any) -> Any:
        if arg is None or isinstance(arg, (int, float)):
            return arg
        text = arg if isinstance(arg, str) else str(arg)
        redacted = redact(text)
        return arg if redacted == text else redacted


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, connection id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        connection_id = getattr(record, "connection_id", None)
        if connection_id:
            entry["connection_id"] = connection_id
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        connection_id = getattr(record, "connection_id", None)
        return f"{text} [conn={connection_id}]" if connection_id and connection_id not in text else text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """One handler on the root logger (uvicorn's loggers propagate to it), with secrets redacted."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    redacting = RedactingFilter()
    handler.addFilter(redacting)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # handlers of their own, if anyone added some
        for own in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in own.filters):
                own.addFilter(redacting)


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise StreamingError(f"target {target!r} must look like module:attribute (e.g. myapp:streaming)")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StreamingError(f"cannot import module {module_name!r} of target {target!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise StreamingError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _find_streaming(obj: Any, depth: int = 3) -> Streaming | None:
    """The Streaming service behind an app: itself, ``app.state.streaming``, or a mounted one."""
    if isinstance(obj, Streaming):
        return obj
    streaming = getattr(getattr(obj, "state", None), "streaming", None)
    if isinstance(streaming, Streaming):
        return streaming
    if depth > 0:
        for route in getattr(obj, "routes", None) or ():
            found = _find_streaming(getattr(route, "app", None), depth - 1)
            if found is not None:
                return found
    return None


# -- the HTTP server ----------------------------------------------------------------------------


def _default_pending_limit() -> int:
    """Half the process's open-file limit, at most 1000: half-sent requests never starve the others of fds."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1000
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1000
    return max(16, min(1000, soft // 2))


_HEADERS, _BODY, _APP, _DONE = "headers", "body", "app", "done"


class HttpGuard:
    """Deadlines for HTTP/1.1 requests, around uvicorn's own HTTP protocol class.

    uvicorn waits forever for a request's headers and body. Installed as
    uvicorn's ``http=`` (it is called like the class it wraps), this gives
    every connection ``header_timeout`` to send complete request headers
    (from connecting, or from its first byte after the previous response)
    and ``body_timeout`` for a body once the headers are in; a connection
    that started a request and misses either is answered 408 and closed,
    one that never sent a byte is closed. At most ``max_pending``
    connections may be sending headers at once: past that the oldest is
    cut, so half-open sockets cannot take every file descriptor. A
    WebSocket upgrade leaves the guard once its request is complete (the
    WebSocket protocol's handshake timeout takes over).
    """

    def __init__(self, protocol_class: Any, *, header_timeout: float, body_timeout: float, max_pending: int,
                 streaming: Streaming | None = None) -> None:
        self.protocol_class = protocol_class
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_pending = max_pending
        self.streaming = streaming
        self.pending: dict[GuardedHttpProtocol, None] = {}
        """Connections sending request headers, oldest first."""
        self.alpn_protocols = getattr(protocol_class, "alpn_protocols", None)
        self._warned_at = 0.0

    def __call__(self, config: uvicorn.Config, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> GuardedHttpProtocol:
        inner = self.protocol_class(config=config, server_state=server_state, app_state=app_state, _loop=_loop)
        return GuardedHttpProtocol(inner, self)

    def count(self, name: str) -> None:
        if self.streaming is not None:
            self.streaming.count(name)

    def add_pending(self, protocol: GuardedHttpProtocol) -> None:
        pending = self.pending
        pending[protocol] = None
        while len(pending) > self.max_pending:
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.cut()
            self.count("http.pending_evicted")
            now = time.monotonic()
            if now - self._warned_at > 10:
                self._warned_at = now
                log.warning("%d connections are still sending their request headers (limits.max_pending_connections"
                            " is %d): closing the oldest", len(pending) + 1, self.max_pending)


class GuardedHttpProtocol(asyncio.Protocol):
    """One HTTP connection: uvicorn's protocol (``inner``) with the deadlines of :class:`HttpGuard`.

    Reads uvicorn's ``cycle`` (a new one once a request's headers are
    complete; its ``more_body``, ``response_started``, ``response_complete``),
    common to its httptools and h11 protocols; an upgrade is seen as the
    transport's protocol changing.
    """

    __slots__ = ("inner", "guard", "transport", "_timer", "_cycle", "_phase", "_begun")

    def __init__(self, inner: Any, guard: HttpGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._cycle: Any = None
        self._phase = _HEADERS
        self._begun = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        if self._phase is _APP:
            cycle = self._cycle
            if cycle is not None and (cycle.response_complete or not cycle.more_body):
                self._await_headers()  # bytes of the next request (kept alive, or pipelined)
        self._begun = True
        self.inner.data_received(data)
        self._progress()

    def eof_received(self) -> bool | None:
        result: bool | None = self.inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        self._phase = _DONE
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- deadlines ---------------------------------------------------------------------

    def _await_headers(self) -> None:
        self._leave()
        self._phase = _HEADERS
        self._begun = False
        self.guard.add_pending(self)
        if self.guard.header_timeout > 0 and self._phase is _HEADERS:
            self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._expired)

    def _leave(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.guard.pending.pop(self, None)

    def _progress(self) -> None:
        transport = self.transport
        if transport is None or transport.get_protocol() is not self:  # upgraded to WebSocket
            self._leave()
            self._phase = _DONE
            return
        cycle = getattr(self.inner, "cycle", None)
        if cycle is not None and cycle is not self._cycle:  # a request's headers are complete
            self._cycle = cycle
            self._leave()
            self._phase = _APP
            if cycle.more_body and self.guard.body_timeout > 0:
                self._phase = _BODY
                self._timer = asyncio.get_running_loop().call_later(self.guard.body_timeout, self._expired)
        elif self._phase is _BODY and cycle is not None and not cycle.more_body:
            self._leave()
            self._phase = _APP

    def _expired(self) -> None:
        self._timer = None
        phase, transport = self._phase, self.transport
        self._leave()
        if transport is None or transport.is_closing() or phase not in (_HEADERS, _BODY):
            return
        self._phase = _DONE
        cycle = self._cycle if phase is _BODY else None
        if phase is _HEADERS:
            what, key, limit = "request headers", "server.header_timeout", self.guard.header_timeout
            self.guard.count("http.header_timeout")
        else:
            what, key, limit = "request body", "server.body_timeout", self.guard.body_timeout
            self.guard.count("http.body_timeout")
        log.debug("closing HTTP connection from %s: %s not complete within %s (%gs)",
                  getattr(self.inner, "client", None), what, key, limit)
        answer = (phase is _HEADERS and self._begun) or (cycle is not None and not cycle.response_started)
        if answer:
            body = f"{what} not complete within {limit:g}s\n".encode()
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body))
        if cycle is not None:  # what closing does anyway: the app reads a disconnect, its answer is not written
            cycle.disconnected = True
            cycle.message_event.set()
        transport.close()

    def cut(self) -> None:
        """Closed to make room (too many connections sending headers)."""
        self._leave()
        self._phase = _DONE
        if self.transport is not None:
            self.transport.abort()


def build_server(app: Any, streaming: Streaming | None, *, host: str, port: int, log_level: str = "info",
                 **uvicorn_options: Any) -> DrainingServer:
    """The uvicorn server of ``forge-streaming serve`` and the test kit.

    The transports' options (``streaming.server_options()``: protocol
    classes, WebSocket limits), the HTTP deadlines of :class:`HttpGuard`,
    and a shutdown that drains clients first. Sets ``streaming.http_address``
    first, so that WebTransport binds the port HTTP really listens on.
    """
    if streaming is not None:
        streaming.http_address = (host, port)
    options = streaming.server_options() if streaming else {}
    server_settings = streaming.config.server if streaming else ServerSettings()
    limits = streaming.config.limits if streaming else LimitSettings()
    protocol_class = options.pop("http", None)
    if protocol_class is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        protocol_class = AutoHTTPProtocol
    options["http"] = HttpGuard(
        protocol_class, header_timeout=server_settings.header_timeout, body_timeout=server_settings.body_timeout,
        max_pending=limits.max_pending_connections or _default_pending_limit(), streaming=streaming)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_config=None, log_level=log_level,
                            **{**options, **uvicorn_options})
    return DrainingServer(config, streaming)


class DrainingServer(uvicorn.Server):
    """uvicorn, but clients are told and flushed before their connections are cut."""

    def __init__(self, config: uvicorn.Config, streaming: Streaming | None) -> None:
        super().__init__(config)
        self.streaming = streaming

    async def shutdown(self, sockets: Any = None) -> None:
        if self.streaming is not None:
            await self.streaming.drain()
        await super().shutdown(sockets)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    config_path = args.config or os.environ.get(ENV_CONFIG_FILE) or None
    if args.target:
        file_raw = read_yaml(config_path) if config_path else None  # a bad file is named before the import
        if config_path:
            os.environ[ENV_CONFIG_FILE] = os.path.abspath(config_path)  # what Streaming() in the target reads
        app: Any = _import_target(args.target)
        streaming = _find_streaming(app)
        if streaming is not None and file_raw is not None and args.config:
            _check_applied(args.config, args.target, file_raw, streaming)
        if isinstance(app, Streaming):
            app = None  # built below, once its HTTP address is set
    else:
        raw = read_yaml(config_path) if config_path else {}
        streaming = Streaming(merge(raw, {"server": overrides}) if overrides else raw)
        app = None
    settings = streaming.config.server if streaming else None
    host = args.host or (settings.host if settings else "127.0.0.1")
    port = args.port if args.port is not None else (settings.port if settings else 8080)
    if app is None and streaming is not None:
        streaming.http_address = (host, port)  # before the app is built: WebTransport's port and Alt-Svc
        app = streaming.asgi_app()
    level = args.log_level or (streaming.config.logging.level if streaming else "info")
    setup_logging(level, args.log_format or (streaming.config.logging.format if streaming else "text"))
    shared = streaming is not None and streaming.config.pubsub.backend != "memory"
    count = resolve_workers(args.workers or (settings.workers if settings else 1), shared=shared, port=port)
    slot = worker_slot()
    if count > 1 and slot is None:
        return _supervise(args, streaming, count, host, port)
    server = build_server(app, streaming, host=host, port=port, log_level=level)
    collect_less(settings.gc_thresholds if settings else ServerSettings().gc_thresholds)
    where = f"worker {slot[0]} of {slot[1]} " if slot else ""
    print(f"forge-streaming {__version__} {where}serving on http://{host}:{port}", file=sys.stderr, flush=True)
    try:  # uvicorn's own loop choice: uvloop when installed
        server.run(sockets=[_shared_socket(host, port)] if slot else None)
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    return 0


def collect_less(thresholds: tuple[int, int, int]) -> None:
    """The garbage collector's policy of a server process (``server.gc_thresholds``).

    What was loaded by now (modules, the app) stays for the process's life: frozen, so that no
    collection walks it again. The thresholds make collections rarer: the objects of a connection are
    long-lived, and those of a message are freed by reference counting, not by the collector.
    """
    gc.freeze()
    gc.set_threshold(*thresholds)


def _supervise(args: argparse.Namespace, streaming: Streaming | None, count: int, host: str, port: int) -> int:
    """Run ``count`` workers of this very command (workers.py), sharing the port; refuse the memory backend."""
    if streaming is not None and streaming.config.pubsub.backend == "memory":
        raise ConfigError(
            f"server.workers: {count} workers need a shared pub/sub backend, and pubsub.backend is 'memory': "
            "each worker would have rooms of its own, and two clients of one room could land on different "
            "workers and never see each other. Set pubsub.backend (mqtt, nats) or run one worker (--workers 1)")
    if port == 0:
        raise ConfigError("server.port: 0 (any free port) cannot be shared by workers; give a port number")
    node_id = streaming.config.server.node_id if streaming is not None else None
    print(f"forge-streaming {__version__} serving on http://{host}:{port} with {count} workers",
          file=sys.stderr, flush=True)
    return Supervisor(worker_command(sys.argv[1:]), count, node_id=node_id,
                      stop_timeout=(streaming.config.server.drain_timeout if streaming else 5.0) + 10).run()


def _shared_socket(host: str, port: int) -> socket.socket:
    """The HTTP listening socket of a worker: ``SO_REUSEPORT``, so that every worker binds the same port."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _leaves(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out += _leaves(value, dotted + ".")
        else:
            out.append(dotted)
    return out


def _at(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _check_applied(path: str, target: str, raw: dict[str, Any], streaming: Streaming) -> None:
    """Refuse ``--config`` when the target's Streaming was built with a config of its own instead."""
    sections = {key: type(value) for key, value in streaming.config.sections.items()}
    expected = build_config(raw, sections=sections).effective()
    actual = streaming.config.effective()
    unwrapped, _ = unwrap_forge(raw)
    differ = [key for key in _leaves(unwrapped) if _at(expected, key) != _at(actual, key)]
    if differ:
        raise StreamingError(
            f"--config {path} is not applied: {target} builds its Streaming with a config of its own, so "
            f"{', '.join(differ)} keep other values. Build it with Streaming() (it reads $FORGE_STREAMING_CONFIG, "
            f"which serve sets to this file) or Streaming({path!r}).")


def cmd_plugins(args: argparse.Namespace) -> int:
    raw = read_yaml(args.config) if args.config else {}
    settings = raw.get("plugins") or {}
    manager = make_plugin_manager(allow=settings.get("allow"), deny=settings.get("deny") or ())
    infos = manager.info()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
        return 0
    for info in infos:
        print(f"{info.name}  ({info.distribution or '?'} {info.version or ''})".rstrip())
        for hook in info.hooks:
            print(f"    {hook}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    streaming = Streaming(args.file)
    print(f"{args.file}: valid", file=sys.stderr)
    print(json.dumps(streaming.config.effective(), indent=2, sort_keys=True))
    return 0


def _api(url: str, path: str, key: str | None, body: Any = None) -> Any:
    import urllib.error  # the client commands only: not on serve's start
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise StreamingError(f"{url}{path} answered {exc.code}: {exc.read().decode(errors='replace')}") from None
    except urllib.error.URLError as exc:
        raise StreamingError(f"cannot reach {url}: {exc.reason}") from None


def cmd_publish(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError:
        data = args.data
    result = _api(args.url, "/api/publish", args.api_key, {"room_id": args.room, "data": data})
    print(json.dumps(result))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    result = _api(args.url, "/api/stats", args.api_key)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    conns = result["connections"]
    print(f"node         {result['node']} ({result['state']})")
    by = ", ".join(f"{k} {v}" for k, v in sorted(conns["by_transport"].items())) or "none"
    print(f"connections  {conns['total']} ({by})")
    print(f"rooms        {result['rooms']['total']}")
    backend = result["backend"]
    print(f"backend      {backend['name']}: {backend['state']} {backend['detail']}".rstrip())
    for key, value in result["counters"].items():
        print(f"  {key:<36} {value}")
    return 0


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a number of workers (1 or more) or auto, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forge-streaming", description="Real-time rooms over WebSocket, SSE and WebTransport.")
    parser.add_argument("--version", action="version", version=f"forge-streaming {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (the room protocol on every installed transport)")
    serve.add_argument("target", nargs="?", help="module:attr of your Streaming object or ASGI app")
    serve.add_argument("--host", help="interface to bind (default: server.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: server.port, 8080)")
    serve.add_argument("--config", "-c", help="YAML config file (default: $FORGE_STREAMING_CONFIG)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--workers", type=_workers_arg,
                       help="processes on this node: a number, or auto (one per usable core with a shared backend "
                            "(MQTT, NATS) and a port number; one with the memory backend); default server.workers, "
                            "auto")
    serve.set_defaults(func=cmd_serve)

    plugins = sub.add_parser("plugins", help="list installed plugins and the hooks they implement")
    plugins.add_argument("--json", action="store_true")
    plugins.add_argument("--config", "-c")
    plugins.set_defaults(func=cmd_plugins)

    check = sub.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    default_url = os.environ.get("FORGE_STREAMING_URL", "http://127.0.0.1:8080")
    default_key = os.environ.get("FORGE_STREAMING_API_KEY")
    publish = sub.add_parser("publish", help="publish a message to a room through the HTTP API")
    publish.add_argument("room")
    publish.add_argument("data", help="JSON, or a plain string")
    publish.add_argument("--url", default=default_url)
    publish.add_argument("--api-key", default=default_key, help="default: $FORGE_STREAMING_API_KEY")
    publish.set_defaults(func=cmd_publish)

    stats = sub.add_parser("stats", help="a readable summary of a running node")
    stats.add_argument("--url", default=default_url)
    stats.add_argument("--api-key", default=default_key)
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StreamingError as exc:
        print(f"forge-streaming: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
