"""forge-streaming: real-time rooms over WebSocket, SSE and WebTransport.

The contract, in one place. Everything a plugin or an application may use
is named in ``__all__`` here: the hook markers, the transport port and the
connection base, the pub/sub backend and room store contracts with their
envelope and listener, config sections, errors, and the service (of whose
attributes plugins use only those in :data:`PLUGIN_API`). The test kit is
``forge_streaming.testing``. Every other module of the kernel is private,
and a test fails when code under ``plugins/`` or ``contrib/`` imports one.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from .config import Check, ConfigSection, Duration, Meta, Parse, Size, StreamingConfig, load_config
from .connection import CloseCode, Connection, ConnectionRequest, ConnectionState, Identity
from .delivery import BufferedWriter, Flushable, FlushScheduler
from .errors import (
    ConfigError,
    ConnectionClosed,
    HookFailed,
    PluginLoadError,
    Refused,
    StreamingError,
    UnknownTransport,
)
from .events import Event
from .fanout import PublishMessage
from .frames import ClientFrame, InvalidInput, Message, OutboundFrame, ProtocolError
from .history import RoomHistory
from .hookspecs import AWAITABLE_HOOKS, hookimpl, hookspec
from .origins import origin_allowed
from .pubsub import (
    BackendHealth,
    BackendListener,
    BackendState,
    Envelope,
    EnvelopeKind,
    PubSubBackend,
    RoomPositions,
)
from .rooms import LocalMembers, Member, RoomStore, RoomStoreListener
from .service import PLUGIN_API, ServiceState, Streaming
from .transports import Handler, Transport


def new_extension(config: Any = None, **kwargs: Any) -> Streaming:
    """Build a Streaming service from a config (Forge's ``NewExtension``)."""
    return Streaming(config, **kwargs)


def get_streaming(app_or_request: Any) -> Streaming:
    """The Streaming service attached to a Starlette app or request (Forge's ``GetStreaming``)."""
    streaming = getattr(getattr(app_or_request, "state", None), "streaming", None)  # request (lifespan state)
    if not isinstance(streaming, Streaming):
        app = getattr(app_or_request, "app", app_or_request)
        streaming = getattr(getattr(app, "state", None), "streaming", None)
    if not isinstance(streaming, Streaming):
        raise LookupError("no Streaming service on this app; mount streaming.asgi_app() or set app.state.streaming")
    return streaming


__all__ = [
    "AWAITABLE_HOOKS", "PLUGIN_API", "hookspec",
    "BackendHealth", "BackendListener", "BackendState", "BufferedWriter", "Check", "ClientFrame", "CloseCode",
    "ConfigError", "ConfigSection", "Connection", "ConnectionClosed", "ConnectionRequest", "ConnectionState",
    "Duration", "Envelope", "EnvelopeKind", "Event", "Flushable", "FlushScheduler", "Handler", "HookFailed", "Identity",
    "InvalidInput", "LocalMembers", "Member", "Message", "Meta",
    "OutboundFrame", "Parse", "PluginLoadError", "ProtocolError", "PubSubBackend", "PublishMessage", "Refused",
    "RoomHistory", "RoomPositions", "RoomStore", "RoomStoreListener", "ServiceState", "Size", "Streaming",
    "StreamingConfig",
    "StreamingError", "Transport",
    "UnknownTransport", "__version__", "get_streaming", "hookimpl", "load_config", "new_extension",
    "origin_allowed",
]
