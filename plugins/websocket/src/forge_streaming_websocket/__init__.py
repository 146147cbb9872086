"""WebSocket transport for forge-streaming (``pip install forge-streaming-websocket``)."""

from .connection import DirectConnection, QueuedConnection, WebSocketConnection
from .protocol import EXTENSION, ForgeWebSocketProtocol
from .settings import WebSocketSettings
from .transport import WebSocketTransport

__all__ = [
    "EXTENSION", "DirectConnection", "ForgeWebSocketProtocol", "QueuedConnection", "WebSocketConnection",
    "WebSocketSettings", "WebSocketTransport",
]
