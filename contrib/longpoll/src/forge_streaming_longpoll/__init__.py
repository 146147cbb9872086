"""HTTP long-polling transport for forge-streaming (``pip install forge-streaming-longpoll``)."""

from .transport import LongPollConnection, LongPollSettings, LongPollTransport

__all__ = ["LongPollConnection", "LongPollSettings", "LongPollTransport"]
