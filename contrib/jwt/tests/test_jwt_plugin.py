"""The JWT plugin: tokens from header, query or cookie; room claims; expiry on a live connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from forge_streaming import Refused, Streaming
from forge_streaming.testing import open_connection

SECRET = "test-secret-that-is-long-enough-for-hs256"


def token(**claims: Any) -> str:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", int(time.time()) + 3600)
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def streaming() -> AsyncIterator[Streaming]:
    service = Streaming({"jwt": {"secret": SECRET}})
    async with service.running():
        yield service


@pytest.mark.parametrize("where", ["header", "query", "cookie"])
async def test_token_from_header_query_or_cookie_names_the_user(streaming: Streaming, where: str) -> None:
    value = token(sub="bob")
    ways: dict[str, dict[str, Any]] = {"header": {"headers": {"authorization": f"Bearer {value}"}},
                                       "query": {"query": f"token={value}"},
                                       "cookie": {"headers": {"cookie": f"token={value}"}}}
    kwargs = ways[where]
    conn = await open_connection(streaming, **kwargs)
    assert conn.user_id == "bob"


@pytest.mark.parametrize("value,code", [(None, "unauthenticated"), ("garbage", "invalid_token"),
                                        ("expired", "token_expired"), ("wrong-key", "invalid_token")])
async def test_missing_invalid_or_expired_tokens_are_refused_with_401(streaming: Streaming, value: str | None,
                                                                        code: str) -> None:
    if value == "expired":
        value = token(exp=int(time.time()) - 10)
    elif value == "wrong-key":
        value = jwt.encode({"sub": "eve"}, "another-secret-that-is-long-enough!!", algorithm="HS256")
    headers = {"authorization": f"Bearer {value}"} if value else {}
    with pytest.raises(Refused) as info:
        await open_connection(streaming, headers=headers)
    assert (info.value.status, info.value.code) == (401, code)


async def test_rooms_claim_limits_joins_and_send_claim_limits_sending(streaming: Streaming) -> None:
    conn = await open_connection(streaming, query=f"token={token(rooms=['team-*', 'lobby'], send=['team-*'])}")
    await conn.join_room("team-red")
    await conn.join_room("lobby")
    await streaming.room_protocol_frame(conn, '{"type":"join","room_id":"admin"}')
    assert conn.frames("error")[-1]["data"]["code"] == "forbidden_room"
    await streaming.room_protocol_frame(conn, '{"type":"message","room_id":"lobby","data":"hi"}')
    assert conn.frames("error")[-1]["data"]["code"] == "forbidden_send"
    await streaming.room_protocol_frame(conn, '{"type":"message","room_id":"team-red","data":"hi"}')
    assert len(conn.frames("error")) == 2
    assert conn.rooms == {"team-red", "lobby"}


async def test_expiry_closes_a_live_connection(streaming: Streaming) -> None:
    conn = await open_connection(streaming, query=f"token={token(exp=int(time.time()) + 1)}")
    await conn.join_room("lobby")
    for _ in range(40):
        if conn.id not in streaming.connections:
            break
        await asyncio.sleep(0.1)
    assert conn.id not in streaming.connections
    assert conn.close_reason == "token expired"
    assert conn.frames("system")[-1]["event"] == "token.expired"


async def test_inert_without_config() -> None:
    service = Streaming({})
    async with service.running():
        conn = await open_connection(service)
        assert conn.identity is None


def test_unreadable_public_key_is_refused_at_start(tmp_path: Path) -> None:
    from forge_streaming import ConfigError

    with pytest.raises(ConfigError, match="jwt.public_key_file"):
        Streaming({"jwt": {"public_key_file": str(tmp_path / "nope.pem"), "algorithms": ["RS256"]}})
