"""Engine.IO sessions: one client over HTTP long-polling or a websocket, upgraded in place.

A session starts on either transport. Long-polling: a GET is held until packets are queued (the
server's ping every pingInterval bounds the wait), a POST carries client packets. Upgrade: the
client opens a websocket with the same `sid`, sends `2probe` (answered `3probe`; from then on a
held poll is answered at once, with `6` noop when nothing is queued, so the client can pause
polling), then `5`: the websocket becomes the session's transport and what was queued goes
there. Heartbeat (protocol 4): the server sends `2` pingInterval after the session opened or
the last `3`, and the client answers `3` within pingTimeout or the session ends.

Deadlines (heartbeat, upgrade, collecting the close packet, Socket.IO CONNECT) are exact, even
sub-second: each session keeps one timer at its earliest deadline, and a request for a session
first applies any deadline that has passed (a poll that comes after the ping timeout is refused,
whichever the event loop ran first).

Everything runs on the event loop, without an `await` per packet: a live message is one write of
pre-built bytes to a websocket, or one append to a poll queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from websockets.server import ServerProtocol

from services.core.closecodes import CloseCode
from services.socket.delivery import Framing, Wire
from services.socket.endpoint import HttpConnection
from services.socket.guards import SendBudget
from services.socket.http import Request
from services.socket.socketio.context import SioContext
from services.socket.socketio.protocol import (
    CLOSE,
    EIO_CLOSE,
    EIO_MESSAGE,
    EIO_NOOP,
    EIO_PING,
    EIO_PONG,
    NOOP,
    PING,
    PROBE,
    PROBE_ANSWER,
    RECORD_SEPARATOR,
    PacketError,
    decode_payload,
)
from services.socket.wsframe import text_frame
from services.socket.wslink import WsLink

log = logging.getLogger(__name__)

# uvloop's timers have millisecond resolution and may fire a little early: the rest is waited out
# with a timer of at least this (never a spin of zero-delay timers).
TIMER_MIN_S = 0.001


class WsTransport:
    """A websocket carrying Engine.IO packets; it owns the gateway connection."""

    __slots__ = ("_ended", "engine", "link", "open", "probing", "transport")

    def __init__(
        self,
        ctx: SioContext,
        transport: asyncio.Transport,
        protocol: ServerProtocol,
        engine: EngineSession,
        probing: bool,
    ) -> None:
        self.transport = transport
        self.link = WsLink(transport, protocol, ctx.settings.close_timeout_s)
        self.engine = engine
        self.probing = probing
        self.open = True
        self._ended = False

    # -- writing -----------------------------------------------------------------------------
    def write(self, packet: bytes) -> None:
        if self.open:
            self.transport.write(text_frame(packet))

    # -- reading (the gateway calls feed, abort, connection_lost) ------------------------------
    def feed(self, data: bytes) -> None:
        if self.link.receive(data, self._on_message):
            self.open = False
            self.link.arm_close_timer()
            self._end()

    def _on_message(self, data: bytes, is_text: bool) -> None:
        if not self.open:
            return
        if self.probing:
            self.engine.on_probe_message(self, data.decode("utf-8", "replace") if is_text else "")
        elif is_text:
            self.engine.on_text(data.decode("utf-8", "replace"))
        else:
            self.engine.on_binary()

    # -- closing -----------------------------------------------------------------------------
    def close(self, code: int, reason: str = "") -> None:
        """Starts the closing handshake; the TCP connection is cut if the client never answers."""
        if not self.open:
            return
        self.open = False
        self.link.close(code, reason)

    def abort(self) -> None:
        self.open = False
        self.transport.abort()
        self._end()

    def connection_lost(self) -> None:
        self.open = False
        self.link.connection_lost()
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self.engine.transport_closed(self)


class EngineSession:
    """One Engine.IO session; `SioSession` adds the Socket.IO layer on top. To the hub it is a
    `Subscriber` whose framing follows its transport (polling packets or websocket frames) and
    its room set; to the pod's registry a `LiveSession`."""

    __slots__ = (
        "_budget",
        "_flush_handle",
        "_interval_s",
        "_poll",
        "_timeout_s",
        "_timer",
        "_timer_at",
        "closing",
        "ctx",
        "deadline",
        "framing",
        "max_age_at",
        "next_ping_at",
        "open",
        "opened_at",
        "ping_deadline",
        "probe",
        "queue",
        "queued_bytes",
        "rooms_suffix",
        "sid",
        "upgrading",
        "wire",
        "ws",
    )

    def __init__(self, ctx: SioContext, sid: str) -> None:
        settings = ctx.settings
        now = time.monotonic()
        self.ctx = ctx
        self.sid = sid
        self.ws: WsTransport | None = None
        self.wire: Wire | None = None  # the websocket's TCP transport, for deliver
        # `~rooms~mac` after each offset once the rooms are not the declared ones (recovery.py)
        self.rooms_suffix: bytes | None = None
        self.framing: Framing = ctx.frames.framing(False, None)
        self.probe: WsTransport | None = None
        self.upgrading = False
        self.open = True
        self.closing = False  # a close packet waits in the poll queue
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        self._budget = SendBudget(settings.send_buffer_max_bytes)
        self._poll: tuple[HttpConnection, Request] | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._interval_s = settings.socketio_ping_interval_s
        self._timeout_s = settings.socketio_ping_timeout_s
        self.opened_at = now
        self.next_ping_at = now + self._interval_s
        self.ping_deadline: float | None = None
        self.deadline: float | None = None  # probe or closing: when to give up
        age_s = settings.max_connection_age_s
        self.max_age_at = now + age_s * random.uniform(0.9, 1.1)
        self._timer: asyncio.TimerHandle | None = None  # at the earliest deadline (`arm`)
        self._timer_at = 0.0

    @property
    def transport_name(self) -> str:
        return "websocket" if self.ws is not None else "polling"

    # -- sending -----------------------------------------------------------------------------
    def send(self, packet: bytes) -> None:
        """A control, ack or replayed packet: always written."""
        if not self.open:
            return
        ws = self.ws
        if ws is not None:
            ws.write(packet)
            return
        self.queue.append(packet)
        self.queued_bytes += len(packet)
        self._schedule_flush()

    def deliver(self, data: bytes) -> bool:
        """A live message as `framing` built it (a websocket frame, or a packet for the poll
        queue); False when the unsent data is over budget (then the hub closes us)."""
        if not self.open:
            return True
        wire = self.wire
        if wire is not None:
            return wire.deliver(data)
        if not self._budget.admits(self.queued_bytes):
            return False
        self.queue.append(data)
        self.queued_bytes += len(data)
        self._schedule_flush()
        return True

    def deliver_batch(self, frames: list[bytes]) -> bool:
        if self.wire is not None or not self.open:
            return self.deliver(b"".join(frames))
        if not self._budget.admits(self.queued_bytes):
            return False
        self.queue.extend(frames)
        self.queued_bytes += sum(map(len, frames))
        self._schedule_flush()
        return True

    def send_raw(self, data: bytes) -> None:
        self.deliver(data)

    def wants_presence(self, channel: str) -> bool:
        return False  # socket.io clients ask with the `presence` event

    def reframe(self) -> None:
        """After the transport or the room set changed: how the hub frames our messages."""
        self.framing = self.ctx.frames.framing(self.wire is not None, self.rooms_suffix)

    def use_websocket(self, ws: WsTransport) -> None:
        self.ws = ws
        self.wire = Wire(ws.transport, self.ctx.settings.send_buffer_max_bytes)
        self.reframe()

    def replayed(self) -> None:
        """A replay is bounded by what the client asked for: do not count it against live data."""
        if self.wire is not None:
            self.wire.replayed()
        else:
            self._budget.replayed(self.queued_bytes)

    # -- long-polling ------------------------------------------------------------------------
    def poll(self, connection: HttpConnection, request: Request) -> bytes | None:
        """A GET: answered now when something is queued, else held until something is."""
        if self._poll is not None:  # two polls at once: engine.io ends the session
            self.terminate("poll overlap")
            return self.ctx.error_response(request, 400, 3)
        if self.queue or self.upgrading or self.closing:
            return self._poll_response(request)
        self._poll = (connection, request)
        connection.hold(self._poll_lost)
        return None

    def _poll_lost(self) -> None:
        self._poll = None  # what is queued waits for the next poll

    def _schedule_flush(self) -> None:
        if self._poll is not None and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_poll)

    def _flush_poll(self) -> None:
        self._flush_handle = None
        held = self._poll
        if held is None or not (self.queue or self.upgrading or self.closing):
            return
        self._poll = None
        connection, request = held
        if not connection.writable():  # gone: what is queued waits for the next poll
            connection.on_lost = None
            return
        connection.release(request, self._poll_response(request))

    def _poll_response(self, request: Request) -> bytes:
        if self.queue:
            body = RECORD_SEPARATOR.join(self.queue)
            self.queue = []
            self.queued_bytes = 0
            self._budget.drained()
        else:
            body = NOOP
        if self.closing:  # the close packet is on its way: the sid is gone
            self.closing = False
            self.ctx.forget(self)
            self.arm()  # nothing is pending any more: the timer goes
        return self.ctx.polling_response(request, body)

    def post(self, request: Request) -> bytes:
        if not self.open:  # closing: the close packet waits for the next poll
            return self.ctx.post_response(request)
        try:
            packets = decode_payload(request.body)
        except PacketError:
            self.terminate("parse error")
            return self.ctx.error_response(request, 400, 3)
        for packet in packets:
            if not self.open:
                break
            self.on_text(packet)
        return self.ctx.post_response(request)

    # -- packets from the client ------------------------------------------------------------
    def on_text(self, text: str) -> None:
        kind = text[:1]
        if kind == EIO_MESSAGE:
            self.on_message(text[1:])
        elif kind == EIO_PONG:
            self.ping_deadline = None
            self.next_ping_at = time.monotonic() + self._interval_s
            self.arm()
        elif kind == EIO_CLOSE:
            # As engine.io: a pending poll ends with a noop (the client closed, it knows).
            self.terminate("client close", poll_answer=NOOP)
        elif kind in (EIO_NOOP, EIO_PING):  # a ping from the client is protocol 3's: ignored
            pass
        elif kind == "b":
            self.on_binary()
        else:
            self.terminate("parse error")

    def on_message(self, text: str) -> None:  # pragma: no cover - SioSession overrides
        raise NotImplementedError

    def on_binary(self) -> None:  # pragma: no cover - SioSession overrides
        raise NotImplementedError

    def on_closed(self, reason: str) -> None:  # pragma: no cover - SioSession overrides
        raise NotImplementedError

    # -- upgrade -----------------------------------------------------------------------------
    def start_probe(self, ws: WsTransport) -> None:
        if self.probe is not None:
            self.probe.close(CloseCode.NORMAL, "another probe")
        self.probe = ws
        self.deadline = time.monotonic() + self.ctx.settings.socketio_upgrade_timeout_s
        self.arm()

    def on_probe_message(self, ws: WsTransport, text: str) -> None:
        if ws is not self.probe or not self.open:
            ws.close(CloseCode.NORMAL)
            return
        if text == PROBE:
            ws.write(PROBE_ANSWER)
            self.upgrading = True
            self._schedule_flush()  # a held poll returns now, so the client can pause polling
        elif text == "5" and self.upgrading:
            self._upgrade(ws)
        else:
            self._probe_failed(ws)

    def _upgrade(self, ws: WsTransport) -> None:
        self.probe = None
        self.deadline = None
        self.upgrading = False
        ws.probing = False
        held, self._poll = self._poll, None
        if held is not None:
            connection, request = held
            connection.release(request, self.ctx.polling_response(request, NOOP))
        self.use_websocket(ws)
        queued, self.queue, self.queued_bytes = self.queue, [], 0
        self._budget.drained()
        for packet in queued:
            ws.write(packet)
        self.ctx.upgraded()

    def _probe_failed(self, ws: WsTransport) -> None:
        if ws is self.probe:
            self.probe = None
            self.deadline = None
            self.upgrading = False
        ws.close(CloseCode.NORMAL)

    def transport_closed(self, ws: WsTransport) -> None:
        if ws is self.probe:
            self._probe_failed(ws)
        elif ws is self.ws:
            self.terminate("transport close")

    # -- deadlines, heartbeat and ends -------------------------------------------------------
    def due_at(self) -> float | None:
        """The earliest deadline: when `expire` has something to do (None: nothing pending)."""
        if not self.open:
            return self.deadline if self.closing else None
        due = self.ping_deadline if self.ping_deadline is not None else self.next_ping_at
        if self.deadline is not None and self.deadline < due:
            due = self.deadline
        return due

    def arm(self) -> None:
        """Keeps the session's timer at its earliest deadline; call after moving a deadline."""
        due = self.due_at()
        timer = self._timer
        if timer is not None:
            if due == self._timer_at:
                return
            timer.cancel()
            self._timer = None
        if due is not None:
            self._timer_at = due
            delay = max(0.0, due - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        if now < self._timer_at:  # early by a fraction of a millisecond: wait out the rest
            delay = max(TIMER_MIN_S, self._timer_at - now)
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)
            return
        try:
            self.expire(now)
        except Exception:  # a bug in one session must not leave it without a heartbeat
            log.exception("socket.io session deadline failed")
            self.terminate("internal error")
        self.arm()

    def expire(self, now: float) -> None:
        """Whatever deadline has passed at `now`: a ping due (then its pong is due), a ping
        unanswered, an upgrade not completed, a close packet not collected."""
        if not self.open:  # closing: the close packet waits for a poll, not forever
            if self.closing and self.deadline is not None and now >= self.deadline:
                self.terminate("close not collected")
            return
        if self.deadline is not None and now >= self.deadline and self.probe is not None:
            self._probe_failed(self.probe)
        if self.ping_deadline is not None:
            if now >= self.ping_deadline:
                self.ctx.ping_timeouts.inc()
                self.terminate("ping timeout")
        elif now >= self.next_ping_at:
            # The pong is due pingTimeout after the ping was; a ping late because the loop was
            # busy still leaves the client at least half of pingTimeout.
            self.ping_deadline = max(self.next_ping_at + self._timeout_s, now + self._timeout_s / 2)
            self.send(PING)

    def maintain(self, now: float) -> None:
        """A tick of the pod's maintenance loop: send budget and maximum age."""
        if not self.open:
            return
        if self._stalled():
            self.close_slow()
            return
        if self.ws is not None and now >= self.max_age_at:
            self.close(CloseCode.RESTART, "maximum connection age")

    def _stalled(self) -> bool:
        """Over the send budget since the last tick: stopped reading (or polling) after a burst."""
        wire = self.wire
        return wire.stalled() if wire is not None else self._budget.stalled(self.queued_bytes)

    def abort(self) -> None:
        """The drain's last step for a session that did not end when asked."""
        self.terminate("server stopped")

    def close(self, code: CloseCode, reason: str) -> None:
        """Ends the session so that the client reconnects at once: a websocket close with
        `code`, or an Engine.IO close packet on the next poll."""
        if not self.open:
            return
        self.ctx.metrics_close(code)
        ws = self.ws
        if ws is not None:
            self._end(reason)
            ws.close(int(code), reason)
            return
        self.send(CLOSE)
        self.open = False
        self.closing = True
        self.deadline = time.monotonic() + self._timeout_s
        self.on_closed(reason)
        self._flush_poll()
        self.arm()

    def close_slow(self) -> None:
        """Over the send budget: the websocket gets 1013; a poll queue is dropped (the client's
        next poll is refused with 400 and it reconnects, recovering from history)."""
        if not self.open:
            return
        self.ctx.slow_closes.inc()
        ws = self.ws
        if ws is not None:
            self.close(CloseCode.TRY_AGAIN_LATER, "too slow to keep up")
            ws.transport.close()
        else:
            self.terminate("too slow to keep up")

    def terminate(self, reason: str, poll_answer: bytes = CLOSE) -> None:
        """Ends the session now; a held poll gets `poll_answer` (the close packet by default)."""
        if self.closing:
            self.closing = False
            self.ctx.forget(self)
            self.arm()  # nothing is pending any more: the timer goes
        if not self.open:
            return
        self._end(reason)
        held, self._poll = self._poll, None
        if held is not None:
            connection, request = held
            connection.release(request, self.ctx.polling_response(request, poll_answer))
        if self.ws is not None:
            self.ws.abort()

    def _end(self, reason: str) -> None:
        self.open = False
        self.arm()  # nothing is pending any more: the timer goes
        self.queue = []
        self.queued_bytes = 0
        self.ctx.forget(self)
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close(CloseCode.NORMAL)
        self.on_closed(reason)
