"""The Origin rule on its own (the server-level refusal is in test_websocket_config.py)."""

from __future__ import annotations

import pytest
from forge_streaming_websocket.origins import origin_allowed


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "a.example:8080", [], True),
    ("http://a.example:8080", "a.example:8080", [], True),
    ("http://A.Example:8080", "a.example:8080", [], True),
    ("http://a.example", "a.example:80", [], True),
    ("https://a.example", "a.example:443", [], True),  # host:port decides, as in Forge (gorilla)
    ("http://[::1]:9000", "[::1]:9000", [], True),
    ("http://[::1]:9001", "[::1]:9000", [], False),
    ("http://b.example:8080", "a.example:8080", [], False),
    ("null", "a.example", [], False),
    ("https://app.example.com", "x", ["https://*.example.com"], True),
    ("https://example.com", "x", ["https://*.example.com"], False),
    ("http://127.0.0.1:5173", "x", ["http://127.0.0.1:*"], True),
    ("http://127.0.0.10:5173", "x", ["http://127.0.0.1:*"], False),
])
def test_origin_rule(origin: str | None, host: str, allowed: list[str], ok: bool) -> None:
    assert origin_allowed(origin, {"host": host}, allowed, scheme="http") is ok
