"""Server-Sent Events for forge-streaming.

``@streaming.handle_sse("/path")`` serves a handler that gets an
:class:`SSEConnection` (``await stream.send_event(Event(...))`` until
``stream.done``); ``/sse`` is the built-in room endpoint. See README.md.
"""

from forge_streaming import Event  # the kernel's class, beside Streaming; importable from here as before

from .connection import SSEConnection
from .protocol import EXTENSION, SSEHttpToolsProtocol
from .settings import SSESettings
from .transport import SSETransport

SSEStream = SSEConnection

__all__ = ["EXTENSION", "Event", "SSEConnection", "SSEHttpToolsProtocol", "SSESettings", "SSEStream", "SSETransport"]
