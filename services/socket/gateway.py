"""The pod's listening protocol: plain HTTP requests, then possibly a websocket or a stream.

One asyncio protocol per TCP connection. h11 reads its requests (http.py: keep-alive, bounded
sizes; the header timeout is here). A request an endpoint claims (endpoint.py: the native
websocket, socket.io, Server-Sent Events) goes to it; the rest to the plain routes. An upgrade's
head, parsed once, is handed to websockets' sans-I/O `ServerProtocol` for the handshake, and the
connection then belongs to the endpoint's handler, with a protocol already open. A streamed
response (SSE) writes its head and the connection belongs to the endpoint's handler likewise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client import Counter
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.socket.endpoint import (
    ConnectionHandler,
    Endpoint,
    StreamFactory,
    WebsocketFactory,
)
from services.socket.http import HttpError, Request, RequestReader, json_response

log = logging.getLogger(__name__)
_ws_logger = logging.getLogger("websockets.server")


@dataclass(slots=True)
class Gateway:
    """What every connection of the port shares (built by the pod)."""

    pod_name: str
    max_request_bytes: int
    max_frame_bytes: int
    header_timeout_s: float
    keepalive_s: float
    endpoints: Sequence[Endpoint]
    routes: Callable[[Request], bytes]
    handshake_rejections: Counter
    connections: set[Connection] = field(default_factory=set)

    def close_idle(self) -> None:
        """At the end of a drain: keep-alive connections must not hold the process."""
        for connection in list(self.connections):
            connection.close_idle()


class Connection(asyncio.Protocol):
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._transport: asyncio.Transport | None = None
        self._reader = RequestReader(gateway.max_request_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._handling = False
        self.session: ConnectionHandler | None = None
        self.on_lost: Callable[[], None] | None = None  # a held request (socket.io long poll)

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._gateway.connections.add(self)
        self._arm(self._gateway.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            try:
                session.feed(data)
            except EOFError:  # data after the closing handshake ended the stream
                session.abort()
            return
        self._reader.feed(data)
        if not self._handling:
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._gateway.connections.discard(self)
        if self.session is not None:
            self.session.connection_lost()
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    # -- timers ------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        if self._transport is not None and self.session is None:
            self._transport.close()

    # -- HTTP --------------------------------------------------------------------------------
    def _fail(self, error: HttpError) -> None:
        assert self._transport is not None
        self._transport.write(
            json_response(error.status, {"detail": error.detail}, keep_alive=False)
        )
        self._transport.close()

    def _process(self) -> None:
        """Handles every complete request received, in order (pipelining allowed)."""
        transport = self._transport
        assert transport is not None
        while not transport.is_closing() and self.session is None:
            try:
                request = self._reader.next_request()
            except HttpError as error:
                self._fail(error)
                return
            if request is None:
                return  # wait for the rest
            endpoint = next((e for e in self._gateway.endpoints if e.handles(request)), None)
            if endpoint is None:
                self._answer(request)
                continue
            payload = endpoint.handle(self, request)
            if payload is None:  # held (a long poll), a websocket or a stream now, or refused
                return
            self._answered(request, payload, resume=False)

    def _answer(self, request: Request) -> None:
        self._answered(request, self._gateway.routes(request), resume=False)

    def _answered(self, request: Request, payload: bytes, resume: bool = True) -> None:
        assert self._transport is not None
        self._handling = False
        if self._transport.is_closing():
            return
        self._transport.write(payload)
        if not request.keep_alive:
            self._transport.close()
            return
        self._arm(self._gateway.keepalive_s)
        if resume:
            self._process()

    # -- held requests and other websockets (socket.io) ---------------------------------------
    def hold(self, on_lost: Callable[[], None]) -> None:
        """Answers later (`release`): no timeout meanwhile, later requests wait their turn."""
        self._disarm()
        self._handling = True
        self.on_lost = on_lost

    def release(self, request: Request, payload: bytes) -> None:
        self.on_lost = None
        self._answered(request, payload)

    def close_idle(self) -> None:
        """Closes the connection if it is plain HTTP (no websocket or stream): at the end of a
        drain, a keep-alive connection must not hold the process."""
        if self.session is None and self._transport is not None:
            self._transport.close()

    def writable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def refuse(self, payload: bytes) -> None:
        assert self._transport is not None
        self._transport.write(payload)
        self._transport.close()

    def upgrade_with(self, request: Request, factory: WebsocketFactory) -> None:
        """Completes a websocket handshake, then `factory(transport, protocol)` owns the
        connection.

        The head was parsed once, by h11: websockets validates the handshake from it (`accept`)
        and the session gets a protocol that starts open."""
        assert self._transport is not None
        transport = self._transport
        max_size = self._gateway.max_frame_bytes
        handshake = ServerProtocol(max_size=max_size, logger=_ws_logger)
        response = handshake.accept(WsRequest(request.target, Headers(request.raw_headers)))
        response.headers["X-Pubsock-Pod"] = self._gateway.pod_name
        handshake.send_response(response)
        for data in handshake.data_to_send():
            if data:
                transport.write(data)
        if response.status_code != 101:
            self._gateway.handshake_rejections.labels("invalid").inc()
            transport.close()
            return
        self._disarm()
        protocol = ServerProtocol(state=State.OPEN, max_size=max_size, logger=_ws_logger)
        self.session = factory(transport, protocol)
        rest = self._reader.leftover
        if rest:
            self.session.feed(rest)

    def stream(self, head: bytes, factory: StreamFactory) -> None:
        """Writes a streamed response's head; then `factory(transport)` owns the connection
        (no header or keep-alive timeout: the handler keeps it alive and ends it)."""
        assert self._transport is not None
        transport = self._transport
        transport.write(head)
        self._disarm()
        self.session = factory(transport)
        rest = self._reader.leftover
        if rest:
            self.session.feed(rest)
