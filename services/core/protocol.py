"""The client protocol: parse client frames, build server frames. Written once, used by every pod.

Client frames are small JSON objects; server frames are built as bytes so a message frame is
encoded once per pod and the same bytes go to every connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from services.core.channels import is_valid_channel
from services.core.envelope import Envelope, dumps

POSITION_MAX_CHARS = 128


class ProtocolError(ValueError):
    """A client frame the server answers with an `error` frame; the connection stays open."""

    def __init__(self, code: str, message: str, channel: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.channel = channel


@dataclass(frozen=True, slots=True)
class RewindSpec:
    """A subscribe's ask for recent history: the last `count` messages, those of the last
    `seconds`, or with both the last `count` within `seconds`."""

    count: int | None = None
    seconds: int | None = None

    def within_limits(self, max_count: int, max_s: float, channel: str | None = None) -> RewindSpec:
        """What to serve: a `limit` ProtocolError when the ask is over the pod's limits; else
        the ask, with `count` at most `max_count` (`seconds` alone: the last `max_count` of
        them), so no rewind sends more than that."""
        if self.count is not None and self.count > max_count:
            raise ProtocolError("limit", f"rewind count over {max_count}", channel)
        if self.seconds is not None and self.seconds > max_s:
            raise ProtocolError("limit", f"rewind seconds over {max_s:g}", channel)
        return self if self.count is not None else RewindSpec(max_count, self.seconds)


REWIND_KEYS = frozenset({"count", "seconds"})


def parse_rewind(value: object, channel: str | None = None) -> RewindSpec | None:
    """`{"count"?: N, "seconds"?: T}` (positive integers, at least one) or None when absent;
    anything else is a `bad_request` ProtocolError."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or not REWIND_KEYS.issuperset(value):
        raise ProtocolError(
            "bad_request", "rewind must be an object with count and/or seconds", channel
        )
    bounds: dict[str, int] = {}
    for key, bound in value.items():
        if isinstance(bound, bool) or not isinstance(bound, int) or bound <= 0:
            raise ProtocolError("bad_request", f"rewind {key} must be a positive integer", channel)
        bounds[key] = bound
    return RewindSpec(bounds.get("count"), bounds.get("seconds"))


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    since: str | None = None
    presence: bool = False
    rewind: RewindSpec | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Refresh:
    token: str


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    channel: str


ClientFrame = Subscribe | Unsubscribe | Ping | Refresh | PresenceQuery


def _channel(frame: dict[str, Any]) -> str:
    channel = frame.get("channel")
    if channel is None:
        raise ProtocolError("bad_request", "missing field: channel")
    if not is_valid_channel(channel):
        shown = channel if isinstance(channel, str) and len(channel) <= 200 else None
        raise ProtocolError("bad_channel", "invalid channel name", shown)
    return str(channel)


def parse_client_frame(raw: str | bytes) -> ClientFrame:
    """Parses one client frame or raises ProtocolError with the contract's error code."""
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "frame is not JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "frame is not a JSON object")
    kind = frame.get("type")
    if kind == "subscribe":
        channel = _channel(frame)
        since = frame.get("since")
        if since is not None and (
            not isinstance(since, str) or not 0 < len(since) <= POSITION_MAX_CHARS
        ):
            raise ProtocolError("bad_request", "since must be a position string", channel)
        presence = frame.get("presence", False)
        if not isinstance(presence, bool):
            raise ProtocolError("bad_request", "presence must be true or false", channel)
        return Subscribe(channel, since, presence, parse_rewind(frame.get("rewind"), channel))
    if kind == "unsubscribe":
        return Unsubscribe(_channel(frame))
    if kind == "ping":
        return Ping()
    if kind == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError("bad_request", "missing field: token")
        return Refresh(token)
    if kind == "presence":
        return PresenceQuery(_channel(frame))
    if kind is None:
        raise ProtocolError("bad_request", "missing field: type")
    raise ProtocolError("bad_request", "unknown frame type")


class MessageFrame(NamedTuple):
    """A `message` frame's payload and where its `data` lies in it, so other framings (socket.io)
    take the data already encoded, without parsing the frame."""

    payload: bytes
    data_start: int
    data_end: int


def message_frame_parts(envelope: Envelope) -> MessageFrame:
    """`{"type":"message","channel":..,"id":..,"data":..,"ts":..[,"sub":..]}`, built from the
    envelope's fields once per pod per message."""
    head = (
        b'{"type":"message","channel":'
        + dumps(envelope.channel)
        + b',"id":'
        + dumps(envelope.id)
        + b',"data":'
    )
    data = dumps(envelope.data)
    tail = b',"ts":' + dumps(envelope.ts)
    if envelope.sub is not None:
        tail += b',"sub":' + dumps(envelope.sub)
    return MessageFrame(head + data + tail + b"}", len(head), len(head) + len(data))


def message_frame(envelope: Envelope) -> bytes:
    """The `message` frame of one envelope (its payload)."""
    return message_frame_parts(envelope).payload


def subscribed_frame(
    channel: str,
    position: str,
    recovered: bool | None,
    rewound: tuple[int, bool] | None = None,
) -> bytes:
    """`rewound`: (messages that follow, complete) when a rewind is served."""
    frame: dict[str, Any] = {"type": "subscribed", "channel": channel, "position": position}
    if recovered is not None:
        frame["recovered"] = recovered
    if rewound is not None:
        frame["rewound"] = {"count": rewound[0], "complete": rewound[1]}
    return orjson.dumps(frame)


def unsubscribed_frame(channel: str) -> bytes:
    return orjson.dumps({"type": "unsubscribed", "channel": channel})


def pong_frame(pod: str) -> bytes:
    """`pong`; it also names the pod, so a page can show which pod serves it."""
    return orjson.dumps({"type": "pong", "pod": pod})


def refreshed_frame(expires_at: int) -> bytes:
    return orjson.dumps({"type": "refreshed", "expires_at": expires_at})


def error_frame(code: str, message: str, channel: str | None = None) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if channel is not None:
        frame["channel"] = channel
    return orjson.dumps(frame)
