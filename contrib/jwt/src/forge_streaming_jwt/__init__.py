"""JWT authentication and room authorisation, built only on the public hooks.

Inert until configured: with no ``jwt`` section (or ``jwt.enabled: false``)
it lets everything through, so installing it changes nothing by itself.
With a secret or public key it reads a bearer token from the
``Authorization`` header, a query parameter or a cookie, refuses a missing
or invalid one, names the user from a claim, restricts joins and sends to
the rooms its claims list, and closes a live connection when its token
expires.

PyJWT (and cryptography, which it loads for its RSA and EC algorithms) is
imported when a service whose config enables the plugin is built, not when the
plugin loads: every ``Streaming()`` loads every installed plugin, and the
import costs about 25 ms.
"""

from __future__ import annotations

import asyncio
import fnmatch
import importlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from forge_streaming import (
    ClientFrame,
    CloseCode,
    ConfigError,
    ConfigSection,
    Connection,
    ConnectionRequest,
    Identity,
    Refused,
    Streaming,
    StreamingConfig,
    hookimpl,
)

log = logging.getLogger("forge_streaming.jwt")


class JwtSettings(ConfigSection):
    enabled: bool = True
    secret: str | None = None
    public_key_file: str | None = None
    algorithms: tuple[str, ...] = ("HS256",)
    audience: str | None = None
    issuer: str | None = None
    leeway: float = 0.0
    header: str = "authorization"
    query_param: str = "token"
    cookie: str = "token"
    user_claim: str = "sub"
    rooms_claim: str = "rooms"
    """Claim listing room patterns the token may join (fnmatch: ``team-*``); absent = any room."""
    send_claim: str = "send"
    """Claim listing room patterns the token may send to; absent = the rooms it may join."""


def _allowed(patterns: Any, room: str) -> bool:
    if patterns is None:
        return True
    if isinstance(patterns, str):
        patterns = [patterns]
    return any(fnmatch.fnmatchcase(room, str(p)) for p in patterns)


def _active(config: StreamingConfig) -> JwtSettings | None:
    settings = config.section("jwt", JwtSettings)
    if not settings.enabled or (settings.secret is None and settings.public_key_file is None):
        return None
    return settings


class JwtPlugin:
    """The hook implementations. Settings come from each service's own config,
    so one instance serves every Streaming service in a process."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task[None]] = set()  # held until done: the loop keeps only weak references

    @hookimpl
    def streaming_config_sections(self) -> Mapping[str, type[ConfigSection]]:
        return {"jwt": JwtSettings}

    @hookimpl
    def streaming_configure(self, config: StreamingConfig) -> None:
        settings = _active(config)
        if settings is not None:
            self.key(settings)  # a missing key file stops the server at start
            importlib.import_module("jwt")  # and PyJWT is loaded now, not by the first connection

    def key(self, settings: JwtSettings) -> str:
        if settings.public_key_file is None:
            assert settings.secret is not None
            return settings.secret
        if settings.public_key_file not in self._keys:
            try:
                with open(settings.public_key_file, encoding="utf-8") as f:
                    self._keys[settings.public_key_file] = f.read()
            except OSError as exc:
                raise ConfigError(
                    f"jwt.public_key_file: cannot read {settings.public_key_file!r}: {exc.strerror}") from None
        return self._keys[settings.public_key_file]

    @staticmethod
    def token_of(settings: JwtSettings, request: ConnectionRequest) -> str | None:
        header = request.headers.get(settings.header.lower(), "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return request.query.get(settings.query_param) or request.cookies.get(settings.cookie) or None

    def decode(self, settings: JwtSettings, token: str) -> dict[str, Any]:
        import jwt

        return jwt.decode(
            token, self.key(settings), algorithms=list(settings.algorithms), audience=settings.audience,
            issuer=settings.issuer, leeway=settings.leeway,
        )

    @hookimpl
    def streaming_authenticate(self, request: ConnectionRequest, streaming: Streaming) -> Identity | None:
        settings = _active(streaming.config)
        if settings is None:
            return None
        token = self.token_of(settings, request)
        if not token:
            raise Refused("a bearer token is required (Authorization header, ?token= or cookie)",
                          status=401, code="unauthenticated")
        import jwt

        try:
            claims = self.decode(settings, token)
        except jwt.ExpiredSignatureError:
            raise Refused("token expired", status=401, code="token_expired") from None
        except jwt.PyJWTError as exc:  # InvalidTokenError, and InvalidKeyError (HS256 "signed" with a public key)
            raise Refused(f"invalid token: {exc}", status=401, code="invalid_token") from None
        user = claims.get(settings.user_claim)
        if not isinstance(user, str) or not user:
            raise Refused(f"token has no string {settings.user_claim!r} claim", status=401, code="invalid_token")
        return Identity(user_id=user, claims=claims)

    @hookimpl
    def streaming_connected(self, connection: Connection) -> None:
        settings = _active(connection.streaming.config)
        exp = connection.identity.claims.get("exp") if settings and connection.identity else None
        if settings and isinstance(exp, (int, float)):
            loop = asyncio.get_running_loop()
            delay = max(0.0, exp + settings.leeway - time.time())
            self._expiry[connection.id] = loop.call_later(delay, self._expire, connection)

    def _expire(self, connection: Connection) -> None:
        self._expiry.pop(connection.id, None)
        log.info("token of %s expired; closing connection %s", connection.user_id, connection.id)
        connection.send_frame({"type": "system", "event": "token.expired", "data": None})
        # Dropped for cause: counted, streaming_connection_dropped fires, out of its rooms at once;
        # close() then ends the transport's I/O with the same code and reason.
        connection.drop("token expired", CloseCode.POLICY_VIOLATION)
        task = asyncio.ensure_future(connection.close(CloseCode.POLICY_VIOLATION, "token expired"))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @hookimpl
    def streaming_disconnected(self, connection: Connection, code: int, reason: str) -> None:
        handle = self._expiry.pop(connection.id, None)
        if handle is not None:
            handle.cancel()

    @hookimpl
    def streaming_join_room(self, connection: Connection, room: str) -> None:
        settings = _active(connection.streaming.config)
        if settings is None or connection.identity is None:
            return
        if not _allowed(connection.identity.claims.get(settings.rooms_claim), room):
            raise Refused(f"your token does not allow joining room {room!r}", code="forbidden_room")

    @hookimpl
    def streaming_message_received(self, connection: Connection, frame: ClientFrame) -> None:
        settings = _active(connection.streaming.config)
        if settings is None or connection.identity is None or frame.type not in ("message", "typing"):
            return
        claims = connection.identity.claims
        patterns = claims.get(settings.send_claim, claims.get(settings.rooms_claim))
        if not _allowed(patterns, frame.room_id):
            raise Refused(f"your token does not allow sending to room {frame.room_id!r}", code="forbidden_send")


plugin = JwtPlugin()
"""The instance the entry point registers."""

__all__ = ["JwtPlugin", "JwtSettings", "plugin"]
