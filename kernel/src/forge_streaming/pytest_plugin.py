"""The project's pytest plugin: the fixtures every plugin's tests share.

Loaded by pytest through the ``pytest11`` entry point of forge-streaming,
so a third-party plugin's test suite gets them too, with nothing to copy:

- ``make_streaming(config=None, *, only=None, plugins=())``: a
  :class:`Streaming` service; ``only`` names the installed plugins
  (entry point names) it may load, so a test sees exactly the plugins it
  is about, whatever else is installed in the environment.
- ``streaming_plugins_only(*names)``: the same restriction for code that
  builds its own services (or starts ``forge-streaming serve``), through
  ``FORGE_STREAMING_PLUGINS_ALLOW``; undone after the test.
- ``eventually``: :func:`forge_streaming.testing.eventually`, the one
  wait-until helper.
- ``served``: :func:`forge_streaming.testing.serve`, a uvicorn server on a
  free loopback port for the test's service or app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pytest

from .plugins import ENV_ALLOW
from .service import Streaming
from .testing import eventually as _eventually
from .testing import serve as _serve


@pytest.fixture
def streaming_plugins_only(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``streaming_plugins_only("websocket", "memory-pubsub", "memory-rooms")`` for the rest of the test."""

    def only(*names: str) -> None:
        monkeypatch.setenv(ENV_ALLOW, ",".join(names))

    return only


@pytest.fixture
def make_streaming(streaming_plugins_only: Callable[..., None]) -> Callable[..., Streaming]:
    """Build services for a test: ``make_streaming({"limits": {...}}, only=["websocket", ...])``."""

    def make(config: Mapping[str, Any] | None = None, *, only: Iterable[str] | None = None,
             plugins: Iterable[object] = (), **kwargs: Any) -> Streaming:
        if only is not None:
            streaming_plugins_only(*only)
        return Streaming(dict(config or {}), plugins=plugins, **kwargs)

    return make


@pytest.fixture
def eventually() -> Callable[..., Any]:
    """``await eventually(lambda: cond, timeout=5, what="...")``."""
    return _eventually


@pytest.fixture
def served() -> Iterator[Callable[..., Any]]:
    """``async with served(streaming) as server:`` (``server.url``, ``server.ws_url``, ``server.port``)."""
    yield _serve
