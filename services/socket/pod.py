"""A socket pod: the composition root. It builds the parts (subscription, history, hub, presence,
the session registry, the endpoints of its port) and runs their lifecycle; each part gets only
the narrow dependencies it needs, never the pod.

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

from services.core.broker import Broker, create_broker
from services.core.channels import NamespaceLabeler
from services.core.closecodes import CloseCode
from services.socket.access import Access
from services.socket.endpoint import Endpoint
from services.socket.gateway import Connection, Gateway
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.lifecycle import Lifecycle
from services.socket.metrics import SocketMetrics
from services.socket.parts import SessionLimits, SessionParts
from services.socket.presence import Presence
from services.socket.pump import Pump
from services.socket.routes import Routes
from services.socket.session import NativeEndpoint
from services.socket.sessions import SessionRegistry
from services.socket.settings import SocketSettings
from services.socket.socketio import SocketIOServer
from services.socket.sse import SseEndpoint
from services.socket.tasks import TaskGroup

log = logging.getLogger(__name__)

DEFAULT_WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# Sessions' send budgets, maximum ages and pings, the warm start's end, deafness: this often.
MAINTENANCE_TICK_S = 0.5
HISTORY_EXPIRE_EVERY_S = 10.0


def subscription_name(pod_name: str) -> str:
    """`pubsock-<pod>-<random>`: unique per start, so a restarted pod never reuses a backlog."""
    cleaned = re.sub(r"[^A-Za-z0-9-]", "-", pod_name)[:180] or "pod"
    return f"pubsock-{cleaned}-{secrets.token_hex(4)}"


class Pod:
    def __init__(self, settings: SocketSettings, broker: Broker | None = None) -> None:
        self.settings = settings
        self.metrics = metrics = SocketMetrics()
        self.lifecycle = Lifecycle()
        self.tasks = TaskGroup()
        self.history = History(
            size=settings.history_size,
            age_s=settings.history_age_s,
            max_channels=settings.history_max_channels,
            position_slack_ms=settings.position_slack_ms,
            stream_ms=self._stream_ms,
        )
        self.broker = broker or create_broker(settings)
        self.hub = Hub(self.history, metrics, settings.recovery_wait_s)
        self.presence = Presence(
            settings.pod_name,
            self.broker,
            interval_s=settings.presence_interval_s,
            snapshot_s=settings.presence_snapshot_s,
            ttl_s=settings.presence_ttl_s,
            on_events=self.hub.presence_events,
            on_sent=metrics.presence_announcements.inc,
        )
        self.hub.presence = self.presence
        self.subscription = self.broker.subscription(
            subscription_name(settings.pod_name),
            {"app": "pubsock", "pod": re.sub(r"[^a-z0-9_-]", "-", settings.pod_name.lower())[:63]},
        )
        self.pump = Pump(
            self.subscription,
            self.history,
            self.hub,
            metrics,
            NamespaceLabeler(settings.namespaces),
            on_announcement=self.presence.on_announcement,
            on_unprovable_break=self._unprovable_break,
            warm_window_ms=int(min(settings.history_age_s, settings.topic_retention_s) * 1000),
        )
        # Every kind of session: one registry (capacity, maintenance, drain), one admission.
        self.sessions = SessionRegistry(settings.max_connections)
        lifecycle, sessions = self.lifecycle, self.sessions
        self.access = Access(
            settings.token_secret,
            settings.origins,
            is_ready=lambda: lifecycle.ready,
            is_full=lambda: sessions.full,
        )
        self.socketio = (
            SocketIOServer(
                settings, self.hub, self.broker, self.access, sessions, metrics, self.tasks.spawn
            )
            if settings.socketio_enabled
            else None
        )
        parts = SessionParts(
            hub=self.hub,
            presence=self.presence,
            access=self.access,
            registry=sessions,
            metrics=metrics,
            limits=SessionLimits.from_settings(settings),
            spawn=self.tasks.spawn,
        )
        native = NativeEndpoint(parts)
        endpoints: list[Endpoint] = []
        if settings.sse_enabled:
            endpoints.append(SseEndpoint(parts))
        if self.socketio is not None:
            endpoints.append(self.socketio)
        endpoints.append(native)
        self.routes = Routes(
            settings,
            lifecycle,
            metrics.registry,
            self.refresh_gauges,
            Path(settings.web_dir) if settings.web_dir else DEFAULT_WEB_DIR,
        )
        self.gateway = Gateway(
            pod_name=settings.pod_name,
            max_request_bytes=settings.max_request_bytes,
            max_frame_bytes=settings.max_frame_bytes,
            header_timeout_s=settings.http_header_timeout_s,
            keepalive_s=settings.http_keepalive_s,
            endpoints=endpoints,
            routes=self.routes.handle,
            handshake_rejections=metrics.handshake_rejections,
        )
        self._server: asyncio.Server | None = None
        metrics.ready.set_function(lambda: 1 if lifecycle.ready else 0)

    @property
    def ready(self) -> bool:
        return self.lifecycle.ready

    def _stream_ms(self) -> int:
        """The newest publish time this pod's stream has brought (presence announcements keep
        it within a second or so of the clock while the stream flows)."""
        heard = self.pump.heard_ms
        return heard if heard else int(time.time() * 1000)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.settings.token_secret:
            log.warning("TOKEN_SECRET is empty: websocket clients need no token (open mode)")
        await self.broker.start()
        loop = asyncio.get_running_loop()
        gateway = self.gateway
        self._server = await loop.create_server(
            lambda: Connection(gateway),
            self.settings.host,
            self.settings.port,
            reuse_address=True,
            backlog=4096,
        )
        await self.pump.open()
        self.tasks.spawn(self.pump.run(), name="pump")
        self.tasks.spawn(self.presence.run(), name="presence")
        await self._warm_start()
        self.presence.restart_silence()
        self.tasks.spawn(self._maintain(), name="maintenance")
        self.lifecycle.started = True
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
        self.sessions.close_all(CloseCode.TRY_AGAIN_LATER, "stream interrupted; resume with since")

    async def drain(self) -> None:
        """Graceful shutdown; see the module docstring for the order and why."""
        if self.lifecycle.draining:
            return
        self.lifecycle.draining = True
        log.info("draining", extra={"sessions": len(self.sessions)})
        await asyncio.sleep(self.settings.drain_delay_s)
        if self._server is not None:
            await self._stop_listening(self._server)
        await self.sessions.drain(self.settings.drain_close_window_s, self.settings.close_timeout_s)
        await self.tasks.cancel_all()
        try:
            async with asyncio.timeout(self.settings.shutdown_cleanup_s):
                await self.subscription.close(delete=True)
                await self.broker.close()
        except TimeoutError:
            log.warning("cleanup timed out; the subscription expires after a day unused")
        self.gateway.close_idle()
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

    def refresh_gauges(self) -> None:
        self.metrics.connections.set(len(self.sessions))
        self.metrics.subscriptions.set(self.hub.subscription_count)
        self.metrics.history_messages.set(self.history.message_count)
        self.metrics.history_channels.set(self.history.channel_count)

    async def _maintain(self) -> None:
        """Once a tick: every session's checks (sessions.py), the warm start's end, deafness;
        now and then old history expires."""
        settings = self.settings
        next_expiry = time.monotonic() + HISTORY_EXPIRE_EVERY_S
        while True:
            await asyncio.sleep(MAINTENANCE_TICK_S)
            now = time.monotonic()
            self.sessions.maintain(now)
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
                self.tasks.spawn(self.pump.restart_deaf(heard_ms))
            self.refresh_gauges()
