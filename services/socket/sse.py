"""Server-Sent Events (`GET /sse`): one `text/event-stream` response per client, carrying every
channel it asked for, resumable on any pod.

`SseEndpoint` admits a stream (the pod's `Access`: readiness, origin, MAX_CONNECTIONS, the token
from `?token=` or `Authorization: Bearer`; the channels, each allowed by the token) and opens an
`SseSession` on the connection (gateway `stream`). The session is a `Subscriber` of the hub and a
`LiveSession` of the pod's registry, like every other kind (delivery.py): maintenance (send
budget, maximum age, keep-alive comments), token expiry and the drain come with that.

Delivery cost: a message's event (`data: <message JSON>\\n\\n`) is built once per pod by
`SseFraming`, the same bytes for every SSE session, with its `<channel>=<id>` pair and, for the
streams of that one channel, the whole event with its `id:` line. A stream of several channels
writes its own `id:` line in front of the shared bytes: where each of its channels stands
(sse_id.py), so that a browser's automatic reconnect (`Last-Event-ID`), to any pod, resumes every
channel exactly once. Joining that line is the per-session work of a delivery (bench/README.md
measures it).

Also here: `GET /sse/presence?channel=...`, the presence query of a client that has no websocket
to ask on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from services.core.auth import Claims
from services.core.channels import is_valid_channel
from services.core.closecodes import CloseCode
from services.core.protocol import ProtocolError, RewindSpec, subscribed_frame
from services.socket.access import Refusal, TokenRefused
from services.socket.delivery import Framing, Wire
from services.socket.endpoint import HttpConnection
from services.socket.guards import TokenExpiry
from services.socket.history import Entry, Rewind
from services.socket.http import Request, json_response, response, stream_head
from services.socket.parts import SessionParts
from services.socket.sse_id import (
    LAST_EVENT_ID_HEADER,
    LAST_EVENT_ID_PARAM,
    BadEventId,
    ResumeBudget,
    decode_positions,
)

log = logging.getLogger(__name__)

SSE_PATH = "/sse"
PRESENCE_PATH = "/sse/presence"
CONTENT_TYPE = "text/event-stream; charset=utf-8"
KEEPALIVE = b": ka\n\n"
# A client sends nothing after its GET; what it sends anyway is ignored, up to this much.
CLIENT_BYTES_MAX = 64 * 1024
# `retry:` (ms) the browser waits before it reconnects on its own: after a cut (a pod killed)
# and, written with the `close` event, after each kind of close. Random per session, so the
# clients of one pod do not come back in the same instant.
RETRY_MS: dict[CloseCode | None, tuple[int, int]] = {
    None: (1000, 3000),
    CloseCode.RESTART: (0, 1000),
    CloseCode.TRY_AGAIN_LATER: (5000, 15000),
    CloseCode.TOKEN_EXPIRED: (1000, 3000),
}
_TRUE = ("1", "true")
_FALSE = ("", "0", "false")


def retry_ms(code: CloseCode | None) -> int:
    low, high = RETRY_MS.get(code, RETRY_MS[None])
    return random.randint(low, high)


def event(kind: str | None, data: bytes, event_id: bytes | None = None) -> bytes:
    """One event: `id:` (when given), `event:` (none: a `message`), one `data:` line.

    `data` is compact JSON: never a line break in it, so one `data:` line carries it."""
    head = b"" if event_id is None else b"id: " + event_id + b"\n"
    if kind is not None:
        head += b"event: " + kind.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def message_payload(entry: Entry) -> bytes:
    """The message's JSON (the native frame's payload): the websocket frame without its
    2, 4 or 10 bytes of header (server frames are unmasked)."""
    frame = entry.frame
    length = frame[1] & 0x7F
    return frame[2 if length < 126 else 4 if length == 126 else 10 :]


class SseEvent(bytes):
    """A message's event for every SSE session of a pod (`data: ...\\n\\n`), built once, with
    what each session needs to put its own `id:` line in front: the channel, its new
    `<channel>=<id>` pair, and for a stream of that channel alone the whole event, id included.
    (`bytes`, so the hub passes it on like any framing's bytes.)"""

    channel: str
    pair: bytes
    single: bytes

    def __new__(cls, data: bytes, channel: str, message_id: str) -> SseEvent:
        built = super().__new__(cls, data)
        built.channel = channel
        built.pair = channel.encode("ascii") + b"=" + message_id.encode("ascii")
        built.single = b"".join((b"id: ", built.pair, b"\n", data))
        return built


class SseFraming:
    """The framing of every SSE session (delivery.py): one instance, one build per message."""

    __slots__ = ()

    def frame(self, channel: str, entry: Entry) -> bytes:
        return SseEvent(b"data: " + message_payload(entry) + b"\n\n", channel, entry.id)

    def presence(self, channel: str, kind: str, sub: str | None) -> bytes | None:
        return event(kind, orjson.dumps({"type": kind, "channel": channel, "sub": sub}))


SSE = SseFraming()


class SseSession:
    __slots__ = (
        "_around",
        "_client_bytes",
        "_close_timer",
        "_expiry",
        "_hot",
        "_pairs",
        "_parts",
        "_prefixes",
        "_presence",
        "_presence_wanted",
        "_quiet_since",
        "_rewind",
        "_single",
        "_slots",
        "_wrote",
        "channels",
        "claims",
        "max_age_at",
        "open",
        "transport",
        "wire",
    )

    framing: Framing = SSE

    def __init__(
        self,
        parts: SessionParts,
        transport: asyncio.Transport,
        claims: Claims | None,
        channels: list[str],
        presence: set[str],
        rewind: tuple[RewindSpec, set[str]] | None = None,
    ) -> None:
        self._parts = parts
        self._rewind = rewind  # what to rewind, on which channels (when they start afresh)
        limits = parts.limits
        self.transport = transport
        self.wire = Wire(transport, limits.send_buffer_max_bytes)
        self.claims = claims
        self.channels: set[str] = set()  # attached to the hub
        self._presence_wanted = presence
        self._presence: set[str] = set()  # from its attach on: not told of its own join
        # The stream's id, one `<channel>=<position>` pair per channel in the URL's order.
        self._slots = {channel: index for index, channel in enumerate(channels)}
        self._prefixes = [channel.encode("ascii") + b"=" for channel in channels]
        self._pairs = list(self._prefixes)
        self._single = len(channels) == 1
        self._hot = -1  # the channel `_around` is for
        self._around = (b"", b"")
        self.open = True
        now = time.monotonic()
        self._quiet_since = now
        self._wrote = False
        # Ended at this age (jitter ±10 %), before the load balancer's backend timeout cuts it.
        self.max_age_at = now + limits.max_connection_age_s * random.uniform(0.9, 1.1)
        self._client_bytes = 0
        self._close_timer: asyncio.TimerHandle | None = None
        self._expiry = TokenExpiry(self._expired)
        self._expiry.schedule(claims)

    @property
    def sub(self) -> str | None:
        return self.claims.sub if self.claims is not None else None

    def _expired(self) -> None:
        self.close(CloseCode.TOKEN_EXPIRED, "token expired")

    # -- the id ------------------------------------------------------------------------------
    def _set_position(self, channel: str, position: str) -> None:
        index = self._slots[channel]
        self._pairs[index] = self._prefixes[index] + position.encode("ascii")
        self._hot = -1

    def _forget_position(self, channel: str) -> None:
        """No position until its rewind's first message: cut before, it is asked again."""
        self._pairs[self._slots[channel]] = b""
        self._hot = -1

    def _id(self) -> bytes:
        return b",".join([pair for pair in self._pairs if pair])

    # -- opening -----------------------------------------------------------------------------
    def start(self, positions: dict[str, str] | None) -> None:
        """Joins every channel: those without a position live at once (after their rewind, if
        one is asked); those with one after their recovery (`_recover`). `positions` is the
        client's Last-Event-ID decoded; None when it could not be read: every channel then
        starts over with `recovered: false`.

        The first event (`pod`) carries the whole id: a stream cut right after it resumes
        from there."""
        history = self._parts.hub.history
        recovered = None if positions is not None else False
        fresh: list[tuple[str, str, Rewind | None]] = []
        recovering: list[tuple[str, str]] = []
        for channel in self._slots:
            since = positions.get(channel) if positions is not None else None
            if since is not None:
                self._set_position(channel, since)
                recovering.append((channel, since))
                continue
            rewound = self._rewound(channel)  # the history slice, then the live stream
            self._attach(channel)
            position = history.position(channel)
            if rewound is not None and rewound.entries:
                self._forget_position(channel)
            else:
                self._set_position(channel, position)
            fresh.append((channel, position, rewound))
        pod = orjson.dumps({"type": "pod", "pod": self._parts.limits.pod_name})
        events = [b"retry: %d\n" % retry_ms(None) + event("pod", pod, self._id())]
        for channel, position, rewound in fresh:
            entries = rewound.entries if rewound is not None else ()
            events += self._answer(channel, position, recovered, entries, rewound)
        self.send_raw(b"".join(events))
        if any(rewound is not None for _, _, rewound in fresh):
            self.wire.replayed()
        for channel, since in recovering:
            self._parts.spawn(self._recover(channel, since))

    def _rewound(self, channel: str) -> Rewind | None:
        """The channel's rewind when the stream asked for one on it."""
        if self._rewind is None or channel not in self._rewind[1]:
            return None
        spec = self._rewind[0]
        return self._parts.hub.rewind(channel, spec.count, spec.seconds)

    def _answer(
        self,
        channel: str,
        position: str,
        recovered: bool | None,
        entries: Sequence[Entry] = (),
        rewound: Rewind | None = None,
    ) -> list[bytes]:
        """A `subscribed` event (saying what `rewound` holds), then `entries` (a replay or the
        rewind's), each moving the channel's pair."""
        shape = None if rewound is None else (len(rewound.entries), rewound.complete)
        events = [event("subscribed", subscribed_frame(channel, position, recovered, shape))]
        for entry in entries:
            self._set_position(channel, entry.id)
            events.append(event(None, message_payload(entry), self._id()))
        return events

    def _attach(self, channel: str) -> None:
        if channel not in self.channels:
            self._parts.hub.add(channel, self)
            self.channels.add(channel)
            if channel in self._presence_wanted:
                self._presence.add(channel)

    def _subscribed(self, channel: str, recovered: bool | None) -> bytes:
        """Where the channel stands on this pod now becomes its position (when a replay
        follows, its messages move it there anyway)."""
        position = self._parts.hub.history.position(channel)
        self._set_position(channel, position)
        return event("subscribed", subscribed_frame(channel, position, recovered), self._id())

    async def _recover(self, channel: str, since: str) -> None:
        recovery = await self._parts.hub.recover(channel, since)
        if not self.open:
            return
        # No await between taking the history slice and joining the live stream.
        rewound = None if recovery.recovered else self._rewound(channel)
        self._attach(channel)
        if rewound is not None:  # cannot resume: the rewind is served, so the client rebuilds
            position = self._parts.hub.history.position(channel)
            if not rewound.entries:
                self._set_position(channel, position)
            answer = self._answer(channel, position, False, rewound.entries, rewound)
            self.send_raw(b"".join(answer))
            self.wire.replayed()
            return
        if not recovery.recovered or not recovery.entries:
            self.send_raw(self._subscribed(channel, recovery.recovered))
            return
        position = self._parts.hub.history.position(channel)
        self.send_raw(b"".join(self._answer(channel, position, True, recovery.entries)))
        self.wire.replayed()

    # -- writing -----------------------------------------------------------------------------
    def _message(self, built: SseEvent) -> bytes:
        """The event with this stream's id: shared bytes when the stream has one channel."""
        pairs = self._pairs
        if self._single:
            pairs[0] = built.pair
            return built.single
        index = self._slots[built.channel]
        pairs[index] = built.pair
        if index != self._hot:
            # The id around this channel's pair, kept while messages come on this channel
            # (the others' pairs change only when they do, or by `_set_position`).
            self._hot = index
            self._around = (
                b"".join((b"id: ", *(p + b"," for p in pairs[:index] if p))),
                b"".join((*(b"," + p for p in pairs[index + 1 :] if p), b"\n")),
            )
        head, tail = self._around
        return b"".join((head, built.pair, tail, built))

    def deliver(self, data: bytes) -> bool:
        """Writes a live message with this stream's id in front, unless the unsent data is over
        budget (then the hub closes us). `data` is the SseFraming's `SseEvent`."""
        if not self.open:
            return True
        self._wrote = True
        return self.wire.deliver(self._message(data))  # type: ignore[arg-type]

    def deliver_batch(self, frames: list[bytes]) -> bool:
        if not self.open:
            return True
        self._wrote = True
        message = self._message
        return self.wire.deliver(b"".join([message(f) for f in frames]))  # type: ignore[arg-type]

    def send_raw(self, data: bytes) -> None:
        """Control events (subscribed, presence, a replay): always written."""
        if self.open:
            self._wrote = True
            self.transport.write(data)

    def wants_presence(self, channel: str) -> bool:
        return channel in self._presence

    def maintain(self, now: float) -> None:
        """A maintenance tick: send budget, maximum age, then a keep-alive comment on a stream
        that wrote nothing for `sse_keepalive_s`."""
        if not self.open:
            return
        if self.wire.stalled():
            self.close_slow()
        elif now >= self.max_age_at:
            self.close(CloseCode.RESTART, "maximum connection age")
        elif self._wrote:
            self._wrote = False
            self._quiet_since = now
        elif now - self._quiet_since >= self._parts.limits.sse_keepalive_s:
            self._quiet_since = now
            self.transport.write(KEEPALIVE)

    def feed(self, data: bytes) -> None:
        """A client sends nothing after its GET; a few bytes are ignored, a flood is cut."""
        self._client_bytes += len(data)
        if self._client_bytes > CLIENT_BYTES_MAX:
            self.abort()

    # -- closing -----------------------------------------------------------------------------
    def close(self, code: CloseCode, reason: str = "") -> None:
        """A `close` event (the code a websocket would get, and when to come back: `retry:`),
        then the end of the response: the browser reconnects on its own, to any pod, with
        `Last-Event-ID`. The connection is cut if its unsent data does not drain in time."""
        if not self.open:
            return
        self._detach()
        self._parts.metrics.closes.labels(str(int(code))).inc()
        closing = orjson.dumps({"type": "close", "code": int(code), "reason": reason})
        self.transport.write(b"retry: %d\n" % retry_ms(code) + event("close", closing))
        self.transport.close()
        self._close_timer = asyncio.get_running_loop().call_later(
            self._parts.limits.close_timeout_s, self.transport.abort
        )

    def close_slow(self) -> None:
        """Over the send budget: ended with 1013 without waiting for the client."""
        if not self.open:
            return
        self._parts.metrics.slow_consumer_closes.inc()
        self.close(CloseCode.TRY_AGAIN_LATER, "too slow to keep up")

    def abort(self) -> None:
        self._detach()
        self.transport.abort()

    def _detach(self) -> None:
        self._expiry.cancel()
        if self.open:
            self.open = False
            self._parts.hub.remove_all(self.channels, self)
            self.channels.clear()

    def connection_lost(self) -> None:
        self._detach()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._parts.registry.closed(self)


class BadStream(Exception):
    """A request the endpoint refuses: status, metric reason, detail."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.refusal = Refusal(status, reason, detail)


@dataclass(frozen=True, slots=True)
class StreamRequest:
    channels: list[str]
    presence: set[str]
    positions: dict[str, str] | None  # None: a Last-Event-ID that could not be read
    rewind: tuple[RewindSpec, set[str]] | None


def _head_without_resume_id(request: Request) -> int:
    """The request head's size without the resume id it may carry (header and URL)."""
    head = request.head_bytes
    value = request.header(LAST_EVENT_ID_HEADER.lower())
    if value is not None:
        head -= len(LAST_EVENT_ID_HEADER) + len(value) + 4
    _, _, query = request.target.partition("?")
    prefix = f"{LAST_EVENT_ID_PARAM}="
    return head - sum(len(part) + 1 for part in query.split("&") if part.startswith(prefix))


class SseEndpoint:
    """`GET /sse` (a stream) and `GET /sse/presence` (a presence query)."""

    def __init__(self, parts: SessionParts) -> None:
        self._parts = parts
        limits = parts.limits
        self._budget = ResumeBudget(limits.sse_position_max_chars, limits.sse_resume_head_max_bytes)
        registry = parts.registry
        parts.metrics.sse_sessions.set_function(
            lambda: sum(1 for s in registry.snapshot() if isinstance(s, SseSession))
        )

    def handles(self, request: Request) -> bool:
        return request.path in (SSE_PATH, PRESENCE_PATH)

    def handle(self, connection: HttpConnection, request: Request) -> bytes | None:
        if request.method == "OPTIONS":
            return self._preflight(request)
        if request.method != "GET":
            return json_response(
                405,
                {"detail": "use GET"},
                keep_alive=request.keep_alive,
                headers={"Allow": "GET, OPTIONS", **self._cors(request)},
            )
        if request.path == PRESENCE_PATH:
            return self._presence_query(request)
        parts = self._parts
        try:
            refusal = parts.access.admit(request.header("origin"))
            if refusal is not None:
                raise BadStream(*refusal)
            claims = self._claims(request)
            wanted = self._parse(request, claims)
        except BadStream as bad:
            status, reason, detail = bad.refusal
            parts.metrics.handshake_rejections.labels(reason).inc()
            headers = self._cors(request)
            if status == 503:
                headers["Retry-After"] = "5"
            elif status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            connection.refuse(
                json_response(status, {"detail": detail}, headers=headers, keep_alive=False)
            )
            return None

        def open_stream(transport: asyncio.Transport) -> SseSession:
            session = SseSession(
                parts, transport, claims, wanted.channels, wanted.presence, wanted.rewind
            )
            parts.registry.opened(session)
            parts.metrics.connections_opened.inc()
            session.start(wanted.positions)
            return session

        headers = {
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
            "X-Pubsock-Pod": parts.limits.pod_name,
            **self._cors(request),
        }
        connection.stream(stream_head(CONTENT_TYPE, headers), open_stream)
        return None

    # -- requests ----------------------------------------------------------------------------
    def _claims(self, request: Request) -> Claims | None:
        token = request.query_value("token")
        if token is None:
            authorization = request.header("authorization") or ""
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() == "bearer":
                token = credential.strip()
        try:
            return self._parts.access.authenticate(
                token, "?token=<jwt> or Authorization: Bearer <jwt>"
            )
        except TokenRefused as refused:
            raise BadStream(401, refused.reason, str(refused)) from None

    def _parse(self, request: Request, claims: Claims | None) -> StreamRequest:
        limit = self._parts.limits.max_subscriptions_per_connection
        names = [n for value in request.query.get("channels", []) for n in value.split(",")]
        if not any(names):
            raise BadStream(400, "bad_request", "channels is required: ?channels=a,b")
        channels: list[str] = []
        for name in names:
            if not is_valid_channel(name):
                shown = name if len(name) <= 200 else name[:200] + "..."
                raise BadStream(400, "bad_request", f"invalid channel name: {shown!r}")
            if name not in channels:
                channels.append(name)
        if len(channels) > limit:
            raise BadStream(400, "bad_request", f"too many channels: at most {limit} a stream")
        presence = self._subset(request.query_value("presence"), channels, "presence")
        rewind = self._rewind(request, channels)
        if claims is not None:
            for channel in channels:
                if not claims.may_subscribe(channel):
                    raise BadStream(
                        403, "forbidden", f"the token does not allow channel {channel!r}"
                    )
        last_event_id = request.header(LAST_EVENT_ID_HEADER.lower())
        if last_event_id is None:
            last_event_id = request.query_value(LAST_EVENT_ID_PARAM) or ""
        try:
            positions: dict[str, str] | None = decode_positions(last_event_id.strip(), limit)
        except BadEventId:
            positions = None
        refusal = self._budget.refusal(_head_without_resume_id(request), channels, positions)
        if refusal is not None:
            raise BadStream(400, "bad_request", refusal)
        return StreamRequest(channels, presence, positions, rewind)

    @staticmethod
    def _subset(value: str | None, channels: list[str], name: str) -> set[str]:
        """`1` (every channel), `0`, or a comma-separated subset of the channels."""
        if value is None or value.lower() in _FALSE:
            return set()
        if value.lower() in _TRUE:
            return set(channels)
        chosen = set(value.split(","))
        if not chosen <= set(channels):
            raise BadStream(
                400, "bad_request", f"{name}: 1, 0, or a comma-separated subset of channels"
            )
        return chosen

    def _rewind(self, request: Request, channels: list[str]) -> tuple[RewindSpec, set[str]] | None:
        """`rewind_count` and/or `rewind_seconds` (positive integers): recent history first, on
        the `rewind_channels` (default: every channel) that start afresh."""
        bounds: dict[str, int] = {}
        for key in ("count", "seconds"):
            value = request.query_value(f"rewind_{key}")
            if value is None:
                continue
            if not value.isdigit() or int(value) <= 0 or len(value) > 9:
                raise BadStream(400, "bad_request", f"rewind_{key} must be a positive integer")
            bounds[key] = int(value)
        wanted = request.query_value("rewind_channels")
        if not bounds:
            if wanted is not None:
                raise BadStream(
                    400, "bad_request", "rewind_channels needs rewind_count or _seconds"
                )
            return None
        limits = self._parts.limits
        try:
            spec = RewindSpec(bounds.get("count"), bounds.get("seconds")).within_limits(
                limits.rewind_max_count, limits.rewind_max_s
            )
        except ProtocolError as exc:
            raise BadStream(400, "bad_request", str(exc)) from None
        on = set(channels) if wanted is None else self._subset(wanted, channels, "rewind_channels")
        return spec, on

    def _cors(self, request: Request) -> dict[str, str]:
        """CORS with credentials for an (allowed) Origin: EventSource's `withCredentials`."""
        origin = request.header("origin")
        if origin is None:
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Credentials": "true",
            "Vary": "Origin",
        }

    def _preflight(self, request: Request) -> bytes:
        if not self._parts.access.allows_origin(request.header("origin")):
            return json_response(
                403, {"detail": "origin not allowed"}, keep_alive=request.keep_alive
            )
        headers = {
            **self._cors(request),
            "Access-Control-Allow-Methods": "GET, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Last-Event-ID, Cache-Control",
            "Access-Control-Max-Age": "600",
        }
        return response(204, headers=headers, keep_alive=request.keep_alive)

    def _presence_query(self, request: Request) -> bytes:
        """Who is on a channel now, across every pod: the websocket `presence` answer."""
        parts = self._parts
        keep_alive = request.keep_alive
        headers = {"Cache-Control": "no-store", **self._cors(request)}
        if not parts.access.allows_origin(request.header("origin")):
            return json_response(403, {"detail": "origin not allowed"}, keep_alive=keep_alive)
        try:
            claims = self._claims(request)
        except BadStream as bad:
            return json_response(
                401,
                {"detail": bad.refusal.detail},
                keep_alive=keep_alive,
                headers={**headers, "WWW-Authenticate": "Bearer"},
            )
        channel = request.query_value("channel")
        if channel is None or not is_valid_channel(channel):
            return json_response(
                400,
                {"detail": "channel: a valid channel name is required"},
                keep_alive=keep_alive,
                headers=headers,
            )
        if claims is not None and not claims.may_subscribe(channel):
            return json_response(
                403,
                {"detail": "the token does not allow this channel"},
                keep_alive=keep_alive,
                headers=headers,
            )
        summary = parts.presence.summary(channel, parts.limits.presence_members_max)
        reply = {"type": "presence", "channel": channel, **summary}
        return json_response(200, reply, keep_alive=keep_alive, headers=headers)
