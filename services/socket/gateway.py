"""The pod's listening protocol: plain HTTP requests, then possibly a websocket upgrade on /ws.

One asyncio protocol per TCP connection. h11 reads its requests (http.py: keep-alive, bounded
sizes; the header timeout is here) and plain HTTP is answered through `routes`. An upgrade's
head, parsed once, is handed to websockets' sans-I/O `ServerProtocol` for the handshake, and the
connection becomes a `Session` with a protocol already open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.socket.http import HttpError, Request, RequestReader, json_response
from services.socket.session import Session

if TYPE_CHECKING:
    from services.socket.pod import Pod

log = logging.getLogger(__name__)
_ws_logger = logging.getLogger("websockets.server")


class Refusal(NamedTuple):
    """Why a websocket upgrade is refused."""

    status: int
    reason: str  # metric label
    detail: str


class Connection(asyncio.Protocol):
    def __init__(self, pod: Pod) -> None:
        self._pod = pod
        self._transport: asyncio.Transport | None = None
        self._reader = RequestReader(pod.settings.max_request_bytes)
        self._timer: asyncio.TimerHandle | None = None
        self._handling = False
        self.session: Session | None = None
        self.on_lost: Callable[[], None] | None = None  # a held request (socket.io long poll)

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._pod.http_connections.add(self)
        self._arm(self._pod.settings.http_header_timeout_s)

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
        self._pod.http_connections.discard(self)
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
            socketio = self._pod.socketio
            if socketio is not None and request.path.startswith(socketio.prefix):
                payload = socketio.handle(self, request)
                if payload is None:  # a held long poll, or now a socket.io websocket
                    return
                self._answered(request, payload, resume=False)
                continue
            if request.path == "/ws" and request.is_websocket_upgrade:
                self._upgrade(request)
                return
            self._answer(request)

    def _answer(self, request: Request) -> None:
        assert self._transport is not None
        result = self._pod.routes.handle(request)
        if asyncio.iscoroutine(result):
            self._handling = True
            task = asyncio.get_running_loop().create_task(result)
            task.add_done_callback(lambda t: self._answered(request, t.result()))
            self._pod.track(task)
            return
        assert isinstance(result, bytes)
        self._answered(request, result, resume=False)

    def _answered(self, request: Request, payload: bytes, resume: bool = True) -> None:
        assert self._transport is not None
        self._handling = False
        if self._transport.is_closing():
            return
        self._transport.write(payload)
        if not request.keep_alive:
            self._transport.close()
            return
        self._arm(self._pod.settings.http_keepalive_s)
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
        """Closes the connection if it is plain HTTP (no websocket session): at the end of a
        drain, a keep-alive connection must not hold the process."""
        if self.session is None and self._transport is not None:
            self._transport.close()

    def writable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def upgrade_with(self, request: Request, factory: Callable[..., Any]) -> None:
        """Completes a websocket handshake, then `factory(transport, protocol)` owns the
        connection (it must offer `feed`, `abort` and `connection_lost`, as `Session` does).

        The head was parsed once, by h11: websockets validates the handshake from it (`accept`)
        and the session gets a protocol that starts open."""
        assert self._transport is not None
        transport = self._transport
        max_size = self._pod.settings.max_frame_bytes
        handshake = ServerProtocol(max_size=max_size, logger=_ws_logger)
        response = handshake.accept(WsRequest(request.target, Headers(request.raw_headers)))
        response.headers["X-Pubsock-Pod"] = self._pod.settings.pod_name
        handshake.send_response(response)
        for data in handshake.data_to_send():
            if data:
                transport.write(data)
        if response.status_code != 101:
            self._pod.metrics.handshake_rejections.labels("invalid").inc()
            transport.close()
            return
        self._disarm()
        protocol = ServerProtocol(state=State.OPEN, max_size=max_size, logger=_ws_logger)
        self.session = factory(transport, protocol)
        rest = self._reader.leftover
        if rest:
            self.session.feed(rest)

    # -- websocket ---------------------------------------------------------------------------
    def _upgrade(self, request: Request) -> None:
        assert self._transport is not None
        transport = self._transport
        admission = self._pod.admit(request)
        if isinstance(admission, Refusal):
            status, reason, detail = admission
            self._pod.metrics.handshake_rejections.labels(reason).inc()
            headers = {"Retry-After": "5"} if status == 503 else None
            transport.write(
                json_response(status, {"detail": detail}, headers=headers, keep_alive=False)
            )
            transport.close()
            return

        def open_session(transport: asyncio.Transport, protocol: ServerProtocol) -> Session:
            session = Session(self._pod, transport, protocol, admission)
            self._pod.session_opened(session)
            return session

        self.upgrade_with(request, open_session)
