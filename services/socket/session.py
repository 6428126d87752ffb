"""One websocket connection: reads client frames, writes server frames within a send budget.

The websocket protocol itself (framing, control frames, the closing handshake) is websockets'
sans-I/O `ServerProtocol`; this class wires it to an asyncio transport and to the hub.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING

import orjson
from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.core.auth import Claims, InvalidToken, verify_token
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
from services.socket.guards import Flood, FloodGuard, SendBudget, TokenExpiry
from services.socket.wsframe import MessageAssembler, flush, text_frame

if TYPE_CHECKING:
    from services.socket.pod import Pod

log = logging.getLogger(__name__)


class Session:
    __slots__ = (
        "_assembler",
        "_backlog",
        "_budget",
        "_busy",
        "_close_timer",
        "_expiry",
        "_flood",
        "_pod",
        "channels",
        "claims",
        "last_seen",
        "max_age_at",
        "open",
        "opened_at",
        "ping_sent_at",
        "presence_channels",
        "protocol",
        "transport",
    )

    def __init__(
        self,
        pod: Pod,
        transport: asyncio.Transport,
        protocol: ServerProtocol,
        claims: Claims | None,
    ) -> None:
        self._pod = pod
        self.transport = transport
        self.protocol = protocol
        self.claims = claims
        self.channels: set[str] = set()
        self.presence_channels: set[str] = set()
        self.open = True
        self.opened_at = self.last_seen = time.monotonic()
        # Closed with 1012 at this age (jitter ±10 %), before the load balancer's backend
        # timeout cuts it mid-stream.
        age_s = pod.settings.max_connection_age_s
        self.max_age_at = self.opened_at + age_s * random.uniform(0.9, 1.1)
        self.ping_sent_at: float | None = None
        self._budget = SendBudget(pod.settings.send_buffer_max_bytes)
        self._busy = False  # a subscribe is waiting for recovery: later frames queue behind it
        self._backlog: deque[ClientFrame] = deque()
        self._assembler = MessageAssembler()
        self._close_timer: asyncio.TimerHandle | None = None
        settings = pod.settings
        self._flood = FloodGuard(settings.client_frames_per_s, settings.client_frames_burst)
        self._expiry = TokenExpiry(self._expired)
        self._expiry.schedule(claims)

    @property
    def sub(self) -> str | None:
        return self.claims.sub if self.claims is not None else None

    def _expired(self) -> None:
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    # -- writing -----------------------------------------------------------------------------
    def deliver(self, frame: bytes) -> bool:
        """Writes a live frame unless the unsent data is over budget (then the hub closes us)."""
        if not self.open:
            return True
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        # usually 0: the kernel took everything written so far
        if buffered and not self._budget.admits(buffered):
            return False
        transport.write(frame)
        return True

    def stalled(self) -> bool:
        """Once a maintenance tick: over the send budget since the last tick (SendBudget)."""
        return self.open and self._budget.stalled(self.transport.get_write_buffer_size())

    def send(self, payload: bytes) -> None:
        """A control or replay frame: always written (bounded by what the client asked for)."""
        if self.open:
            self.transport.write(text_frame(payload))

    def _flush(self) -> None:
        flush(self.protocol, self.transport)

    # -- reading -----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        self.ping_sent_at = None
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
        self._flush()
        if self.protocol.state is State.CLOSING or self.protocol.state is State.CLOSED:
            self._closing()

    def _on_frame(self, frame: Frame) -> None:
        message = self._assembler.add(frame)
        if message is not None:
            self._on_message(*message)

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
            self._pod.metrics.floods_closed.inc()
            self.close(CloseCode.TRY_AGAIN_LATER, "too many frames")
        return False

    def send_error(self, exc: ProtocolError) -> None:
        self._pod.metrics.client_errors.labels(exc.code).inc()
        self.send(error_frame(exc.code, str(exc), exc.channel))

    def _handle(self, frame: ClientFrame) -> None:
        if isinstance(frame, Subscribe):
            self._subscribe(frame)
        elif isinstance(frame, Unsubscribe):
            if self._pod.hub.remove(frame.channel, self):
                self.channels.discard(frame.channel)
                self.presence_channels.discard(frame.channel)
            self.send(unsubscribed_frame(frame.channel))
        elif isinstance(frame, Ping):
            self.send(pong_frame(self._pod.settings.pod_name))
        elif isinstance(frame, Refresh):
            self._refresh(frame.token)
        elif isinstance(frame, PresenceQuery):
            if self._forbidden(frame.channel):
                return
            count, members = self._pod.presence.count(frame.channel)
            reply: dict[str, object] = {
                "type": "presence",
                "channel": frame.channel,
                "count": count,
            }
            if len(members) <= self._pod.settings.presence_members_max:
                reply["members"] = [{"sub": sub} for sub in members]
            self.send(orjson.dumps(reply))

    def _forbidden(self, channel: str) -> bool:
        """Sends `forbidden` and returns True when the token does not allow the channel."""
        if self.claims is None or self.claims.may_subscribe(channel):
            return False
        self.send_error(
            ProtocolError("forbidden", "the token does not allow this channel", channel)
        )
        return True

    def _refresh(self, token: str) -> None:
        secret = self._pod.settings.token_secret
        if not secret:
            self.send_error(ProtocolError("bad_request", "this server does not use tokens"))
            return
        try:
            claims = verify_token(token, secret)
        except InvalidToken:
            self.send_error(ProtocolError("forbidden", "invalid or expired token"))
            return
        if self.claims is not None and claims.sub != self.claims.sub:
            self.send_error(ProtocolError("forbidden", "the new token is for another sub"))
            return
        self.claims = claims
        self._expiry.schedule(claims)
        for channel in [c for c in self.channels if not claims.may_subscribe(c)]:
            self._pod.hub.remove(channel, self)
            self.channels.discard(channel)
            self.presence_channels.discard(channel)
            self.send(unsubscribed_frame(channel))
        self.send(refreshed_frame(claims.exp))

    def _subscribe(self, frame: Subscribe) -> None:
        channel = frame.channel
        if self._forbidden(channel):
            return
        if channel not in self.channels and (
            len(self.channels) >= self._pod.settings.max_subscriptions_per_connection
        ):
            self.send_error(ProtocolError("limit", "too many subscriptions", channel))
            return
        rewind = frame.rewind
        if rewind is not None:
            settings = self._pod.settings
            try:
                rewind = rewind.within_limits(
                    settings.rewind_max_count, settings.rewind_max_s, channel
                )
            except ProtocolError as exc:
                self.send_error(exc)
                return
        if frame.since is None:
            self._attach(channel, None, frame.presence, rewind)
            return
        self._busy = True
        task = asyncio.get_running_loop().create_task(
            self._subscribe_since(channel, frame.since, frame.presence, rewind)
        )
        self._pod.track(task)

    async def _subscribe_since(
        self, channel: str, since: str, presence: bool, rewind: RewindSpec | None = None
    ) -> None:
        try:
            recovery = await self._pod.hub.recover(channel, since)
            if self.open:
                # No await between taking the history slice and joining the live stream.
                # A rewind is served only when `since` cannot be: the client rebuilds from it.
                self._attach(
                    channel, recovery.recovered, presence, None if recovery.recovered else rewind
                )
                for entry in recovery.entries:
                    self.send_raw(entry.frame)
                self._budget.replayed(self.transport.get_write_buffer_size())
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
        hub = self._pod.hub
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
        self._budget.replayed(self.transport.get_write_buffer_size())

    # -- closing -----------------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str = "") -> None:
        """Starts the closing handshake; the TCP connection is cut if the client never answers."""
        if not self.open:
            return
        self._detach()
        self._pod.metrics.closes.labels(str(int(code))).inc()
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(int(code), reason)
            self._flush()
        self._arm_close_timer()

    def close_slow(self) -> None:
        """Over the send budget: close with 1013 and flush what fits; never wait for the client."""
        if not self.open:
            return
        self._pod.metrics.slow_consumer_closes.inc()
        self.close(CloseCode.TRY_AGAIN_LATER, "too slow to keep up")
        self.transport.close()

    def abort(self) -> None:
        self._detach()
        self.transport.abort()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(
                self._pod.settings.close_timeout_s, self.transport.abort
            )

    def _closing(self) -> None:
        """The client started or finished the closing handshake."""
        self._detach()
        self._arm_close_timer()

    def _detach(self) -> None:
        self._expiry.cancel()
        if self.open:
            self.open = False
            self._pod.hub.remove_all(self.channels, self)
            self.channels.clear()
            self.presence_channels.clear()
            self._backlog.clear()

    def connection_lost(self) -> None:
        self._detach()
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._pod.session_closed(self)
