"""The socket.io endpoint of a socket pod: the HTTP routing of its path and its sessions by sid.

It shares the pod's hub, history and subscription: a room is a channel, and a socket.io session
is a subscriber of the hub like any other (delivery.py), framed for its transport and room set
(frames.py): a message's packet is built once per pod, the same bytes for every session in the
room. Admission, maintenance and drain are the pod's, for every kind of session (sessions.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Gauge
from websockets.server import ServerProtocol

from services.core.broker import Broker
from services.core.closecodes import CloseCode
from services.core.settings import origin_allowed
from services.socket.access import Access
from services.socket.endpoint import HttpConnection
from services.socket.http import Request, json_response, response
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.sessions import SessionRegistry
from services.socket.settings import SocketSettings
from services.socket.socketio.context import SioContext
from services.socket.socketio.engine import WsTransport
from services.socket.socketio.protocol import (
    BAD_HANDSHAKE_METHOD,
    BAD_REQUEST,
    FORBIDDEN,
    UNKNOWN_SID,
    UNKNOWN_TRANSPORT,
    UNSUPPORTED_PROTOCOL_VERSION,
    error_body,
    open_packet,
)
from services.socket.socketio.session import SioSession


class SocketIOServer:
    def __init__(
        self,
        settings: SocketSettings,
        hub: Hub,
        broker: Broker,
        access: Access,
        registry: SessionRegistry,
        metrics: SocketMetrics,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.settings = settings
        self.sessions: dict[str, SioSession] = {}
        self.ctx = SioContext(settings, hub, broker, access, registry, metrics, spawn, self.drop)
        self.path = settings.socketio_path  # "/socket.io/"
        self.prefix = self.path.rstrip("/")  # what the gateway routes here
        self._rejections = metrics.handshake_rejections
        sessions = Gauge(
            "pubsock_socketio_sessions",
            "Open socket.io (Engine.IO) sessions, by transport",
            ["transport"],
            registry=metrics.registry,
        )
        for transport in ("websocket", "polling"):
            sessions.labels(transport).set_function(self._counter_of(transport))

    def drop(self, sid: str, session: object) -> None:
        """The context's `forget`: the sid no longer names this session."""
        if self.sessions.get(sid) is session:
            del self.sessions[sid]

    def _counter_of(self, transport: str) -> Callable[[], int]:
        """How many sessions use `transport` now (a gauge's function)."""
        return lambda: sum(1 for s in self.sessions.values() if s.transport_name == transport)

    # -- HTTP --------------------------------------------------------------------------------
    def handles(self, request: Request) -> bool:
        return request.path.startswith(self.prefix)

    def handle(self, connection: HttpConnection, request: Request) -> bytes | None:
        """One HTTP request under the socket.io path: bytes to answer now, or None when the
        request is held (a long poll) or the connection became a websocket."""
        if request.path not in (self.path, self.prefix):
            return json_response(404, {"detail": "not found"}, keep_alive=request.keep_alive)
        origin = request.header("origin")
        if not origin_allowed(origin, self.settings.origins):
            self._rejections.labels("origin").inc()
            return json_response(
                403, error_body(FORBIDDEN, "origin not allowed"), keep_alive=request.keep_alive
            )
        if request.method == "OPTIONS":
            allow_headers = request.header("access-control-request-headers") or "content-type"
            headers = {
                **self.ctx.headers(request),
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": allow_headers,
                "Access-Control-Max-Age": "600",
            }
            return response(204, headers=headers, keep_alive=request.keep_alive)
        if request.query_value("EIO") != "4":
            return self.ctx.error_response(request, 400, UNSUPPORTED_PROTOCOL_VERSION)
        transport = request.query_value("transport")
        if transport not in ("polling", "websocket"):
            return self.ctx.error_response(request, 400, UNKNOWN_TRANSPORT)
        upgrade = request.is_websocket_upgrade
        sid = request.query_value("sid")
        if sid is not None:
            session = self.sessions.get(sid)
            if session is not None:
                # A deadline that has passed counts before this request, even when the event
                # loop reads the request before it runs the session's timer.
                session.expire(time.monotonic())
            if session is None or not (session.open or session.closing):
                # Another pod's session (the affinity cookie did not hold) or an ended one: the
                # client reconnects, and recovers with its pid and offset.
                return self.ctx.error_response(request, 400, UNKNOWN_SID)
            if transport == "websocket":
                if not upgrade:
                    return self.ctx.error_response(request, 400, BAD_REQUEST)
                if session.ws is not None:  # upgraded already: as engine.io, accept and close
                    connection.upgrade_with(request, self._closed_factory(session))
                    return None
                connection.upgrade_with(request, self._probe_factory(session))
                return None
            if session.ws is not None:
                return self.ctx.error_response(request, 400, BAD_REQUEST, "transport mismatch")
            if request.method == "GET":
                return session.poll(connection, request)
            if request.method == "POST":
                return session.post(request)
            return self.ctx.error_response(request, 400, BAD_REQUEST)
        if request.method != "GET":
            return self.ctx.error_response(request, 400, BAD_HANDSHAKE_METHOD)
        if transport == "websocket" and not upgrade:
            return self.ctx.error_response(request, 400, BAD_REQUEST)
        refusal = self.ctx.access.admit(origin)
        if refusal is not None:
            self._rejections.labels(refusal.reason).inc()
            return self.ctx.error_response(
                request, refusal.status, BAD_REQUEST, refusal.detail, {"Retry-After": "5"}
            )
        query_token = request.query_value("token")
        if transport == "websocket":
            connection.upgrade_with(request, self._websocket_factory(query_token))
            return None
        session = self._new_session(query_token)
        return self.ctx.polling_response(request, self._open_packet(session, ["websocket"]))

    def _new_session(self, query_token: str | None) -> SioSession:
        sid = secrets.token_urlsafe(15)
        session = SioSession(self.ctx, sid, query_token)
        self.sessions[sid] = session
        self.ctx.opened(session)
        session.arm()
        return session

    def _open_packet(self, session: SioSession, upgrades: list[str]) -> bytes:
        settings = self.settings
        return open_packet(
            session.sid,
            upgrades,
            round(settings.socketio_ping_interval_s * 1000),
            round(settings.socketio_ping_timeout_s * 1000),
            settings.max_request_bytes,
        )

    def _websocket_factory(
        self, query_token: str | None
    ) -> Callable[[asyncio.Transport, ServerProtocol], WsTransport]:
        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            session = self._new_session(query_token)
            ws = WsTransport(self.ctx, transport, protocol, session, probing=False)
            session.use_websocket(ws)
            ws.write(self._open_packet(session, []))
            return ws

        return factory

    def _probe_factory(
        self, session: SioSession
    ) -> Callable[[asyncio.Transport, ServerProtocol], WsTransport]:
        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            ws = WsTransport(self.ctx, transport, protocol, session, probing=True)
            session.start_probe(ws)
            return ws

        return factory

    def _closed_factory(
        self, session: SioSession
    ) -> Callable[[asyncio.Transport, ServerProtocol], WsTransport]:
        """A websocket for a session that has one: closed at once, the session untouched."""

        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            ws = WsTransport(self.ctx, transport, protocol, session, probing=True)
            ws.close(CloseCode.NORMAL, "already upgraded")
            return ws

        return factory
