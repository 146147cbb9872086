"""A flood of identical loop errors (e.g. accept() failing with EMFILE) is logged once per interval."""

from __future__ import annotations

import asyncio
import logging

import pytest
from forge_streaming.loopguard import ThrottledExceptionHandler, install


async def test_repeated_loop_errors_are_throttled(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    handler = ThrottledExceptionHandler(interval=60)
    with caplog.at_level(logging.ERROR):
        for _ in range(1000):
            handler(loop, {"message": "socket.accept() out of system resource", "exception": OSError(24, "EMFILE")})
        handler(loop, {"message": "something else"})
    reports = [r for r in caplog.records if "out of system resource" in r.getMessage()]
    assert len(reports) == 1
    assert any(r.getMessage() == "something else" for r in caplog.records)


async def test_an_application_handler_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    mine = lambda loop, context: None  # noqa: E731
    loop.set_exception_handler(mine)
    try:
        install(loop)
        assert loop.get_exception_handler() is mine
    finally:
        loop.set_exception_handler(None)
