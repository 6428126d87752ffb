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
from typing import TYPE_CHECKING

from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.core.closecodes import CloseCode
from services.socket.guards import SendBudget
from services.socket.http import Request
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
from services.socket.wsframe import MessageAssembler, flush, text_frame

if TYPE_CHECKING:
    from services.socket.gateway import Connection
    from services.socket.socketio.server import SocketIOServer

log = logging.getLogger(__name__)

# uvloop's timers have millisecond resolution and may fire a little early: the rest is waited out
# with a timer of at least this (never a spin of zero-delay timers).
TIMER_MIN_S = 0.001


class WsTransport:
    """A websocket carrying Engine.IO packets; it is the gateway connection's `session`."""

    __slots__ = (
        "_assembler",
        "_close_timer",
        "_ended",
        "_server",
        "engine",
        "open",
        "probing",
        "protocol",
        "transport",
    )

    def __init__(
        self,
        server: SocketIOServer,
        transport: asyncio.Transport,
        protocol: ServerProtocol,
        engine: EngineSession,
        probing: bool,
    ) -> None:
        self._server = server
        self.transport = transport
        self.protocol = protocol
        self.engine = engine
        self.probing = probing
        self.open = True
        self._ended = False
        self._assembler = MessageAssembler()
        self._close_timer: asyncio.TimerHandle | None = None

    # -- writing -----------------------------------------------------------------------------
    def write(self, packet: bytes) -> None:
        if self.open:
            self.transport.write(text_frame(packet))

    def _flush(self) -> None:
        flush(self.protocol, self.transport)

    # -- reading (the gateway calls feed, abort, connection_lost) ------------------------------
    def feed(self, data: bytes) -> None:
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
        self._flush()
        if self.protocol.state is State.CLOSING or self.protocol.state is State.CLOSED:
            self.open = False
            self._arm_close_timer()
            self._end()

    def _on_frame(self, frame: Frame) -> None:
        message = self._assembler.add(frame)
        if message is not None:
            self._on_message(*message)

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
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            self._flush()
        self._arm_close_timer()

    def abort(self) -> None:
        self.open = False
        self.transport.abort()
        self._end()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(
                self._server.settings.close_timeout_s, self.transport.abort
            )

    def connection_lost(self) -> None:
        self.open = False
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self.engine.transport_closed(self)


class EngineSession:
    """One Engine.IO session; `SioSession` adds the Socket.IO layer on top."""

    __slots__ = (
        "_budget",
        "_flush_handle",
        "_interval_s",
        "_poll",
        "_timeout_s",
        "_timer",
        "_timer_at",
        "closing",
        "deadline",
        "max_age_at",
        "next_ping_at",
        "open",
        "opened_at",
        "ping_deadline",
        "probe",
        "queue",
        "queued_bytes",
        "server",
        "sid",
        "upgrading",
        "wire",
        "ws",
    )

    def __init__(self, server: SocketIOServer, sid: str) -> None:
        settings = server.settings
        now = time.monotonic()
        self.server = server
        self.sid = sid
        self.ws: WsTransport | None = None
        self.wire: asyncio.Transport | None = None  # the websocket's TCP transport, for deliver
        self.probe: WsTransport | None = None
        self.upgrading = False
        self.open = True
        self.closing = False  # a close packet waits in the poll queue
        self.queue: list[bytes] = []
        self.queued_bytes = 0
        self._budget = SendBudget(settings.send_buffer_max_bytes)
        self._poll: tuple[Connection, Request] | None = None
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

    def deliver(self, packet: bytes, frame: bytes) -> bool:
        """A live message (packet for polling, frame for the websocket); False when the unsent
        data is over budget (then the caller closes us). The websocket path is the native
        session's, inline: the same work per delivery."""
        if not self.open:
            return True
        transport = self.wire
        if transport is not None:
            buffered = transport.get_write_buffer_size()
            # usually 0: the kernel took everything written so far
            if buffered and not self._budget.admits(buffered):
                return False
            transport.write(frame)
            return True
        if not self._budget.admits(self.queued_bytes):
            return False
        self.queue.append(packet)
        self.queued_bytes += len(packet)
        self._schedule_flush()
        return True

    def replayed(self) -> None:
        """A replay is bounded by what the client asked for: do not count it against live data."""
        ws = self.ws
        unsent = ws.transport.get_write_buffer_size() if ws is not None else self.queued_bytes
        self._budget.replayed(unsent)

    # -- long-polling ------------------------------------------------------------------------
    def poll(self, connection: Connection, request: Request) -> bytes | None:
        """A GET: answered now when something is queued, else held until something is."""
        if self._poll is not None:  # two polls at once: engine.io ends the session
            self.terminate("poll overlap")
            return self.server.error_response(request, 400, 3)
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
            self.server.forget(self)
            self.arm()  # nothing is pending any more: the timer goes
        return self.server.polling_response(request, body)

    def post(self, request: Request) -> bytes:
        if not self.open:  # closing: the close packet waits for the next poll
            return self.server.post_response(request)
        try:
            packets = decode_payload(request.body)
        except PacketError:
            self.terminate("parse error")
            return self.server.error_response(request, 400, 3)
        for packet in packets:
            if not self.open:
                break
            self.on_text(packet)
        return self.server.post_response(request)

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
        self.deadline = time.monotonic() + self.server.settings.socketio_upgrade_timeout_s
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
            connection.release(request, self.server.polling_response(request, NOOP))
        self.ws = ws
        self.wire = ws.transport
        queued, self.queue, self.queued_bytes = self.queue, [], 0
        self._budget.drained()
        for packet in queued:
            ws.write(packet)
        self.server.upgraded()

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
                self.server.ping_timeouts.inc()
                self.terminate("ping timeout")
        elif now >= self.next_ping_at:
            # The pong is due pingTimeout after the ping was; a ping late because the loop was
            # busy still leaves the client at least half of pingTimeout.
            self.ping_deadline = max(self.next_ping_at + self._timeout_s, now + self._timeout_s / 2)
            self.send(PING)

    def maintain(self, now: float) -> None:
        """About twice a second (the server's loop): send budget and maximum age."""
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
        return self._budget.stalled(
            wire.get_write_buffer_size() if wire is not None else self.queued_bytes
        )

    def close(self, code: CloseCode, reason: str) -> None:
        """Ends the session so that the client reconnects at once: a websocket close with
        `code`, or an Engine.IO close packet on the next poll."""
        if not self.open:
            return
        self.server.metrics_close(code)
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
        self.server.slow_closes.inc()
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
            self.server.forget(self)
            self.arm()  # nothing is pending any more: the timer goes
        if not self.open:
            return
        self._end(reason)
        held, self._poll = self._poll, None
        if held is not None:
            connection, request = held
            connection.release(request, self.server.polling_response(request, poll_answer))
        if self.ws is not None:
            self.ws.abort()

    def _end(self, reason: str) -> None:
        self.open = False
        self.arm()  # nothing is pending any more: the timer goes
        self.queue = []
        self.queued_bytes = 0
        self.server.forget(self)
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close(CloseCode.NORMAL)
        self.on_closed(reason)
