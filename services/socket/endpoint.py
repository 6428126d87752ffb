"""What an endpoint of the pod's port gets from the connection it answers, and what it offers.

The gateway (gateway.py) reads HTTP requests and hands those an endpoint claims to it: the native
websocket (`/ws`), socket.io (`/socket.io/`), and later kinds. These protocols keep the
dependencies pointing one way: endpoints know this module, never the gateway.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from websockets.server import ServerProtocol

from services.socket.http import Request


class WebsocketHandler(Protocol):
    """What owns a connection once it is a websocket."""

    def feed(self, data: bytes) -> None: ...

    def abort(self) -> None: ...

    def connection_lost(self) -> None: ...


WebsocketFactory = Callable[[asyncio.Transport, ServerProtocol], WebsocketHandler]


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


class Endpoint(Protocol):
    def handles(self, request: Request) -> bool: ...

    def handle(self, connection: HttpConnection, request: Request) -> bytes | None:
        """The response to write now, or None: held, upgraded or refused (connection closed)."""
        ...
