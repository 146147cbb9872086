"""The forge-streaming demo: a chat served at ``/`` when ``demo.enabled`` is true.

Installed, it does nothing: a service serves the demo only when its config
says ``demo: {enabled: true}`` (``make run`` passes ``contrib/demo/demo.yaml``,
or set ``FORGE_STREAMING__DEMO__ENABLED=true``), so installing the package
never adds a page, an unauthenticated endpoint or guest names to your own
app. A plugin built only on the public contract. Enabled, it adds, through
``streaming_register_routes``:

- ``/``: the chat page (rooms, who is here, typing, the transport in use, live
  connection count), a static page that uses only the public JS client at
  ``/forge-streaming.js``;
- ``/demo/<file>``: the page's script and style sheet;
- ``/demo/stats``: ``{"connections": N, "by_transport": {...}}`` without an API
  key, so the page can show the live count (``/api/stats`` needs one).

And, so that presence shows names rather than connection ids, it names
connections nobody else identified from a ``?guest=`` query parameter
(user id ``guest:<name>``). It runs after every other authenticate hook and
only when they had no opinion, so it never overrides real authentication;
``demo.guest_names: false`` turns it off (with the rest of the demo enabled).
"""

from __future__ import annotations

import html
import json
import re
from importlib import resources
from typing import TYPE_CHECKING, Annotated

from forge_streaming import ConfigSection, ConnectionRequest, Identity, Meta, Streaming, hookimpl
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = ["DemoSettings", "GUEST_PREFIX"]

GUEST_PREFIX = "guest:"
"""User ids this plugin hands out start with it, so they cannot pass for an authenticated user's id."""

_GUEST_NAME = re.compile(r"[^\w .-]+", re.UNICODE)
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class DemoSettings(ConfigSection):
    """Keys under ``demo:`` in the config file."""

    enabled: bool = False
    """Serve the demo at all: off (the default), the plugin adds no route and names no guest."""
    page: bool = True
    """Serve the chat page at ``/`` (off: the kernel's status page is back)."""
    guest_names: bool = True
    """Name otherwise anonymous connections from ``?guest=<name>``."""
    default_room: Annotated[str, Meta(min_length=1, max_length=128)] = "lobby"
    """The room a new visitor lands in."""


def _settings(streaming: Streaming) -> DemoSettings:
    return streaming.config.section("demo", DemoSettings)


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def guest_name(raw: str | None) -> str | None:
    """A display name made safe to show and short, or None when nothing usable is left."""
    if not raw:
        return None
    name = _GUEST_NAME.sub("", raw).strip()[:32]
    return name or None


def connection_counts(streaming: Streaming) -> dict[str, object]:
    """Open connections on this node, in total and per transport (from ``streaming.connections``)."""
    by_transport: dict[str, int] = {name: 0 for name in sorted(streaming.transports)}
    for conn in list(streaming.connections.values()):
        by_transport[conn.transport] = by_transport.get(conn.transport, 0) + 1
    return {"connections": sum(by_transport.values()), "by_transport": by_transport}


def _routes(streaming: Streaming, settings: DemoSettings) -> list[BaseRoute]:
    async def page(request: Request) -> Response:
        # The page learns which transports this server offers, so the client
        # does not probe (and log errors for) endpoints that are not there.
        config = {"transports": sorted(streaming.transports), "defaultRoom": settings.default_room,
                  "guestPrefix": GUEST_PREFIX if settings.guest_names else None}
        body = _static("index.html").decode("utf-8").replace(
            "{{config}}", html.escape(json.dumps(config), quote=False))
        return HTMLResponse(body, headers={"Cache-Control": "no-cache"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return JSONResponse({"error": "not_found"}, status_code=404)
        return Response(_static(name), media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})

    async def stats(request: Request) -> Response:
        return JSONResponse(connection_counts(streaming), headers={"Cache-Control": "no-store"})

    routes: list[BaseRoute] = [Route("/demo/stats", stats), Route("/demo/{name}", static)]
    if settings.page:
        routes.insert(0, Route("/", page))
    return routes


@hookimpl
def streaming_config_sections() -> Mapping[str, type[ConfigSection]]:
    return {"demo": DemoSettings}


@hookimpl
def streaming_register_routes(streaming: Streaming) -> Sequence[BaseRoute]:
    settings = _settings(streaming)
    return _routes(streaming, settings) if settings.enabled else []


@hookimpl(trylast=True)
def streaming_authenticate(request: ConnectionRequest, streaming: Streaming) -> Identity | None:
    """Name an anonymous connection ``guest:<name>`` from ``?guest=``; never refuses.

    The kernel keeps the first identity returned and this implementation
    runs last, so an auth plugin that identified the client wins.
    """
    settings = _settings(streaming)
    if not (settings.enabled and settings.guest_names):
        return None
    name = guest_name(request.query.get("guest"))
    if name is None:
        return None
    return Identity(user_id=GUEST_PREFIX + name, claims={"name": name, "guest": True})
