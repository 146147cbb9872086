"""The hook implementations: the entry point ``prometheus`` names this module.

Inert unless the service's config says ``prometheus: {enabled: true}``:
installing the package adds no ``/metrics`` to anyone's app and counts
nothing. Enabled, every hook hands its event to the :class:`StreamingMetrics`
of the service it came from (``connection.streaming`` or the ``streaming``
argument), so a process with several services keeps one registry per service.

:mod:`.metrics` (and prometheus-client with it, about 9 ms) is imported by
the first service that enables the plugin, not when the plugin loads.
"""

from __future__ import annotations

import hmac
import logging
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

from forge_streaming import ClientFrame, ConfigSection, Connection, Envelope, Meta, Streaming, hookimpl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from .metrics import StreamingMetrics

log = logging.getLogger("forge_streaming.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusSettings(ConfigSection):
    """The ``prometheus`` config section."""

    enabled: bool = False
    """Serve ``/metrics`` and count; off (the default), the plugin does nothing."""
    path: str = "/metrics"
    """Where the metrics are served."""
    token: Annotated[str, Meta(min_length=1)] | None = None
    """Ask for ``Authorization: Bearer <token>`` (Prometheus: ``authorization`` in the job)."""
    require_api_key: bool = False
    """Ask for ``Authorization: Bearer <api.key>`` like ``/api/stats`` (with ``token`` too: either works)."""


@hookimpl
def streaming_config_sections() -> dict[str, type[ConfigSection]]:
    return {"prometheus": PrometheusSettings}


_active: weakref.WeakKeyDictionary[Streaming, StreamingMetrics | None] = weakref.WeakKeyDictionary()


def _metrics(streaming: Streaming) -> StreamingMetrics | None:
    """The metrics of ``streaming`` when its config enables the plugin, else None (decided once per service)."""
    try:
        return _active[streaming]
    except KeyError:
        metrics: StreamingMetrics | None = None
        if streaming.config.section("prometheus", PrometheusSettings).enabled:
            from .metrics import metrics_for

            metrics = metrics_for(streaming)
        _active[streaming] = metrics
        return metrics


@hookimpl
def streaming_register_routes(streaming: Streaming) -> Sequence[BaseRoute]:
    settings = streaming.config.section("prometheus", PrometheusSettings)
    metrics = _metrics(streaming)
    if metrics is None:
        return []
    credentials = _credentials(streaming, settings)

    async def scrape(request: Request) -> Response:
        if credentials is not None and not _authorized(credentials, request):
            return JSONResponse({"error": "unauthorized", "message": "send Authorization: Bearer <token>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    if credentials is None:
        log.info("serving Prometheus metrics at %s without authentication (set prometheus.token)", settings.path)
    else:
        log.debug("serving Prometheus metrics at %s", settings.path)
    return [Route(settings.path, scrape, methods=["GET"])]


def _credentials(streaming: Streaming, settings: PrometheusSettings) -> list[bytes] | None:
    """The bearer tokens a scrape may show, or None when ``/metrics`` is open."""
    if settings.token is None and not settings.require_api_key:
        return None
    accepted = [settings.token.encode()] if settings.token else []
    key = streaming.config.api.key
    if settings.require_api_key and key:
        accepted.append(str(key).encode())
    return accepted  # require_api_key without an api.key: nothing is accepted


def _authorized(credentials: list[bytes], request: Request) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    shown = token.strip().encode()
    # compare with every credential, not stopping at the first match
    matches = [hmac.compare_digest(shown, accepted) for accepted in credentials]
    return scheme.lower() == "bearer" and any(matches)


@hookimpl
def streaming_connected(connection: Connection) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.connected(connection)


@hookimpl
def streaming_disconnected(connection: Connection, code: int, reason: str) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.disconnected(connection, code)


@hookimpl
def streaming_room_joined(connection: Connection, room: str) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.joined(connection, room)


@hookimpl
def streaming_room_left(connection: Connection, room: str) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.left(connection, room)


@hookimpl
def streaming_message_received(connection: Connection, frame: ClientFrame) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.messages_in.labels(connection.transport, frame.type).inc()


@hookimpl
def streaming_delivered(envelope: Envelope, recipients: int, streaming: Streaming) -> None:
    if (metrics := _metrics(streaming)) is not None:
        metrics.delivered(envelope, recipients)


@hookimpl
def streaming_published(streaming: Streaming, envelope: Envelope, seconds: float) -> None:
    if (metrics := _metrics(streaming)) is not None:
        metrics.publish_seconds.labels(streaming.backend.name).observe(seconds)


@hookimpl
def streaming_connection_dropped(connection: Connection, reason: str) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.drops.labels(reason).inc()


@hookimpl
def streaming_frame_rejected(connection: Connection, code: str, message: str) -> None:
    if (metrics := _metrics(connection.streaming)) is not None:
        metrics.errors.labels(code).inc()
