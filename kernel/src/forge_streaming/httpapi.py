"""The built-in HTTP API, loaded like any other plugin (entry point name ``http-api``).

``/healthz`` (backend state), ``POST /api/publish``, ``GET /api/stats`` and
``GET /api/rooms`` (all three need ``Authorization: Bearer <api.key>``),
``/forge-streaming.js`` (the browser client) and the status page at ``/``
when no plugin serves ``/``. Registered by the kernel before the installed
plugins, as pytest registers its own builtins, so it uses the same hook as
theirs; ``plugins.deny: [http-api]`` turns it off.
"""

from __future__ import annotations

import hmac
import html
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .service import Streaming

NAME = "http-api"


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
        "counters": streaming.stats_counters(),
        "transports": {name: t.describe() for name, t in streaming.transports.items()},
    }


@hookimpl(tryfirst=True)
def streaming_register_routes(streaming: Streaming) -> list[BaseRoute]:
    """The API's routes come before every other plugin's, so they win a clash."""
    async def healthz(request: Request) -> Response:
        health = streaming.health()
        ok = health.ok and streaming.state.value == "running"
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "state": streaming.state.value,
             "backend": {"name": streaming.backend.name, "state": health.state.value, "detail": health.detail}},
            status_code=200 if ok else 503,
        )

    async def api_publish(request: Request) -> Response:
        if not _authorized(streaming, request):
            return _unauthorized(streaming)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "invalid_json", "message": "body must be JSON"}, status_code=400)
        room = body.get("room_id") if isinstance(body, dict) else None
        if not isinstance(room, str) or not room:
            return JSONResponse({"error": "missing_room", "message": "body needs a non-empty string 'room_id'"},
                                status_code=400)
        if "data" not in body:
            return JSONResponse({"error": "invalid_frame", "message": "body needs 'data'"}, status_code=400)
        user_id = body.get("user_id") if isinstance(body.get("user_id"), str) else "api"
        sequence = await streaming.publish(room, body["data"], user_id=user_id)
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
            f"<ul>{endpoints}</ul>"
        )

    return Route("/", page)
