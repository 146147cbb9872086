"""The ``forge-streaming`` command: serve, plugins, check-config, publish, stats."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import uvicorn

from . import __version__
from .config import merge, read_yaml
from .errors import StreamingError
from .plugins import make_plugin_manager
from .service import Streaming

log = logging.getLogger("forge_streaming.cli")


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
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        connection_id = getattr(record, "connection_id", None)
        return f"{text} [conn={connection_id}]" if connection_id and connection_id not in text else text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


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
    if args.target:
        app: Any = _import_target(args.target)
        streaming = _find_streaming(app)
        if isinstance(app, Streaming):
            app = app.asgi_app()
    else:
        raw = read_yaml(args.config) if args.config else {}
        streaming = Streaming(merge(raw, {"server": overrides}) if overrides else raw)
        app = streaming.asgi_app()
    settings = streaming.config.server if streaming else None
    host = args.host or (settings.host if settings else "127.0.0.1")
    port = args.port if args.port is not None else (settings.port if settings else 8080)
    level = args.log_level or (streaming.config.logging.level if streaming else "info")
    setup_logging(level, args.log_format or (streaming.config.logging.format if streaming else "text"))
    options = streaming.server_options() if streaming else {}
    if streaming is not None:
        streaming.http_address = (host, port)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_config=None, log_level=level,
                            **options)
    server = DrainingServer(config, streaming)
    print(f"forge-streaming {__version__} serving on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.run()  # uvicorn's own loop choice: uvloop when installed
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has shut down cleanly
        pass
    return 0


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
