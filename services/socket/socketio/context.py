"""What socket.io's sessions share on a pod: settings, the hub, the signer, the frames, counters
and the HTTP responses of the socket.io path. Built by `SocketIOServer`; sessions depend on this,
never on the server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from prometheus_client import Counter

from services.core.auth import Claims
from services.core.broker import Broker
from services.core.closecodes import CloseCode
from services.socket.access import Access
from services.socket.delivery import LiveSession
from services.socket.history import parse_position_ms
from services.socket.http import Request, json_response, response
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.sessions import SessionRegistry
from services.socket.settings import SocketSettings
from services.socket.socketio.frames import EventFrames
from services.socket.socketio.protocol import error_body
from services.socket.socketio.recovery import PidSigner


class SidSession(LiveSession, Protocol):
    @property
    def sid(self) -> str: ...


class SioContext:
    def __init__(
        self,
        settings: SocketSettings,
        hub: Hub,
        broker: Broker,
        access: Access,
        registry: SessionRegistry,
        metrics: SocketMetrics,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        drop: Callable[[str, object], None],
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.history = hub.history
        self.broker = broker
        self.access = access
        self.registry = registry
        self.spawn = spawn
        self.recovery = settings.socketio_recovery
        self.signer = PidSigner(settings.socketio_secret or settings.token_secret)
        self.frames = EventFrames(settings.socketio_event, settings.socketio_recovery)
        self._drop = drop  # the server's table of sessions by sid
        self._open_publish = not settings.token_secret and not settings.keys
        # On every socket.io HTTP response, as on the pod's other routes and its websocket
        # handshakes: which pod serves (the load balancer's affinity decides for polling).
        self._pod_header = {"X-Pubsock-Pod": settings.pod_name}
        self._metrics = metrics
        registry_ = metrics.registry
        self.connects = Counter(
            "pubsock_socketio_connects_total",
            "socket.io CONNECTs, by result (new, recovered, not_recovered, refused)",
            ["result"],
            registry=registry_,
        )
        self.publishes = Counter(
            "pubsock_socketio_publishes_total",
            "Messages published by socket.io clients, by result",
            ["result"],
            registry=registry_,
        )
        self.ping_timeouts = Counter(
            "pubsock_socketio_ping_timeouts_total",
            "socket.io sessions dropped for not answering the Engine.IO ping",
            registry=registry_,
        )
        self.upgrades = Counter(
            "pubsock_socketio_upgrades_total",
            "socket.io sessions upgraded from long-polling to websocket",
            registry=registry_,
        )
        self.slow_closes = metrics.slow_consumer_closes

    # -- sessions ----------------------------------------------------------------------------
    def opened(self, session: SidSession) -> None:
        self.registry.opened(session)
        self._metrics.connections_opened.inc()

    def forget(self, session: SidSession) -> None:
        """The sid is gone (the session ended, or its close packet was collected)."""
        self._drop(session.sid, session)
        self.registry.closed(session)

    # -- rules shared with the native websocket and the HTTP API ------------------------------
    def authenticate(self, token: str | None) -> Claims | None:
        return self.access.authenticate(token, "auth: {token}")

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

    def presence_summary(self, room: str) -> dict[str, object]:
        presence = self.hub.presence
        if presence is None:
            return {"count": 0, "members": []}
        return presence.summary(room, self.settings.presence_members_max)

    # -- counters ----------------------------------------------------------------------------
    def client_errors(self, code: str) -> None:
        self._metrics.client_errors.labels(code).inc()

    def floods_closed(self) -> None:
        self._metrics.floods_closed.inc()

    def metrics_close(self, code: CloseCode) -> None:
        self._metrics.closes.labels(str(int(code))).inc()

    def upgraded(self) -> None:
        self.upgrades.inc()

    # -- HTTP responses ----------------------------------------------------------------------
    def headers(self, request: Request) -> dict[str, str]:
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
        headers = {"Cache-Control": "no-store", **self.headers(request)}
        return response(
            200, body, "text/plain; charset=UTF-8", headers=headers, keep_alive=request.keep_alive
        )

    def post_response(self, request: Request) -> bytes:
        headers = {"Cache-Control": "no-store", **self.headers(request)}
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
            headers={**self.headers(request), **(headers or {})},
            keep_alive=request.keep_alive,
        )
