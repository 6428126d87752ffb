"""The native websocket (`/ws`): one connection reads client frames, writes server frames
within a send budget.

The websocket protocol itself (framing, control frames, the closing handshake) is websockets'
sans-I/O `ServerProtocol`; `Session` wires it to an asyncio transport and to the hub, as a
`Subscriber` (delivery.py) and a `LiveSession` of the pod's registry. `NativeEndpoint` admits the
upgrade.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque

import orjson
from websockets.server import ServerProtocol

from services.core.auth import Claims
from services.core.closecodes import CloseCode
from services.core.protocol import (
    ClientFrame,
    Ping,
    PresenceQuery,
    ProtocolError,
    Refresh,
    RewindSpec,
    Subscribe,
    Unsubscribe,
    error_frame,
    parse_client_frame,
    pong_frame,
    refreshed_frame,
    subscribed_frame,
    unsubscribed_frame,
)
from services.socket.access import Refusal, TokenRefused
from services.socket.delivery import NATIVE, Framing, Wire
from services.socket.endpoint import HttpConnection
from services.socket.guards import Flood, FloodGuard, TokenExpiry
from services.socket.http import Request, json_response
from services.socket.parts import SessionParts
from services.socket.wsframe import text_frame
from services.socket.wslink import WsLink

log = logging.getLogger(__name__)


class Session:
    __slots__ = (
        "_backlog",
        "_busy",
        "_expiry",
        "_flood",
        "_parts",
        "channels",
        "claims",
        "last_seen",
        "link",
        "max_age_at",
        "open",
        "opened_at",
        "ping_sent_at",
        "presence_channels",
        "transport",
        "wire",
    )

    framing: Framing = NATIVE

    def __init__(
        self,
        parts: SessionParts,
        transport: asyncio.Transport,
        protocol: ServerProtocol,
        claims: Claims | None,
    ) -> None:
        self._parts = parts
        limits = parts.limits
        self.transport = transport
        self.wire = Wire(transport, limits.send_buffer_max_bytes)
        self.link = WsLink(transport, protocol, limits.close_timeout_s)
        self.claims = claims
        self.channels: set[str] = set()
        self.presence_channels: set[str] = set()
        self.open = True
        self.opened_at = self.last_seen = time.monotonic()
        # Closed with 1012 at this age (jitter ±10 %), before the load balancer's backend
        # timeout cuts it mid-stream.
        age_s = limits.max_connection_age_s
        self.max_age_at = self.opened_at + age_s * random.uniform(0.9, 1.1)
        self.ping_sent_at: float | None = None
        self._busy = False  # a subscribe is waiting for recovery: later frames queue behind it
        self._backlog: deque[ClientFrame] = deque()
        self._flood = FloodGuard(limits.client_frames_per_s, limits.client_frames_burst)
        self._expiry = TokenExpiry(self._expired)
        self._expiry.schedule(claims)

    @property
    def sub(self) -> str | None:
        return self.claims.sub if self.claims is not None else None

    def _expired(self) -> None:
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    # -- writing -----------------------------------------------------------------------------
    def deliver(self, data: bytes) -> bool:
        """Writes live frames unless the unsent data is over budget (then the hub closes us)."""
        return self.wire.deliver(data) if self.open else True

    def deliver_batch(self, frames: list[bytes]) -> bool:
        return self.deliver(b"".join(frames))

    def maintain(self, now: float) -> None:
        """A maintenance tick: send budget, maximum age, then the websocket ping."""
        if not self.open:
            return
        limits = self._parts.limits
        if self.wire.stalled():
            self.close_slow()
        elif now >= self.max_age_at:
            self.close(CloseCode.RESTART, "maximum connection age")
        elif self.ping_sent_at is not None:
            if now - self.ping_sent_at > limits.ping_timeout_s:
                self._parts.metrics.closes.labels("ping_timeout").inc()
                self.abort()
        elif now - self.last_seen > limits.ping_interval_s:
            self.ping_sent_at = now
            self.link.ping(b"pubsock")

    def send(self, payload: bytes) -> None:
        """A control or replay frame: always written (bounded by what the client asked for)."""
        if self.open:
            self.transport.write(text_frame(payload))

    # -- reading -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.ping_sent_at = None
        if self.link.receive(data, self._on_message):
            self._closing()

    def _on_message(self, data: bytes, is_text: bool) -> None:
        if not self.open or not self._within_rate():
            return
        try:
            if not is_text:
                raise ProtocolError("bad_request", "binary frames are not supported")
            frame = parse_client_frame(data)
        except ProtocolError as exc:
            self.send_error(exc)
            return
        if self._busy:
            self._backlog.append(frame)
        else:
            self._handle(frame)

    def _within_rate(self) -> bool:
        """Client frames per second: over the budget a `limit` error, still flooding 1013."""
        verdict = self._flood.check()
        if verdict is Flood.OK:
            return True
        if verdict is Flood.FIRST:
            self.send_error(ProtocolError("limit", "too many frames per second"))
        elif verdict is Flood.CLOSE:
            self._parts.metrics.floods_closed.inc()
            self.close(CloseCode.TRY_AGAIN_LATER, "too many frames")
        return False

    def send_error(self, exc: ProtocolError) -> None:
        self._parts.metrics.client_errors.labels(exc.code).inc()
        self.send(error_frame(exc.code, str(exc), exc.channel))

    def _handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Subscribe):
            self._subscribe(frame)
        elif isinstance(frame, Unsubscribe):
            if self._parts.hub.remove(frame.channel, self):
                self.channels.discard(frame.channel)
                self.presence_channels.discard(frame.channel)
            self.send(unsubscribed_frame(frame.channel))
        elif isinstance(frame, Ping):
            self.send(pong_frame(self._parts.limits.pod_name))
        elif isinstance(frame, Refresh):
            self._refresh(frame.token)
        elif isinstance(frame, PresenceQuery):
            if self._forbidden(frame.channel):
                return
            summary = self._parts.presence.summary(
                frame.channel, self._parts.limits.presence_members_max
            )
            self.send(orjson.dumps({"type": "presence", "channel": frame.channel, **summary}))

    def _forbidden(self, channel: str) -> bool:
        """Sends `forbidden` and returns True when the token does not allow the channel."""
        if self.claims is None or self.claims.may_subscribe(channel):
            return False
        self.send_error(
            ProtocolError("forbidden", "the token does not allow this channel", channel)
        )
        return True

    def _refresh(self, token: str) -> None:
        try:
            claims = self._parts.access.refresh(self.claims, token)
        except TokenRefused as refused:
            self.send_error(ProtocolError(refused.code, str(refused)))
            return
        self.claims = claims
        self._expiry.schedule(claims)
        for channel in [c for c in self.channels if not claims.may_subscribe(c)]:
            self._parts.hub.remove(channel, self)
            self.channels.discard(channel)
            self.presence_channels.discard(channel)
            self.send(unsubscribed_frame(channel))
        self.send(refreshed_frame(claims.exp))

    def _subscribe(self, frame: Subscribe) -> None:
        channel = frame.channel
        if self._forbidden(channel):
            return
        if channel not in self.channels and (
            len(self.channels) >= self._parts.limits.max_subscriptions_per_connection
        ):
            self.send_error(ProtocolError("limit", "too many subscriptions", channel))
            return
        rewind = frame.rewind
        if rewind is not None:
            limits = self._parts.limits
            try:
                rewind = rewind.within_limits(limits.rewind_max_count, limits.rewind_max_s, channel)
            except ProtocolError as exc:
                self.send_error(exc)
                return
        if frame.since is None:
            self._attach(channel, None, frame.presence, rewind)
            return
        self._busy = True
        self._parts.spawn(self._subscribe_since(channel, frame.since, frame.presence, rewind))

    async def _subscribe_since(
        self, channel: str, since: str, presence: bool, rewind: RewindSpec | None = None
    ) -> None:
        try:
            recovery = await self._parts.hub.recover(channel, since)
            if self.open:
                # No await between taking the history slice and joining the live stream.
                # A rewind is served only when `since` cannot be: the client rebuilds from it.
                self._attach(
                    channel, recovery.recovered, presence, None if recovery.recovered else rewind
                )
                for entry in recovery.entries:
                    self.send_raw(entry.frame)
                self.wire.replayed()
        finally:
            self._busy = False
            while self._backlog and not self._busy and self.open:
                self._handle(self._backlog.popleft())

    def wants_presence(self, channel: str) -> bool:
        return channel in self.presence_channels

    def send_raw(self, frame: bytes) -> None:
        if self.open:
            self.transport.write(frame)

    def _attach(
        self,
        channel: str,
        recovered: bool | None,
        presence: bool,
        rewind: RewindSpec | None = None,
    ) -> None:
        """Joins the live stream. The session's own join is not sent to itself: it listens for
        presence events only from after it joined. A rewind's messages follow the answer, before
        any live one (no await between the history slice and joining); only for a channel the
        connection is not in yet, which already got them."""
        hub = self._parts.hub
        rewound = None
        if channel not in self.channels:  # a repeated subscribe keeps its place
            if rewind is not None:
                rewound = hub.rewind(channel, rewind.count, rewind.seconds)
            hub.add(channel, self)
            self.channels.add(channel)
        if presence:
            self.presence_channels.add(channel)
        else:
            self.presence_channels.discard(channel)
        position = hub.history.position(channel)
        if rewound is None:
            self.send(subscribed_frame(channel, position, recovered))
            return
        answer = subscribed_frame(
            channel, position, recovered, (len(rewound.entries), rewound.complete)
        )
        # The answer and the messages in one write (one system call), not one per message.
        self.send_raw(b"".join([text_frame(answer), *[entry.frame for entry in rewound.entries]]))
        self.wire.replayed()

    # -- closing -----------------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str = "") -> None:
        """Starts the closing handshake; the TCP connection is cut if the client never answers."""
        if not self.open:
            return
        self._detach()
        self._parts.metrics.closes.labels(str(int(code))).inc()
        self.link.close(int(code), reason)

    def close_slow(self) -> None:
        """Over the send budget: close with 1013 and flush what fits; never wait for the client."""
        if not self.open:
            return
        self._parts.metrics.slow_consumer_closes.inc()
        self.close(CloseCode.TRY_AGAIN_LATER, "too slow to keep up")
        self.transport.close()

    def abort(self) -> None:
        self._detach()
        self.transport.abort()

    def _closing(self) -> None:
        """The client started or finished the closing handshake."""
        self._detach()
        self.link.arm_close_timer()

    def _detach(self) -> None:
        self._expiry.cancel()
        if self.open:
            self.open = False
            self._parts.hub.remove_all(self.channels, self)
            self.channels.clear()
            self.presence_channels.clear()
            self._backlog.clear()

    def connection_lost(self) -> None:
        self._detach()
        self.link.connection_lost()
        self._parts.registry.closed(self)


class NativeEndpoint:
    """`/ws`: admits a websocket upgrade (readiness, origin, capacity, token) and opens a
    `Session` on it."""

    def __init__(self, parts: SessionParts) -> None:
        self._parts = parts

    def handles(self, request: Request) -> bool:
        return request.path == "/ws" and request.is_websocket_upgrade

    def handle(self, connection: HttpConnection, request: Request) -> bytes | None:
        parts = self._parts
        refusal = parts.access.admit(request.header("origin"))
        if refusal is None:
            try:
                claims = parts.access.authenticate(request.query_value("token"), "/ws?token=<jwt>")
            except TokenRefused as refused:
                refusal = Refusal(401, refused.reason, str(refused))
        if refusal is not None:
            status, reason, detail = refusal
            parts.metrics.handshake_rejections.labels(reason).inc()
            headers = {"Retry-After": "5"} if status == 503 else None
            connection.refuse(
                json_response(status, {"detail": detail}, headers=headers, keep_alive=False)
            )
            return None

        def open_session(transport: asyncio.Transport, protocol: ServerProtocol) -> Session:
            session = Session(parts, transport, protocol, claims)
            parts.registry.opened(session)
            parts.metrics.connections_opened.inc()
            return session

        connection.upgrade_with(request, open_session)
        return None
