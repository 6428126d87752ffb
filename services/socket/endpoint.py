"""What an endpoint of the pod's port gets from the connection it answers, and what it offers.

The gateway (gateway.py) reads HTTP requests and hands those an endpoint claims to it: the native
websocket (`/ws`), socket.io (`/socket.io/`), Server-Sent Events (`/sse`), and later kinds. These
protocols keep the dependencies pointing one way: endpoints know this module, never the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from websockets.server import ServerProtocol

from services.socket.http import Request


class ConnectionHandler(Protocol):
    """What owns a connection once it is no longer plain HTTP (a websocket, a response stream)."""

    def feed(self, data: bytes) -> None:
        """Bytes the client sent."""
        ...

    def abort(self) -> None: ...

    def connection_lost(self) -> None: ...


WebsocketHandler = ConnectionHandler
WebsocketFactory = Callable[[asyncio.Transport, ServerProtocol], WebsocketHandler]
StreamFactory = Callable[[asyncio.Transport], ConnectionHandler]


class HttpConnection(Protocol):
    """One client TCP connection as an endpoint sees it."""

    on_lost: Callable[[], None] | None

    def hold(self, on_lost: Callable[[], None]) -> None:
        """Answers later (`release`): no timeout meanwhile, later requests wait their turn."""
        ...

    def release(self, request: Request, payload: bytes) -> None: ...

    def writable(self) -> bool: ...

    def refuse(self, payload: bytes) -> None:
        """Writes `payload` and closes the connection."""
        ...

    def upgrade_with(self, request: Request, factory: WebsocketFactory) -> None:
        """Completes the websocket handshake; then `factory(transport, protocol)` owns the
        connection."""
        ...

    def stream(self, head: bytes, factory: StreamFactory) -> None:
        """Writes `head`, the head of a response whose body lasts until the connection closes
        (no length: `stream_head` in http.py), then `factory(transport)` owns the connection:
        it writes the body and gets what the client sends."""
        ...


class Endpoint(Protocol):
    def handles(self, request: Request) -> bool: ...

    def handle(self, connection: HttpConnection, request: Request) -> bytes | None:
        """The response to write now, or None: held, upgraded, streaming or refused (connection
        closed)."""
        ...
