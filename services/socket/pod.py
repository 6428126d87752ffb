"""A socket pod: owns its subscription, history, hub, sessions and server, and their lifecycle.

Start: listen, create the subscription (seeked back for the warm start), start the pump and
presence, wait until the retained backlog is in history, turn ready.
Drain (SIGTERM), in this order: `/readyz` 503 at once; keep serving for DRAIN_DELAY_S while the
load balancer stops sending; stop listening; close sessions with 1012 spread over
DRAIN_CLOSE_WINDOW_S; stop pulling; delete the subscription; exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from pathlib import Path

from services.core.auth import Claims, InvalidToken, verify_token
from services.core.broker import Broker, create_broker
from services.core.channels import NamespaceLabeler
from services.core.closecodes import CloseCode
from services.core.settings import origin_allowed
from services.socket.gateway import Connection, Refusal
from services.socket.history import History
from services.socket.http import Request
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.presence import Presence
from services.socket.pump import Pump
from services.socket.routes import Routes
from services.socket.session import Session
from services.socket.settings import SocketSettings
from services.socket.socketio import SocketIOServer
from services.socket.wsframe import flush

log = logging.getLogger(__name__)

DEFAULT_WEB_DIR = Path(__file__).resolve().parents[2] / "web"
MAINTENANCE_TICK_S = 1.0
HISTORY_EXPIRE_EVERY_S = 10.0


def subscription_name(pod_name: str) -> str:
    """`pubsock-<pod>-<random>`: unique per start, so a restarted pod never reuses a backlog."""
    cleaned = re.sub(r"[^A-Za-z0-9-]", "-", pod_name)[:180] or "pod"
    return f"pubsock-{cleaned}-{secrets.token_hex(4)}"


class Pod:
    def __init__(self, settings: SocketSettings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.metrics = SocketMetrics()
        self.history = History(
            size=settings.history_size,
            age_s=settings.history_age_s,
            max_channels=settings.history_max_channels,
            position_slack_ms=settings.position_slack_ms,
        )
        self.broker = broker or create_broker(settings)
        self.hub = Hub(self.history, self.metrics, settings.recovery_wait_s)
        self.presence = Presence(
            settings.pod_name,
            self.broker,
            interval_s=settings.presence_interval_s,
            snapshot_s=settings.presence_snapshot_s,
            ttl_s=settings.presence_ttl_s,
            on_events=self.hub.presence_events,
            on_sent=self.metrics.presence_announcements.inc,
        )
        self.hub.presence = self.presence
        self.routes = Routes(self, Path(settings.web_dir) if settings.web_dir else DEFAULT_WEB_DIR)
        self.subscription = self.broker.subscription(
            subscription_name(settings.pod_name),
            {"app": "pubsock", "pod": re.sub(r"[^a-z0-9_-]", "-", settings.pod_name.lower())[:63]},
        )
        self.pump = Pump(
            self.subscription,
            self.history,
            self.hub,
            self.metrics,
            NamespaceLabeler(settings.namespaces),
            on_announcement=self.presence.on_announcement,
            on_unprovable_break=self._unprovable_break,
            warm_window_ms=int(min(settings.history_age_s, settings.topic_retention_s) * 1000),
        )
        self.socketio = SocketIOServer(self) if settings.socketio_enabled else None
        self.sessions: set[Session] = set()
        self.http_connections: set[Connection] = set()
        self.started = False
        self.draining = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._no_sessions = asyncio.Event()
        self.metrics.ready.set_function(lambda: 1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        """Started (subscription open, warm start done) and not draining. A broker outage does
        not count: every pod shares it, and emptying the load balancer would only turn 503s
        into 502s (the outage shows in `pubsock_broker_up`)."""
        return self.started and not self.draining

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def track(self, task: asyncio.Task[object]) -> None:
        """Keeps a reference to a background task and logs its failure."""
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.settings.token_secret:
            log.warning("TOKEN_SECRET is empty: websocket clients need no token (open mode)")
        await self.broker.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            self.settings.host,
            self.settings.port,
            reuse_address=True,
            backlog=4096,
        )
        await self.pump.open()
        self.track(loop.create_task(self.pump.run(), name="pump"))
        self.track(loop.create_task(self.presence.run(), name="presence"))
        await self._warm_start()
        self.presence.restart_silence()
        self.track(loop.create_task(self._maintain(), name="maintenance"))
        if self.socketio is not None:
            self.track(loop.create_task(self.socketio.run(), name="socketio"))
        self.started = True
        log.info(
            "socket pod ready",
            extra={
                "pod": self.settings.pod_name,
                "port": self.port,
                "broker": self.settings.broker,
                "history_messages": self.history.message_count,
            },
        )

    async def _warm_start(self) -> None:
        """Waits, bounded by WARM_START_TIMEOUT_S, until the stream flows (our own presence
        announcement came back) and the seek's backlog is over: no backlog message (published
        before the opening) for WARM_QUIET_S. Live messages do not count, so steady traffic does
        not hold the pod back. Past the bound the pod turns ready anyway; channels whose backlog
        is not known to be over then recover only from the opening on (history.py)."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        deadline = loop.time() + settings.warm_start_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.presence.own_heard.wait(), settings.warm_start_timeout_s)
        if self.pump.backlog_until_ms is not None:
            # A quiet spell is a duration by nature: poll for it, bounded by the deadline.
            while (  # noqa: ASYNC110
                loop.time() < deadline and self.pump.backlog_quiet_s() < settings.warm_quiet_s
            ):
                await asyncio.sleep(settings.warm_quiet_s / 4)
            if self.pump.backlog_quiet_s() >= settings.warm_quiet_s:
                self.pump.end_backlog()
        log.info(
            "warm start done",
            extra={
                "history_messages": self.history.message_count,
                "backlog_over": self.pump.backlog_until_ms is None,
            },
        )

    def _unprovable_break(self) -> None:
        """Messages may be missing for everyone connected: close them with 1013 so they come
        back with `since` and learn `recovered: false` instead of living with a silent gap."""
        self.metrics.unprovable_breaks.inc()
        for session in list(self.sessions):
            session.close(CloseCode.TRY_AGAIN_LATER, "stream interrupted; resume with since")
        if self.socketio is not None:
            self.socketio.close_all(CloseCode.TRY_AGAIN_LATER, "stream interrupted")

    async def drain(self) -> None:
        """Graceful shutdown; see the module docstring for the order and why."""
        if self.draining:
            return
        self.draining = True
        log.info("draining", extra={"sessions": len(self.sessions)})
        await asyncio.sleep(self.settings.drain_delay_s)
        if self._server is not None:
            await self._stop_listening(self._server)
        window_s = self.settings.drain_close_window_s
        if self.socketio is not None:
            await asyncio.gather(
                self._close_sessions_spread(window_s), self.socketio.drain(window_s)
            )
        else:
            await self._close_sessions_spread(window_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(self.settings.shutdown_cleanup_s):
                await self.subscription.close(delete=True)
                await self.broker.close()
        except TimeoutError:
            log.warning("cleanup timed out; the subscription expires after a day unused")
        for connection in list(self.http_connections):
            connection.close_idle()
        log.info("drained")

    @staticmethod
    async def _stop_listening(server: asyncio.Server) -> None:
        """Closes the listening socket without stranding a client that connected just then.

        Python 3.11's selector event loop accepts a connection, then attaches it to the server
        one loop iteration later; a server closed in between fails that attach (an assertion,
        swallowed) and leaks the accepted socket, open and never answered, so that client hangs
        (a long poll after a drain did). So: stop accepting, let what was accepted attach (it is
        served as any connection of a draining pod), then close: whatever waits in the kernel's
        backlog is refused. (uvloop accepts differently; its `remove_reader` is a no-op here.)
        """
        loop = asyncio.get_running_loop()
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        await asyncio.sleep(0)
        server.close()

    async def _close_sessions_spread(self, window_s: float) -> None:
        """Closes every session with 1012, spread evenly so clients do not all return at once."""
        sessions = list(self.sessions)
        if not sessions:
            return
        step = window_s / len(sessions)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index, session in enumerate(sessions):
            delay = start + index * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            session.close(CloseCode.RESTART, "server restarting")
        if self.sessions:
            self._no_sessions.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_sessions.wait(), self.settings.close_timeout_s)
        for session in list(self.sessions):
            session.abort()

    # -- connections -------------------------------------------------------------------------
    def admit(self, request: Request) -> Claims | Refusal | None:
        """The client's claims (None when tokens are off), or why the upgrade is refused."""
        if not self.ready:
            return Refusal(503, "not_ready", "this pod is draining or not ready; try another")
        if not origin_allowed(request.header("origin"), self.settings.origins):
            return Refusal(403, "origin", "origin not allowed")
        socketio_sessions = len(self.socketio.sessions) if self.socketio is not None else 0
        if len(self.sessions) + socketio_sessions >= self.settings.max_connections:
            return Refusal(503, "capacity", "this pod is at its connection limit; try another")
        if not self.settings.token_secret:
            return None
        token = request.query_value("token")
        if not token:
            return Refusal(401, "no_token", "a token is required: /ws?token=<jwt>")
        try:
            return verify_token(token, self.settings.token_secret)
        except InvalidToken:
            return Refusal(401, "bad_token", "invalid or expired token")

    def session_opened(self, session: Session) -> None:
        self.sessions.add(session)
        self.metrics.connections_opened.inc()

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._no_sessions.set()

    def refresh_gauges(self) -> None:
        self.metrics.connections.set(len(self.sessions))
        self.metrics.subscriptions.set(self.hub.subscription_count)
        self.metrics.history_messages.set(self.history.message_count)
        self.metrics.history_channels.set(self.history.channel_count)

    async def _maintain(self) -> None:
        """Once a tick: ping idle sessions, drop dead ones; now and then expire old history."""
        settings = self.settings
        next_expiry = time.monotonic() + HISTORY_EXPIRE_EVERY_S
        while True:
            await asyncio.sleep(MAINTENANCE_TICK_S)
            now = time.monotonic()
            for session in list(self.sessions):
                if not session.open:
                    continue
                if session.stalled():
                    session.close_slow()
                elif now >= session.max_age_at:
                    session.close(CloseCode.RESTART, "maximum connection age")
                elif session.ping_sent_at is not None:
                    if now - session.ping_sent_at > settings.ping_timeout_s:
                        self.metrics.closes.labels("ping_timeout").inc()
                        session.abort()
                elif now - session.last_seen > settings.ping_interval_s:
                    session.ping_sent_at = now
                    session.protocol.send_ping(b"pubsock")
                    flush(session.protocol, session.transport)
            if (
                self.pump.backlog_until_ms is not None
                and self.pump.backlog_quiet_s() >= settings.warm_quiet_s
            ):
                self.pump.end_backlog()
            if now >= next_expiry:
                self.history.expire()
                next_expiry = now + HISTORY_EXPIRE_EVERY_S
            heard = max(self.presence.last_own_heard, self.pump.opened_at)
            if self.pump.healthy and now - heard > settings.deaf_after_s:
                log.warning(
                    "deaf: our own presence announcements stopped coming back; resubscribing",
                    extra={
                        "silent_s": round(now - heard, 1),
                        "announcements_sent": self.presence.announcements_sent,
                    },
                )
                heard_ms = int((time.time() - (now - self.presence.last_own_heard)) * 1000)
                self.presence.restart_silence()
                self.track(asyncio.get_running_loop().create_task(self.pump.restart_deaf(heard_ms)))
            self.refresh_gauges()
