"""The built-in HTTP API, loaded like any other plugin (entry point name ``http-api``).

``/healthz`` (backend state), ``POST /api/publish`` (``{"room_id", "data"}``, or
``"data_base64"`` for a binary message), ``GET /api/stats`` and
``GET /api/rooms`` (all three need ``Authorization: Bearer <api.key>``),
``/forge-streaming.js`` (the browser client) and the status page at ``/``
when no plugin serves ``/``. Registered by the kernel before the installed
plugins, as pytest registers its own builtins, so it uses the same hook as
theirs; ``plugins.deny: [http-api]`` turns it off.

Under ``forge-streaming serve --workers N`` a request reaches one worker;
``/healthz`` and ``/api/stats`` then answer for all of them (workers.py):
healthy only when every worker is, and ``"workers"`` lists each one.
"""

from __future__ import annotations

import hmac
import html
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__, frames
from .hookspecs import hookimpl
from .workers import WorkerBoard

if TYPE_CHECKING:
    from .service import Streaming

NAME = "http-api"
POSITION_WAIT = 3.0
"""Seconds ``POST /api/publish`` waits for the message's position before it answers 202 without one."""

_boards: weakref.WeakKeyDictionary[Streaming, WorkerBoard] = weakref.WeakKeyDictionary()
"""The status board of each service that runs as a worker of ``serve --workers N``."""


@hookimpl
def streaming_startup(streaming: Streaming) -> None:
    board = WorkerBoard.from_env()
    if board is not None:
        _boards[streaming] = board
        board.start(streaming)


@hookimpl
async def streaming_shutdown(streaming: Streaming) -> None:
    board = _boards.pop(streaming, None)
    if board is not None:
        await board.stop()


def _authorized(streaming: Streaming, request: Request) -> bool:
    key = streaming.config.api.key
    if not key:
        return False
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _unauthorized(streaming: Streaming) -> JSONResponse:
    if not streaming.config.api.key:
        return JSONResponse({"error": "api_disabled", "message": "set api.key in the config to use the HTTP API"},
                            status_code=403)
    return JSONResponse({"error": "unauthorized", "message": "send Authorization: Bearer <api.key>"},
                        status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is known to pass ``limit`` bytes (declared or counted)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        return None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except ClientDisconnect:  # the client left mid-body: nobody to answer, nothing to log as an error
        raise HTTPException(400, "client disconnected") from None
    return b"".join(chunks)


async def stats(streaming: Streaming) -> dict[str, Any]:
    """A readable summary of the node: connections, rooms, counters, backend."""
    by_transport: dict[str, int] = {}
    for conn in streaming.connections.values():
        by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
    rooms = await streaming.rooms()
    health = streaming.health()
    return {
        "node": streaming.node_id,
        "state": streaming.state.value,
        "connections": {"total": len(streaming.connections), "by_transport": by_transport},
        "rooms": {"total": len(rooms), "local": streaming.local_rooms()},
        "backend": {"name": streaming.backend.name, "state": health.state.value, "detail": health.detail},
        "history": streaming._history.usage(),  # noqa: SLF001 (the kernel's own accounting)
        "counters": streaming.stats_counters(),
        "transports": {name: t.describe() for name, t in streaming.transports.items()},
        **({"workers": board.read()} if (board := _boards.get(streaming)) is not None else {}),
    }


@hookimpl(tryfirst=True)
def streaming_register_routes(streaming: Streaming) -> list[BaseRoute]:
    """The API's routes come before every other plugin's, so they win a clash."""
    async def healthz(request: Request) -> Response:
        health = streaming.health()
        ok = health.ok and streaming.state.value == "running"
        body: dict[str, Any] = {
            "status": "ok" if ok else "degraded", "state": streaming.state.value,
            "backend": {"name": streaming.backend.name, "state": health.state.value, "detail": health.detail}}
        board = _boards.get(streaming)
        if board is not None:  # one of several workers: the node is healthy when every worker is
            workers = board.read()
            body["workers"] = [{k: w.get(k) for k in ("worker", "pid", "node", "state", "ok")} for w in workers]
            if not all(w.get("ok") for w in workers if w.get("worker") != board.index):
                ok = False
                body["status"] = "degraded"
        return JSONResponse(body, status_code=200 if ok else 503)

    async def api_publish(request: Request) -> Response:
        if not _authorized(streaming, request):
            return _unauthorized(streaming)
        limits = streaming.config.limits
        raw = await _read_body(request, limits.max_message_size)
        if raw is None:
            return _error(413, "too_large", f"body is over limits.max_message_size ({limits.max_message_size} bytes)")
        try:
            body = frames.loads(raw.decode("utf-8"), max_depth=limits.max_json_depth)
        except UnicodeDecodeError:
            return _error(400, "invalid_json", "body must be UTF-8 JSON text")
        except frames.InvalidInput as exc:
            return _error(400, exc.code, exc.message)
        if not isinstance(body, dict):
            return _error(400, "invalid_frame", "body must be a JSON object with 'room_id' and 'data'")
        if ("data" in body) == ("data_base64" in body):
            return _error(400, "invalid_frame", "body needs 'data' (JSON) or 'data_base64' (bytes), one of them")
        user_id = body.get("user_id") if isinstance(body.get("user_id"), str) else "api"
        try:
            room = frames.validate_room_id(body.get("room_id"))
            data = body["data"] if "data" in body else frames.decode_base64(body["data_base64"])
            sequence = await streaming.publish(room, data, user_id=user_id, timeout=POSITION_WAIT)
        except frames.InvalidInput as exc:
            return _error(400, exc.code, f"'room_id': {exc.message}" if "room" in exc.code else exc.message)
        except TimeoutError:  # published, but not numbered yet: a broker outage or a sequencer moving
            return JSONResponse({"published": True, "room_id": room, "sequence": None,
                                 "detail": f"accepted; the pub/sub backend gave it no position within "
                                           f"{POSITION_WAIT:g} s (it is delivered once the backend can)"},
                                status_code=202)
        if sequence is None:
            return JSONResponse({"published": False, "reason": "dropped by a hook"}, status_code=202)
        return JSONResponse({"published": True, "room_id": room, "sequence": sequence})

    async def api_stats(request: Request) -> Response:
        if not _authorized(streaming, request):
            return _unauthorized(streaming)
        return JSONResponse(await stats(streaming))

    async def api_rooms(request: Request) -> Response:
        if not _authorized(streaming, request):
            return _unauthorized(streaming)
        rooms = await streaming.rooms()
        return JSONResponse({"rooms": [{"room_id": r, "users": await streaming.presence(r)} for r in rooms]})

    async def client_script(request: Request) -> Response:
        """The browser client (static/forge-streaming.js), same origin as the endpoints it talks to."""
        script = (Path(__file__).parent / "static" / "forge-streaming.js").read_bytes()
        return Response(script, media_type="text/javascript; charset=utf-8", headers={"Cache-Control": "no-cache"})

    return [
        Route("/forge-streaming.js", client_script),
        Route("/healthz", healthz),
        Route("/api/publish", api_publish, methods=["POST"]),
        Route("/api/stats", api_stats),
        Route("/api/rooms", api_rooms),
    ]


STATUS_PAGE_POLICY = "default-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
"""The status page is plain HTML: no script, style, image or connection of its own."""


def status_page(streaming: Streaming) -> Route:
    """The page at ``/`` when no plugin serves one: node, counts, endpoints."""

    async def page(request: Request) -> Response:
        info = await stats(streaming)
        endpoints = "".join(
            f"<li><b>{html.escape(name)}</b> at <code>{html.escape(t.default_path)}</code></li>"
            for name, t in sorted(streaming.transports.items())
        )
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>forge-streaming</title>"
            f"<h1>forge-streaming {__version__}</h1><p>node <code>{html.escape(info['node'])}</code>, "
            f"{info['connections']['total']} connections, {info['rooms']['total']} rooms, backend "
            f"{html.escape(info['backend']['name'])} ({html.escape(info['backend']['state'])})</p>"
            f"<ul>{endpoints}</ul>",
            headers={"Content-Security-Policy": STATUS_PAGE_POLICY},
        )

    return Route("/", page)
