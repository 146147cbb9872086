"""Exceptions a plugin or an application may raise or catch.

Each carries what a user needs to act: the key, the value, what was
expected, or the close code a client will see.
"""

from __future__ import annotations


class StreamingError(Exception):
    """Base class of every error raised by forge-streaming."""


class ConfigError(StreamingError):
    """A configuration file, key or value was refused at start."""


class PluginLoadError(StreamingError):
    """A plugin could not be imported, registered or validated.

    The message always names the plugin (entry point name and distribution),
    so that the server never starts half-loaded without saying why.
    """


class HookFailed(StreamingError):
    """A plugin's hook implementation raised; ``plugin`` and ``hook`` say whose and which.

    The kernel logs it with the plugin's name and closes only the connection
    the hook was serving (1011), or refuses the connection being opened.
    """

    def __init__(self, plugin: str, hook: str, error: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(error).__name__}: {error}")
        self.plugin = plugin
        self.hook = hook
        self.error = error


class Refused(StreamingError):
    """A hook refused a connection or a room join.

    ``status`` is the HTTP status a transport answers before the connection
    opens (401, 403, 429); ``close_code`` is the WebSocket close code used
    when the connection is already open (1008 policy violation by default).
    ``code`` is the machine-readable reason sent in error frames.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int = 403,
        close_code: int = 1008,
        code: str = "forbidden",
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.close_code = close_code
        self.code = code


class ConnectionClosed(StreamingError):
    """Reading from or writing to a connection that has ended.

    ``code`` and ``reason`` say how it ended, with WebSocket close codes
    for every transport (1000 normal, 1001 going away, 1006 lost, ...).
    """

    def __init__(self, code: int = 1000, reason: str = "") -> None:
        super().__init__(f"connection closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class UnknownTransport(StreamingError):
    """A handler was registered for a transport no installed plugin provides."""
