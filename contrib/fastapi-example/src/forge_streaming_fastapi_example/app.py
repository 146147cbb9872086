"""A FastAPI app with live rooms: forge-streaming mounted at ``/rt`` next to the app's own routes.

Three things worth copying:

1. **Mounting.** ``app.mount("/rt", streaming.asgi_app())`` serves the
   WebSocket (``/rt/ws``), SSE (``/rt/sse``) and HTTP API of the service.
   Starlette does not run a mounted sub-app's lifespan, so the service is
   started and stopped by the parent's: ``FastAPI(lifespan=streaming.lifespan)``.
   ``app.state.streaming`` lets ``forge-streaming serve module:app`` and
   ``forge_streaming.get_streaming(request)`` find it.
2. **One authentication.** :func:`user_for_token` is the only place a token
   is checked. The FastAPI dependency :func:`current_user` uses it for the
   app's routes; the :class:`TokenAuth` plugin uses it in the
   ``streaming_authenticate`` hook for every streaming connection.
3. **Publishing from a normal route.** ``POST /api/rooms/{room}/messages``
   calls ``streaming.publish``; every member of the room, on any transport
   and any node, gets the message.
"""

from __future__ import annotations

import argparse
import hmac
import logging
from collections.abc import Mapping
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from forge_streaming import ConnectionRequest, Identity, Refused, Streaming, get_streaming, hookimpl
from pydantic import BaseModel

log = logging.getLogger("forge_streaming.fastapi_example")

DEMO_TOKENS: Mapping[str, str] = {"alice-token": "alice", "bob-token": "bob"}
"""token -> user id. A real app would look the token up in its session store or verify a JWT here."""


def user_for_token(token: str | None) -> str | None:
    """The user a token belongs to, or None: the one check both the app and the streaming service use."""
    if not token:
        return None
    for known, user in DEMO_TOKENS.items():
        if hmac.compare_digest(token.encode(), known.encode()):
            return user
    return None


def bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


# -- the app's side: a FastAPI dependency ---------------------------------------------


def current_user(authorization: Annotated[str | None, Header()] = None,
                 token: Annotated[str | None, Query()] = None) -> str:
    """FastAPI dependency: the caller's user id from ``Authorization: Bearer`` (or ``?token=``), else 401."""
    user = user_for_token(bearer(authorization) or token)
    if user is None:
        raise HTTPException(status_code=401, detail="bad or missing token", headers={"WWW-Authenticate": "Bearer"})
    return user


# -- the streaming side: the same check in the authenticate hook ---------------------------


class TokenAuth:
    """A plugin object for ``Streaming(plugins=[TokenAuth()])``; it is not an entry point on purpose.

    Browsers cannot set headers on a WebSocket or an EventSource, so the
    token may also come as ``?token=``.
    """

    @hookimpl
    def streaming_authenticate(self, request: ConnectionRequest) -> Identity:
        user = user_for_token(bearer(request.headers.get("authorization")) or request.query.get("token"))
        if user is None:
            raise Refused("bad or missing token", status=401, code="unauthenticated")
        return Identity(user_id=user)


class MessageIn(BaseModel):
    data: Any


def create_app(config: Mapping[str, Any] | str | None = None) -> FastAPI:
    """Build the app and its streaming service (``config`` as for :class:`Streaming`)."""
    streaming = Streaming(config, plugins=[TokenAuth()])
    app = FastAPI(title="forge-streaming FastAPI example", lifespan=streaming.lifespan)
    app.state.streaming = streaming

    @app.get("/api/me")
    async def me(user: Annotated[str, Depends(current_user)]) -> dict[str, str]:
        return {"user_id": user}

    @app.post("/api/rooms/{room}/messages")
    async def post_message(room: str, message: MessageIn, request: Request,
                           user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
        sequence = await get_streaming(request).publish(room, message.data, user_id=user)
        if sequence is None:
            raise HTTPException(status_code=422, detail="the message was dropped by a hook")
        return {"room_id": room, "sequence": sequence, "user_id": user}

    @app.get("/api/rooms/{room}/users")
    async def room_users(room: str, request: Request,
                         user: Annotated[str, Depends(current_user)]) -> dict[str, Any]:
        return {"room_id": room, "users": await get_streaming(request).presence(room)}

    app.mount("/rt", streaming.asgi_app())
    return app


def main(argv: list[str] | None = None) -> int:
    """``forge-streaming-fastapi-example [--host H] [--port P]``: serve the example with uvicorn."""
    parser = argparse.ArgumentParser(prog="forge-streaming-fastapi-example", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", help="forge-streaming YAML config")
    args = parser.parse_args(argv)
    app = create_app(args.config)
    streaming = get_streaming(app)
    logging.basicConfig(level=logging.INFO)
    log.info("live rooms at ws://%s:%d/rt/ws?token=alice-token", args.host, args.port)
    streaming.http_address = (args.host, args.port)  # WebTransport binds the port HTTP listens on
    uvicorn.run(app, host=args.host, port=args.port, log_config=None, **streaming.server_options())
    return 0
