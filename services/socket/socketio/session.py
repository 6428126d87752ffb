"""The Socket.IO layer of a session: the default namespace, rooms (= channels), acks, recovery.

Client events (each with an optional ack; every ack is one object with `ok`):
- `join` (room | {room, since?, rewind?}) -> {ok, room, position, recovered?, rewound?}
- `leave` (room) -> {ok, room}
- `publish` (room, data) -> {ok, id, room} once Pub/Sub confirmed (same envelope as the HTTP API)
- `presence` (room) -> {ok, room, count, members?}
- `refresh` (token) -> {ok, expires_at}
Errors: {ok: false, code, message} with the websocket error codes (`bad_request`, `bad_channel`,
`forbidden`, `limit`) plus `too_large` and `unavailable` (with `id`: retry with it... via the API).

Server events: the configured message event (data, meta, offset), and with connection state
recovery `pubsock:joined` ({room, position}, offset) / `pubsock:left` ({room}, offset), whose
offsets keep the client's recovery anchor current. See docs/socketio.md.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import deque
from typing import Any

import orjson

from services.core.auth import Claims
from services.core.broker import BrokerBusy, BrokerUnavailable, OutgoingMessage
from services.core.channels import is_valid_channel
from services.core.closecodes import CloseCode
from services.core.envelope import Envelope
from services.core.ids import new_message_id
from services.core.messages import InvalidData, encode_data
from services.core.protocol import ProtocolError, RewindSpec, parse_rewind
from services.socket.access import TokenRefused
from services.socket.guards import Flood, FloodGuard, TokenExpiry
from services.socket.history import Entry, Rewind
from services.socket.socketio.context import SioContext
from services.socket.socketio.engine import EngineSession
from services.socket.socketio.protocol import (
    BINARY_ACK,
    BINARY_EVENT,
    CONNECT,
    DISCONNECT,
    EVENT,
    PacketError,
    SioPacket,
    ack_packet,
    connect_error_packet,
    connect_packet,
    decode,
    event_packet,
)
from services.socket.socketio.recovery import (
    parse_offset,
    room_entry,
    split_room_entry,
    state_offset,
)

log = logging.getLogger(__name__)

JOINED_EVENT = "pubsock:joined"
LEFT_EVENT = "pubsock:left"
POSITION_MAX_CHARS = 128


def _now_ms() -> int:
    return int(time.time() * 1000)


def _error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"ok": False, "code": code, "message": message, **extra}


class Refused(Exception):
    def __init__(self, code: str, message: str, room: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.room = room

    def body(self) -> dict[str, Any]:
        extra = {"room": self.room} if self.room is not None else {}
        return _error(self.code, str(self), **extra)


class SioSession(EngineSession):
    __slots__ = (
        "_backlog",
        "_busy",
        "_expiry",
        "_flood",
        "_fresh",
        "_skip_binary",
        "_unconnected_since",
        "claims",
        "connected",
        "connecting",
        "declared",
        "pid",
        "query_token",
        "rooms",
        "sio_sid",
    )

    def __init__(self, ctx: SioContext, sid: str, query_token: str | None) -> None:
        super().__init__(ctx, sid)
        settings = ctx.settings
        self.query_token = query_token
        self.connected = False
        self.connecting = False
        self.sio_sid: str | None = None
        self.pid: str | None = None
        self.claims: Claims | None = None
        self.rooms: dict[str, None] = {}  # joined, in join order
        self.declared: tuple[str, ...] = ()  # rooms of the CONNECT auth (in the pid)
        # Rooms joined moments ago: their position at the join, and when (recovery.py).
        self._fresh: dict[str, tuple[str, float]] = {}
        self._busy = False  # a join with `since` or a recovery is waiting: later packets queue
        self._backlog: deque[SioPacket] = deque()
        self._flood = FloodGuard(settings.client_frames_per_s, settings.client_frames_burst)
        self._skip_binary = 0
        self._expiry = TokenExpiry(self._expired)
        self._unconnected_since = self.opened_at  # no namespace connected since then

    @property
    def sub(self) -> str | None:
        return self.claims.sub if self.claims is not None else None

    def _connect_deadline(self) -> float | None:
        """No namespace connected (nor a recovery under way) since then: closed at this time."""
        if not self.open or self.connected or self.connecting:
            return None
        return self._unconnected_since + self.ctx.settings.socketio_connect_timeout_s

    def _fresh_until(self) -> float | None:
        """When the oldest room joined moments ago stops being one (recovery.py)."""
        if not self.open or not self._fresh:
            return None
        oldest = min(joined_at for _, joined_at in self._fresh.values())
        return oldest + 2 * self.ctx.settings.position_slack_ms / 1000

    def due_at(self) -> float | None:
        due = super().due_at()
        for other in (self._connect_deadline(), self._fresh_until()):
            if other is not None and (due is None or other < due):
                due = other
        return due

    def expire(self, now: float) -> None:
        super().expire(now)
        fresh_until = self._fresh_until()
        if fresh_until is not None and now >= fresh_until:
            window = 2 * self.ctx.settings.position_slack_ms / 1000
            for room, (_, joined_at) in list(self._fresh.items()):
                if now - joined_at >= window:
                    del self._fresh[room]
            self._rooms_changed()  # offsets from now on without those join positions
        connect = self._connect_deadline()
        if connect is not None and now >= connect:
            self.terminate("no socket.io CONNECT")

    # -- packets -----------------------------------------------------------------------------
    def on_message(self, text: str) -> None:
        try:
            packet = decode(text)
        except PacketError:
            self.terminate("parse error")
            return
        if not self._within_rate(packet):
            return
        if packet.type == CONNECT:
            self._on_connect(packet)
            return
        if packet.type in (BINARY_EVENT, BINARY_ACK):
            self._skip_binary = packet.attachments
            if packet.type == BINARY_EVENT and packet.id is not None and self.connected:
                self._ack(packet.id, _error("bad_request", "binary attachments are not supported"))
            return
        if packet.nsp != "/" or not self.connected:
            return
        if packet.type == DISCONNECT:
            self._detach()
            return
        if packet.type == EVENT:
            if self._busy:
                self._backlog.append(packet)
            else:
                self._on_event(packet)
        # ACK: this server never asks a client for an ack.

    def on_binary(self) -> None:
        if self._skip_binary > 0:
            self._skip_binary -= 1  # an attachment of a refused binary packet

    def _within_rate(self, packet: SioPacket) -> bool:
        """Client packets per second (CONNECTs too: each verifies a token): over the budget a
        `limit` ack where one was asked for, still flooding 1013."""
        verdict = self._flood.check()
        if verdict is Flood.OK:
            return True
        if packet.type == EVENT and packet.id is not None and self.connected:
            self._ack(packet.id, _error("limit", "too many events per second"))
        if verdict is Flood.CLOSE:
            self.ctx.floods_closed()
            self.close(CloseCode.TRY_AGAIN_LATER, "too many events")
        return False

    def _ack(self, ack_id: int | None, body: dict[str, Any]) -> None:
        if ack_id is not None:
            self.send(ack_packet(ack_id, [body]))

    def _emit(self, *args: Any) -> None:
        self.send(event_packet(list(args)))

    # -- CONNECT -----------------------------------------------------------------------------
    def _on_connect(self, packet: SioPacket) -> None:
        ctx = self.ctx
        if packet.nsp != "/":
            self.send(connect_error_packet(packet.nsp, "Invalid namespace"))
            ctx.connects.labels("refused").inc()
            return
        if self.connected or self.connecting:
            return
        auth: dict[str, Any] = packet.data or {}
        token = auth.get("token")
        try:
            claims = ctx.authenticate(token if isinstance(token, str) else self.query_token)
        except TokenRefused as refused:
            self._connect_error(Refused(refused.code, str(refused)))
            return
        if ctx.recovery and isinstance(auth.get("pid"), str):
            self.connecting = True
            self._busy = True
            ctx.spawn(self._reconnect(auth, claims))
        else:
            self._connect(auth, claims)

    def _connect_error(self, refused: Refused) -> None:
        data: dict[str, Any] = {"code": refused.code}
        if refused.room is not None:
            data["room"] = refused.room
        self.send(connect_error_packet("/", str(refused), data))
        self.ctx.connects.labels("refused").inc()

    def _connect(self, auth: dict[str, Any], claims: Claims | None, result: str = "new") -> None:
        """A new Socket.IO session: new id and pid, the declared rooms joined."""
        ctx = self.ctx
        try:
            rooms = self._declared_rooms(auth.get("rooms"), claims)
        except Refused as refused:
            self._connect_error(refused)
            return
        self.claims = claims
        self.sio_sid = secrets.token_urlsafe(15)
        self.pid = ctx.signer.sign(self.sio_sid, self.sub, rooms) if ctx.recovery else None
        self.declared = tuple(rooms)
        self.connected = True
        positions = {room: self._join(room, update=False) for room in rooms}
        self._rooms_changed()
        self.send(connect_packet(self.sio_sid, self.pid))
        if ctx.recovery:
            for room, position in positions.items():
                self._emit_joined(room, position)
        self._expiry.schedule(self.claims)
        ctx.connects.labels(result).inc()

    def _declared_rooms(self, value: object, claims: Claims | None) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(room, str) for room in value):
            raise Refused("bad_request", "auth.rooms must be a list of room names")
        rooms = list(dict.fromkeys(value))
        if len(rooms) > self.ctx.settings.max_subscriptions_per_connection:
            raise Refused("limit", "too many rooms")
        for room in rooms:
            self._check_room(room, claims)
        return rooms

    def _check_room(self, room: object, claims: Claims | None) -> str:
        if not is_valid_channel(room):
            raise Refused("bad_channel", "invalid room name")
        assert isinstance(room, str)
        if claims is not None and not claims.may_subscribe(room):
            raise Refused("forbidden", "the token does not allow this room", room)
        return room

    async def _reconnect(self, auth: dict[str, Any], claims: Claims | None) -> None:
        try:
            if await self._recover(auth, claims):
                self.ctx.connects.labels("recovered").inc()
        except Exception:
            log.exception("socket.io recovery failed")
        finally:
            self.connecting = False
        if self.open and not self.connected:
            self._connect(auth, claims, result="not_recovered")
        self.arm()  # refused after all: the connect timeout applies again
        self._unbusy()

    async def _recover(self, auth: dict[str, Any], claims: Claims | None) -> bool:
        """Resumes the session on this pod from its pid and offset; False: start a new one.

        The offset's room (the anchor) resumes exactly after its position; the other rooms from
        the anchor's time minus POSITION_SLACK_MS (never a gap; a message of that moment may come
        twice, with the same meta.id). No `await` between taking history and joining live.
        """
        ctx = self.ctx
        session_id = ctx.signer.verify(auth.get("pid"))
        if session_id is None or session_id.sub != (claims.sub if claims else None):
            return False
        max_rooms = ctx.settings.max_subscriptions_per_connection
        offset = parse_offset(auth.get("offset"), max_rooms)
        if offset is None:
            return False
        try:
            listed = auth.get("rooms")
            declared = (
                list(session_id.rooms) if listed is None else self._declared_rooms(listed, claims)
            )
            # room -> its join position when it was joined moments ago (resumed from there)
            rooms: dict[str, str | None]
            if offset.rooms is None:  # in the declared rooms (and the anchor's) since connect
                rooms = dict.fromkeys(declared)
            else:  # rooms joined or left since: the last offset carries the set, signed
                signed = ctx.signer.verify_rooms(offset.rooms)
                if signed is None:
                    return False
                rooms = {}
                for item in signed:
                    split = split_room_entry(item)
                    if split is None:
                        return False
                    rooms[split[0]] = split[1]
            if offset.room is not None:
                rooms.setdefault(offset.room, None)
            for room in rooms:
                self._check_room(room, claims)
        except Refused:
            return False
        if len(rooms) > max_rooms:
            return False
        replay: list[tuple[str, Entry]] = []
        history = ctx.history
        for room, joined in rooms.items():
            # Not here yet (the client's pod was ahead): wait for it as a join would.
            if (
                joined is not None
                and history.recover(room, joined) is None
                and not (await ctx.hub.recover(room, joined)).recovered
            ):
                return False
        sync_ms = offset.sync_ms
        if offset.room is not None and offset.position is not None:
            anchor = await ctx.hub.recover(offset.room, offset.position)
            if not anchor.recovered:
                return False
            replay.extend((offset.room, entry) for entry in anchor.entries)
            if sync_ms is None:
                sync_ms = ctx.position_ms(offset.room, offset.position)
        if not self.open or sync_ms is None:
            return False
        for room, joined in rooms.items():
            if room == offset.room:
                continue
            recovery = history.recover(room, f"@{sync_ms}")
            if joined is not None:
                # Joined moments ago: the anchor's time minus the slack could reach back before
                # the join. Never before the join position; of the two tails, the shorter.
                since_join = history.recover(room, joined)
                if since_join is None or not since_join.recovered:
                    return False
                if (
                    recovery is None
                    or not recovery.recovered
                    or len(since_join.entries) < len(recovery.entries)
                ):
                    recovery = since_join
            if recovery is None or not recovery.recovered:
                return False
            replay.extend((room, entry) for entry in recovery.entries)
        replay.sort(key=lambda pair: pair[1].seq)
        self.claims = claims
        self.sio_sid = session_id.sid
        self.pid = auth["pid"]
        self.declared = tuple(declared)
        self.connected = True
        now = time.monotonic()
        for room, joined in rooms.items():
            self._join(room, update=False, fresh=False)
            if joined is not None:  # still joined moments ago: a second drop needs it too
                self._fresh[room] = (joined, now)
        self._rooms_changed()
        self.arm()
        # As socket.io does: the missed events first (the client buffers them until CONNECT).
        for room, entry in replay:
            self.send(self._event_packet(room, entry))
        self.replayed()
        self.send(connect_packet(self.sio_sid, self.pid))
        self._expiry.schedule(self.claims)
        return True

    # -- events ------------------------------------------------------------------------------
    def _on_event(self, packet: SioPacket) -> None:
        name, *args = packet.data
        handler = _HANDLERS.get(name) if isinstance(name, str) else None
        if handler is None:
            self._ack(packet.id, _error("bad_request", "unknown event"))
            return
        try:
            handler(self, args, packet.id)
        except Refused as refused:
            self.ctx.client_errors(refused.code)
            self._ack(packet.id, refused.body())

    def _on_join(self, args: list[Any], ack_id: int | None) -> None:
        target = args[0] if args else None
        since: object = None
        rewind_value: object = None
        if isinstance(target, dict):
            since = target.get("since")
            rewind_value = target.get("rewind")
            target = target.get("room")
        room = self._check_room(target, self.claims)
        if room not in self.rooms and (
            len(self.rooms) >= self.ctx.settings.max_subscriptions_per_connection
        ):
            raise Refused("limit", "too many rooms", room)
        rewind = self._rewind_spec(rewind_value, room)
        if since is None:
            rewound, position = self._join_rewound(room, rewind)
            body: dict[str, Any] = {"ok": True, "room": room, "position": position}
            self._ack_join(ack_id, body, room, rewound)
            if self.ctx.recovery:
                self._emit_joined(room, position)
            return
        if not isinstance(since, str) or not 0 < len(since) <= POSITION_MAX_CHARS:
            raise Refused("bad_request", "since must be a position string", room)
        self._busy = True
        self.ctx.spawn(self._join_since(room, since, ack_id, rewind))

    def _rewind_spec(self, value: object, room: str) -> RewindSpec | None:
        """The join's `rewind`, checked as the native subscribe checks it."""
        settings = self.ctx.settings
        try:
            rewind = parse_rewind(value, room)
            if rewind is not None:
                rewind = rewind.within_limits(
                    settings.rewind_max_count, settings.rewind_max_s, room
                )
        except ProtocolError as exc:
            raise Refused(exc.code, str(exc), room) from None
        return rewind

    def _join_rewound(self, room: str, rewind: RewindSpec | None) -> tuple[Rewind | None, str]:
        """Joins the room; with a rewind, and not in the room yet, its recent history too
        (taken with no await before joining the live stream). Returns it and the join position."""
        rewound = None
        if rewind is not None and room not in self.rooms:
            rewound = self.ctx.hub.rewind(room, rewind.count, rewind.seconds)
        return rewound, self._join(room)

    def _ack_join(
        self, ack_id: int | None, body: dict[str, Any], room: str, rewound: Rewind | None
    ) -> None:
        """Acks the join, then sends the rewind's messages (before any live one)."""
        if rewound is not None:
            body["rewound"] = {"count": len(rewound.entries), "complete": rewound.complete}
        self._ack(ack_id, body)
        if rewound is not None:
            for entry in rewound.entries:
                self.send(self._event_packet(room, entry))
            self.replayed()

    async def _join_since(
        self, room: str, since: str, ack_id: int | None, rewind: RewindSpec | None = None
    ) -> None:
        try:
            recovery = await self.ctx.hub.recover(room, since)
            if self.open and self.connected:
                # No await between taking the history slice and joining the live stream.
                # A rewind is served only when `since` cannot be: the client rebuilds from it.
                rewound, position = self._join_rewound(room, None if recovery.recovered else rewind)
                body = {
                    "ok": True,
                    "room": room,
                    "position": position,
                    "recovered": recovery.recovered,
                }
                self._ack_join(ack_id, body, room, rewound)
                for entry in recovery.entries:
                    self.send(self._event_packet(room, entry))
                self.replayed()
                if self.ctx.recovery:
                    self._emit_joined(room, position)
        finally:
            self._unbusy()

    def _on_leave(self, args: list[Any], ack_id: int | None) -> None:
        room = args[0] if args else None
        if not is_valid_channel(room):
            raise Refused("bad_channel", "invalid room name")
        assert isinstance(room, str)
        self._leave(room)
        self._ack(ack_id, {"ok": True, "room": room})

    def _on_publish(self, args: list[Any], ack_id: int | None) -> None:
        ctx = self.ctx
        if len(args) < 2:
            raise Refused("bad_request", "publish takes (room, data)")
        room, data = args[0], args[1]
        if not is_valid_channel(room):
            raise Refused("bad_channel", "invalid room name")
        assert isinstance(room, str)
        if not ctx.may_publish(self.claims, room):
            ctx.publishes.labels("forbidden").inc()
            raise Refused("forbidden", "the token may not publish to this room", room)
        try:
            encoded = encode_data(data, ctx.settings.max_message_bytes)
        except InvalidData as exc:  # the same rules as the api's
            ctx.publishes.labels("rejected").inc()
            code = "too_large" if exc.reason == "too_large" else "bad_request"
            raise Refused(code, exc.detail, room) from None
        envelope = Envelope(new_message_id(), room, orjson.Fragment(encoded), _now_ms(), self.sub)
        # Tasks start in creation order, so the broker sees publishes in the order they came.
        ctx.spawn(self._publish(envelope, ack_id))

    async def _publish(self, envelope: Envelope, ack_id: int | None) -> None:
        ctx = self.ctx
        message = OutgoingMessage(envelope.encode(), envelope.channel, envelope.attributes())
        try:
            await ctx.broker.publish(message)
        except BrokerBusy:
            ctx.publishes.labels("busy").inc()
            self._ack(
                ack_id,
                _error(
                    "busy",
                    "the room's backlog for Pub/Sub is full; nothing was published: retry later",
                    id=envelope.id,
                    room=envelope.channel,
                ),
            )
            return
        except Exception as exc:
            if not isinstance(exc, BrokerUnavailable):
                log.error("socket.io publish failed unexpectedly", exc_info=exc)
            ctx.publishes.labels("unavailable").inc()
            self._ack(
                ack_id,
                _error(
                    "unavailable",
                    "not confirmed by Pub/Sub; the outcome is unknown",
                    id=envelope.id,
                    room=envelope.channel,
                ),
            )
            return
        ctx.publishes.labels("accepted").inc()
        self._ack(ack_id, {"ok": True, "id": envelope.id, "room": envelope.channel})

    def _on_presence(self, args: list[Any], ack_id: int | None) -> None:
        room = self._check_room(args[0] if args else None, self.claims)
        self._ack(ack_id, {"ok": True, "room": room, **self.ctx.presence_summary(room)})

    def _on_refresh(self, args: list[Any], ack_id: int | None) -> None:
        token = args[0] if args else None
        try:
            claims = self.ctx.access.refresh(self.claims, token)
        except TokenRefused as refused:
            raise Refused(refused.code, str(refused)) from None
        self.claims = claims
        self._expiry.schedule(self.claims)
        for room in [r for r in self.rooms if not claims.may_subscribe(r)]:
            self._leave(room)
        self._ack(ack_id, {"ok": True, "expires_at": claims.exp})

    # -- rooms -------------------------------------------------------------------------------
    def _join(self, room: str, update: bool = True, fresh: bool = True) -> str:
        """Joins the room and returns its position at the join: the one position the ack, the
        `pubsock:joined` event and the offsets all carry (an empty room's is `@<now ms>`, which
        a second look could read a millisecond later). `fresh`: a room the client had not been
        in (not one a recovery restores)."""
        position = self.ctx.history.position(room)
        if room not in self.rooms:
            self.rooms[room] = None
            self.ctx.hub.add(room, self)
            if fresh and self.ctx.recovery:
                self._fresh[room] = (position, time.monotonic())
                self.arm()  # its timer also ends the join position's time in the offsets
            if update:
                self._rooms_changed()
        return position

    def _leave(self, room: str) -> None:
        if room in self.rooms:
            del self.rooms[room]
            self._fresh.pop(room, None)
            self.ctx.hub.remove(room, self)
            self._rooms_changed()
            if self.ctx.recovery:
                self._emit_left(room)

    def _rooms_changed(self) -> None:
        """Rooms other than the pid's, or joined moments ago, are carried, signed, by every
        offset from now on."""
        if not self.ctx.recovery or (not self._fresh and set(self.rooms) == set(self.declared)):
            self.rooms_suffix = None
        else:
            fresh = self._fresh
            entries = [room_entry(r, fresh[r][0] if r in fresh else None) for r in self.rooms]
            self.rooms_suffix = self.ctx.signer.rooms_suffix(entries).encode()
        self.reframe()

    def _event_packet(self, room: str, entry: Entry) -> bytes:
        """A message's packet (for `send`, whatever the transport) as our room set frames it."""
        return self.ctx.frames.framing(False, self.rooms_suffix).frame(room, entry)

    def _offset(self, room: str | None, position: str | None) -> str:
        offset = state_offset(room, position, self.ctx.history.now_ms())
        suffix = self.rooms_suffix
        return offset if suffix is None else offset + suffix.decode()

    def _emit_joined(self, room: str, position: str) -> None:
        """Moves the client's recovery anchor to this room, at its join position."""
        self._emit(JOINED_EVENT, {"room": room, "position": position}, self._offset(room, position))

    def _emit_left(self, room: str) -> None:
        """The anchor moves to the latest joined room not declared at connect, if any."""
        anchor = next((r for r in reversed(self.rooms) if r not in self.declared), None)
        position = self.ctx.history.position(anchor) if anchor is not None else None
        self._emit(LEFT_EVENT, {"room": room}, self._offset(anchor, position))

    def _detach(self) -> None:
        """Leaves every room (a Socket.IO disconnect, or the session's end)."""
        if self.connected:
            self._unconnected_since = time.monotonic()
        self.connected = False
        self.arm()  # the connect timeout applies again (or, the session ended, nothing does)
        self._expiry.cancel()
        for room in list(self.rooms):
            self.ctx.hub.remove(room, self)
        self.rooms.clear()
        self._fresh.clear()
        self.rooms_suffix = None
        self.reframe()
        self._backlog.clear()

    def _unbusy(self) -> None:
        self._busy = False
        while self._backlog and not self._busy and self.open and self.connected:
            self._on_event(self._backlog.popleft())

    # -- token expiry ------------------------------------------------------------------------
    def _expired(self) -> None:
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    def on_closed(self, reason: str) -> None:
        self._detach()


_HANDLERS = {
    "join": SioSession._on_join,
    "leave": SioSession._on_leave,
    "publish": SioSession._on_publish,
    "presence": SioSession._on_presence,
    "refresh": SioSession._on_refresh,
}
