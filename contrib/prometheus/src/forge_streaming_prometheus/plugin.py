"""The hook implementations: the entry point ``prometheus`` names this module.

Every hook hands its event to the :class:`StreamingMetrics` of the service
it came from (``connection.streaming`` or the ``streaming`` argument), so a
process with several services keeps one registry per service.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from forge_streaming import ClientFrame, ConfigSection, Connection, Envelope, Streaming, hookimpl
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from .metrics import metrics_for

log = logging.getLogger("forge_streaming.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class PrometheusSettings(ConfigSection):
    """The ``prometheus`` config section."""

    path: str = "/metrics"
    """Where the metrics are served."""
    require_api_key: bool = False
    """Ask for ``Authorization: Bearer <api.key>`` like ``/api/stats`` (Prometheus: ``authorization`` in the job)."""


@hookimpl
def streaming_config_sections() -> dict[str, type[ConfigSection]]:
    return {"prometheus": PrometheusSettings}


@hookimpl
def streaming_register_routes(streaming: Streaming) -> Sequence[BaseRoute]:
    settings = streaming.config.section("prometheus", PrometheusSettings)
    metrics = metrics_for(streaming)

    async def scrape(request: Request) -> Response:
        if settings.require_api_key and not _authorized(streaming, request):
            return JSONResponse({"error": "unauthorized", "message": "send Authorization: Bearer <api.key>"},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    log.debug("serving Prometheus metrics at %s", settings.path)
    return [Route(settings.path, scrape, methods=["GET"])]


def _authorized(streaming: Streaming, request: Request) -> bool:
    key = streaming.config.api.key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return bool(key) and scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), str(key).encode())


@hookimpl
def streaming_connected(connection: Connection) -> None:
    metrics_for(connection.streaming).connected(connection)


@hookimpl
def streaming_disconnected(connection: Connection, code: int, reason: str) -> None:
    metrics_for(connection.streaming).disconnected(connection, code)


@hookimpl
def streaming_room_joined(connection: Connection, room: str) -> None:
    metrics_for(connection.streaming).joined(connection, room)


@hookimpl
def streaming_room_left(connection: Connection, room: str) -> None:
    metrics_for(connection.streaming).left(connection, room)


@hookimpl
def streaming_message_received(connection: Connection, frame: ClientFrame) -> None:
    metrics_for(connection.streaming).messages_in.labels(connection.transport, frame.type).inc()


@hookimpl
def streaming_delivered(envelope: Envelope, recipients: int, streaming: Streaming) -> None:
    metrics_for(streaming).delivered(envelope, recipients)


@hookimpl
def streaming_published(streaming: Streaming, envelope: Envelope, seconds: float) -> None:
    metrics_for(streaming).publish_seconds.labels(streaming.backend.name).observe(seconds)


@hookimpl
def streaming_connection_dropped(connection: Connection, reason: str) -> None:
    metrics_for(connection.streaming).drops.labels(reason).inc()


@hookimpl
def streaming_frame_rejected(connection: Connection, code: str, message: str) -> None:
    metrics_for(connection.streaming).errors.labels(code).inc()
