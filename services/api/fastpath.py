"""The publish route without FastAPI's stack, for the requests that need nothing of it.

A single publish (`POST /v1/channels/{channel}/messages`) is most of what the api serves, and
FastAPI's middleware, dependency and validation layers cost about as much CPU per request as
Pub/Sub's own publish (bench scenario 4). This ASGI middleware answers a request itself only
when it is plainly well formed: a valid channel, no `Origin` (CORS stays FastAPI's), a JSON
content type, a `Content-Length` within MAX_REQUEST_BYTES, and a body that is a JSON object with
`data` and at most a valid `id`. Then it runs the route's own code (`publish`, shared with
the FastAPI route, which raises the same HTTPExceptions for 401/403/413/422/429). Anything else
goes to FastAPI untouched, with the body replayed, so every error reads as it always did.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.api.auth import Principal
from services.core.channels import is_valid_channel
from services.core.ids import ID_PATTERN

_PREFIX = "/v1/channels/"
_SUFFIX = "/messages"
_ID = re.compile(ID_PATTERN)

Publish = Callable[[str, Any, str | None, Principal], Awaitable[Response]]


class PublishFastPath:
    def __init__(
        self,
        app: ASGIApp,
        publish: Publish,
        authenticate: Callable[[str, str], Principal],
        error_response: Callable[[HTTPException], Response],
        max_body_bytes: int,
    ) -> None:
        self.app = app
        self._publish = publish
        self._authenticate = authenticate
        self._error_response = error_response
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        channel = self._channel_of(scope)
        headers = self._plain_headers(scope) if channel is not None else None
        if channel is None or headers is None:
            await self.app(scope, receive, send)
            return
        body, rest = await self._read_body(receive)
        message = _parse(body) if rest is None else None
        if message is None:  # FastAPI reads the same body and answers as it always did
            await self.app(scope, _replay(body, rest, receive), send)
            return
        data, message_id = message
        client = scope.get("client")
        try:
            principal = self._authenticate(
                headers.get(b"authorization", b"").decode("latin-1"),
                client[0] if client else "unknown",
            )
            response = await self._publish(channel, data, message_id, principal)
        except HTTPException as exc:
            response = self._error_response(exc)
        await response(scope, receive, send)

    @staticmethod
    def _channel_of(scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
            return None
        channel = path[len(_PREFIX) : -len(_SUFFIX)]
        return channel if is_valid_channel(channel) else None

    def _plain_headers(self, scope: Scope) -> dict[bytes, bytes] | None:
        """The headers when the request needs nothing of FastAPI's stack, else None."""
        headers = dict(scope["headers"])
        if b"origin" in headers or len(headers) != len(scope["headers"]):
            return None  # CORS, or a repeated header: FastAPI's rules apply
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        length = headers.get(b"content-length", b"")
        if (
            content_type != b"application/json"
            or not length.isdigit()
            or int(length) > self._max_body_bytes
        ):
            return None
        return headers

    @staticmethod
    async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
        """The whole body; or what came, and the message that was not body (a disconnect)."""
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), message
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _parse(body: bytes) -> tuple[Any, str | None] | None:
    """(data, id) of a body the route's model accepts as it is, else None."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None  # incl. what only the stdlib parses (integers over 64 bits): FastAPI's turn
    if type(message) is not dict or "data" not in message or not set(message) <= {"data", "id"}:
        return None
    message_id = message.get("id")
    if message_id is not None and (type(message_id) is not str or not _ID.fullmatch(message_id)):
        return None
    return message["data"], message_id


def _replay(body: bytes, rest: Message | None, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        if rest is not None:
            return rest
        return await receive()

    return replay
