"""The socket.io endpoint of a socket pod: HTTP routing, sessions, rooms and fan-out.

It shares the pod's hub, history and subscription: a room is a channel. The pod's hub calls
`_fanout` once per live message while any socket.io client is in a room on this pod; the
message's socket.io packet is built then, once per pod (cached on the history entry), and the
same bytes go to every socket.io client in the room, as the native frame does to native ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Gauge

from services.core.auth import Claims, InvalidToken, verify_token
from services.core.closecodes import CloseCode
from services.core.settings import origin_allowed
from services.socket.history import Entry, parse_position_ms
from services.socket.http import Request, json_response, response
from services.socket.socketio.engine import EngineSession, WsTransport
from services.socket.socketio.frames import EventFrames
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
from services.socket.socketio.recovery import PidSigner
from services.socket.socketio.session import Refused, SioSession

if TYPE_CHECKING:
    from websockets.server import ServerProtocol

    from services.socket.gateway import Connection
    from services.socket.pod import Pod

log = logging.getLogger(__name__)

# The send budget and the maximum connection age are checked this often; the protocol's deadlines
# (heartbeat, upgrade, close, connect) have a timer per session (engine.py).
MAINTENANCE_TICK_S = 0.5


class SocketIOServer:
    def __init__(self, pod: Pod) -> None:
        self._pod = pod
        settings = pod.settings
        self.settings = settings
        self.path = settings.socketio_path  # "/socket.io/"
        self.prefix = self.path.rstrip("/")  # what the gateway routes here
        self.recovery = settings.socketio_recovery
        self.signer = PidSigner(settings.socketio_secret or settings.token_secret)
        self.frames = EventFrames(settings.socketio_event, settings.socketio_recovery)
        self.sessions: dict[str, SioSession] = {}
        self._rooms: dict[str, set[SioSession]] = {}
        self._open_publish = not settings.token_secret and not settings.keys
        # On every socket.io HTTP response, as on the pod's other routes and its websocket
        # handshakes: which pod serves (the load balancer's affinity decides for polling).
        self._pod_header = {"X-Pubsock-Pod": settings.pod_name}
        registry = pod.metrics.registry
        sessions = Gauge(
            "pubsock_socketio_sessions",
            "Open socket.io (Engine.IO) sessions, by transport",
            ["transport"],
            registry=registry,
        )
        for transport in ("websocket", "polling"):
            sessions.labels(transport).set_function(self._counter_of(transport))
        self.connects = Counter(
            "pubsock_socketio_connects_total",
            "socket.io CONNECTs, by result (new, recovered, not_recovered, refused)",
            ["result"],
            registry=registry,
        )
        self.publishes = Counter(
            "pubsock_socketio_publishes_total",
            "Messages published by socket.io clients, by result",
            ["result"],
            registry=registry,
        )
        self.ping_timeouts = Counter(
            "pubsock_socketio_ping_timeouts_total",
            "socket.io sessions dropped for not answering the Engine.IO ping",
            registry=registry,
        )
        self.upgrades = Counter(
            "pubsock_socketio_upgrades_total",
            "socket.io sessions upgraded from long-polling to websocket",
            registry=registry,
        )
        self.slow_closes = pod.metrics.slow_consumer_closes
        self._frames_sent = pod.metrics.frames_sent

    # -- what the pod shares -----------------------------------------------------------------
    @property
    def hub(self) -> Any:
        return self._pod.hub

    @property
    def history(self) -> Any:
        return self._pod.history

    @property
    def broker(self) -> Any:
        return self._pod.broker

    def track(self, task: asyncio.Task[Any]) -> None:
        self._pod.track(task)

    def authenticate(self, token: str | None) -> Claims | None:
        secret = self.settings.token_secret
        if not secret:
            return None
        if not token:
            raise Refused("unauthorized", "a token is required: auth: {token}")
        try:
            return verify_token(token, secret)
        except InvalidToken:
            raise Refused("unauthorized", "invalid or expired token") from None

    def may_publish(self, claims: Claims | None, room: str) -> bool:
        """As the HTTP API: a token whose `publish` claim matches; without tokens, only when
        publishing is open (API_KEYS and TOKEN_SECRET both empty)."""
        if claims is not None:
            return claims.may_publish(room)
        return self._open_publish

    def position_ms(self, room: str, position: str) -> int | None:
        """The publish time of a position: `@<ms>`, or the entry of a message id."""
        ms = parse_position_ms(position)
        if ms is not None:
            return ms
        entry = self.history.entry(room, position)
        return entry.publish_ms if entry is not None else None

    def presence_of(self, room: str) -> tuple[int, list[str]]:
        presence = self.hub.presence
        return presence.count(room) if presence is not None else (0, [])

    def client_errors(self, code: str) -> None:
        self._pod.metrics.client_errors.labels(code).inc()

    def floods_closed(self) -> None:
        self._pod.metrics.floods_closed.inc()

    def metrics_close(self, code: CloseCode) -> None:
        self._pod.metrics.closes.labels(str(int(code))).inc()

    def upgraded(self) -> None:
        self.upgrades.inc()

    # -- rooms and fan-out -------------------------------------------------------------------
    def room_add(self, room: str, session: SioSession) -> None:
        members = self._rooms.get(room)
        if members is None:
            members = self._rooms[room] = set()
        members.add(session)
        presence = self.hub.presence
        if presence is not None:
            presence.joined(room, session.sub)
        self.hub.sidecar = self._fanout

    def room_remove(self, room: str, session: SioSession) -> None:
        members = self._rooms.get(room)
        if members is None or session not in members:
            return
        members.discard(session)
        presence = self.hub.presence
        if presence is not None:
            presence.left(room, session.sub)
        if not members:
            del self._rooms[room]
            if not self._rooms:
                self.hub.sidecar = None  # no socket.io room on this pod: no cost per message

    def _fanout(self, channel: str, entry: Entry) -> None:
        members = self._rooms.get(channel)
        if not members:
            return
        packet, frame = self.frames.build(channel, entry)
        slow: list[SioSession] | None = None
        varied: dict[bytes, tuple[bytes, bytes]] | None = None  # by room set, for this message
        for session in members:
            suffix = session.rooms_suffix
            if suffix is None:
                delivered = session.deliver(packet, frame)
            else:
                if varied is None:
                    varied = {}
                built = varied.get(suffix)
                if built is None:
                    built = varied[suffix] = self.frames.with_rooms(packet, suffix)
                delivered = session.deliver(*built)
            if not delivered:
                if slow is None:
                    slow = []
                slow.append(session)
        self._frames_sent.inc(len(members))
        if slow:
            for session in slow:
                session.close_slow()

    def _counter_of(self, transport: str) -> Callable[[], int]:
        """How many sessions use `transport` now (a gauge's function)."""
        return lambda: sum(1 for s in self.sessions.values() if s.transport_name == transport)

    def forget(self, session: EngineSession) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]

    # -- HTTP --------------------------------------------------------------------------------
    def _headers(self, request: Request) -> dict[str, str]:
        """X-Pubsock-Pod, and CORS with credentials when the request has an (allowed) Origin."""
        origin = request.header("origin")
        if origin is None:
            return self._pod_header
        return {
            **self._pod_header,
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }

    def polling_response(self, request: Request, body: bytes) -> bytes:
        headers = {"Cache-Control": "no-store", **self._headers(request)}
        return response(
            200, body, "text/plain; charset=UTF-8", headers=headers, keep_alive=request.keep_alive
        )

    def post_response(self, request: Request) -> bytes:
        headers = {"Cache-Control": "no-store", **self._headers(request)}
        return response(200, b"ok", "text/html", headers=headers, keep_alive=request.keep_alive)

    def error_response(
        self,
        request: Request,
        status: int,
        code: int,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> bytes:
        return json_response(
            status,
            error_body(code, message),
            headers={**self._headers(request), **(headers or {})},
            keep_alive=request.keep_alive,
        )

    def handle(self, connection: Connection, request: Request) -> bytes | None:
        """One HTTP request under the socket.io path: bytes to answer now, or None when the
        request is held (a long poll) or the connection became a websocket."""
        if request.path not in (self.path, self.prefix):
            return json_response(404, {"detail": "not found"}, keep_alive=request.keep_alive)
        origin = request.header("origin")
        if not origin_allowed(origin, self.settings.origins):
            self._pod.metrics.handshake_rejections.labels("origin").inc()
            return json_response(
                403, error_body(FORBIDDEN, "origin not allowed"), keep_alive=request.keep_alive
            )
        if request.method == "OPTIONS":
            allow_headers = request.header("access-control-request-headers") or "content-type"
            headers = {
                **self._headers(request),
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": allow_headers,
                "Access-Control-Max-Age": "600",
            }
            return response(204, headers=headers, keep_alive=request.keep_alive)
        if request.query_value("EIO") != "4":
            return self.error_response(request, 400, UNSUPPORTED_PROTOCOL_VERSION)
        transport = request.query_value("transport")
        if transport not in ("polling", "websocket"):
            return self.error_response(request, 400, UNKNOWN_TRANSPORT)
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
                return self.error_response(request, 400, UNKNOWN_SID)
            if transport == "websocket":
                if not upgrade:
                    return self.error_response(request, 400, BAD_REQUEST)
                if session.ws is not None:  # upgraded already: as engine.io, accept and close
                    connection.upgrade_with(request, self._closed_factory(session))
                    return None
                connection.upgrade_with(request, self._probe_factory(session))
                return None
            if session.ws is not None:
                return self.error_response(request, 400, BAD_REQUEST, "transport mismatch")
            if request.method == "GET":
                return session.poll(connection, request)
            if request.method == "POST":
                return session.post(request)
            return self.error_response(request, 400, BAD_REQUEST)
        if request.method != "GET":
            return self.error_response(request, 400, BAD_HANDSHAKE_METHOD)
        if transport == "websocket" and not upgrade:
            return self.error_response(request, 400, BAD_REQUEST)
        refusal = self._admit()
        if refusal is not None:
            reason, message = refusal
            self._pod.metrics.handshake_rejections.labels(reason).inc()
            return self.error_response(request, 503, BAD_REQUEST, message, {"Retry-After": "5"})
        query_token = request.query_value("token")
        if transport == "websocket":
            connection.upgrade_with(request, self._websocket_factory(query_token))
            return None
        session = self._new_session(query_token)
        return self.polling_response(request, self._open_packet(session, ["websocket"]))

    def _admit(self) -> tuple[str, str] | None:
        pod = self._pod
        if not pod.ready:
            return "not_ready", "this pod is draining or not ready; try another"
        if len(pod.sessions) + len(self.sessions) >= self.settings.max_connections:
            return "capacity", "this pod is at its connection limit; try another"
        return None

    def _new_session(self, query_token: str | None) -> SioSession:
        sid = secrets.token_urlsafe(15)
        session = SioSession(self, sid, query_token)
        self.sessions[sid] = session
        session.arm()
        self._pod.metrics.connections_opened.inc()
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

    def _websocket_factory(self, query_token: str | None) -> Any:
        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            session = self._new_session(query_token)
            ws = WsTransport(self, transport, protocol, session, probing=False)
            session.ws = ws
            session.wire = transport
            ws.write(self._open_packet(session, []))
            return ws

        return factory

    def _probe_factory(self, session: SioSession) -> Any:
        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            ws = WsTransport(self, transport, protocol, session, probing=True)
            session.start_probe(ws)
            return ws

        return factory

    def _closed_factory(self, session: SioSession) -> Any:
        """A websocket for a session that has one: closed at once, the session untouched."""

        def factory(transport: asyncio.Transport, protocol: ServerProtocol) -> WsTransport:
            ws = WsTransport(self, transport, protocol, session, probing=True)
            ws.close(CloseCode.NORMAL, "already upgraded")
            return ws

        return factory

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Send budgets and maximum ages, about twice a second."""
        while True:
            await asyncio.sleep(MAINTENANCE_TICK_S)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                try:
                    session.maintain(now)
                except Exception:  # one bad session must not stop the checks of the others
                    log.exception("socket.io session maintenance failed")
                    session.terminate("internal error")

    def close_all(self, code: CloseCode, reason: str) -> None:
        for session in list(self.sessions.values()):
            session.close(code, reason)

    async def drain(self, window_s: float) -> None:
        """Closes every session (1012 / close packet) spread over `window_s`: clients come back
        at once, to another pod, and recover."""
        sessions = list(self.sessions.values())
        if sessions:
            step = window_s / len(sessions)
            loop = asyncio.get_running_loop()
            start = loop.time()
            for index, session in enumerate(sessions):
                delay = start + index * step - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                session.close(CloseCode.RESTART, "server restarting")
        deadline = time.monotonic() + self.settings.close_timeout_s
        while self.sessions and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                session.terminate("server stopped")
