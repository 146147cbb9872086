"""forge-streaming: real-time rooms over WebSocket, SSE and WebTransport.

The public API of the kernel. Plugins import from here (and from
``forge_streaming.hookspecs`` for ``hookimpl``), nothing deeper.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .config import ConfigSection, Duration, Size, StreamingConfig, load_config
from .connection import CloseCode, Connection, ConnectionRequest, ConnectionState, Identity
from .delivery import BufferedWriter, FlushScheduler
from .errors import (
    ConfigError,
    ConnectionClosed,
    HookFailed,
    PluginLoadError,
    Refused,
    StreamingError,
    UnknownTransport,
)
from .frames import ClientFrame, Message, OutboundFrame, ProtocolError
from .history import RoomHistory
from .hookspecs import hookimpl
from .pubsub import BackendHealth, BackendListener, BackendState, Envelope, EnvelopeKind, PubSubBackend
from .rooms import Member, RoomStore
from .service import PublishMessage, ServiceState, Streaming
from .transports import Handler, Transport


def new_extension(config: Any = None, **kwargs: Any) -> Streaming:
    """Build a Streaming service from a config (the seed's ``NewExtension``)."""
    return Streaming(config, **kwargs)


def get_streaming(app_or_request: Any) -> Streaming:
    """The Streaming service attached to a Starlette app or request (the seed's ``GetStreaming``)."""
    streaming = getattr(getattr(app_or_request, "state", None), "streaming", None)  # request (lifespan state)
    if not isinstance(streaming, Streaming):
        app = getattr(app_or_request, "app", app_or_request)
        streaming = getattr(getattr(app, "state", None), "streaming", None)
    if not isinstance(streaming, Streaming):
        raise LookupError("no Streaming service on this app; mount streaming.asgi_app() or set app.state.streaming")
    return streaming


__all__ = [
    "BackendHealth", "BackendListener", "BackendState", "BufferedWriter", "ClientFrame", "CloseCode",
    "ConfigError", "ConfigSection", "Connection", "ConnectionClosed", "ConnectionRequest", "ConnectionState",
    "Duration", "Envelope", "EnvelopeKind", "FlushScheduler", "Handler", "HookFailed", "Identity", "Member", "Message",
    "OutboundFrame", "PluginLoadError", "ProtocolError", "PubSubBackend", "PublishMessage", "Refused",
    "RoomHistory", "RoomStore", "ServiceState", "Size", "Streaming", "StreamingConfig", "StreamingError", "Transport",
    "UnknownTransport", "__version__", "get_streaming", "hookimpl", "load_config", "new_extension",
]
