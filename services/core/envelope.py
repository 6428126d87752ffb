"""The message as it travels through Pub/Sub (binding: other producers publish it too).

Body: UTF-8 JSON `{"id", "channel", "data", "ts", "sub"?}`; attribute `channel`; ordering key =
channel. Presence announcements share the topic with attribute `kind` = `presence`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from services.core.channels import is_valid_channel
from services.core.ids import is_valid_message_id

KIND_ATTRIBUTE = "kind"
CHANNEL_ATTRIBUTE = "channel"
PRESENCE_KIND = "presence"


def dumps(value: Any) -> bytes:
    """Compact JSON. orjson, with the standard library for what it refuses (integers beyond 64
    bits, lone surrogates): any JSON value a client sends can be delivered."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()


_LONG_DIGITS = re.compile(rb"\d{19}")


def loads(raw: bytes) -> Any:
    """The reverse of `dumps`; raises ValueError on invalid JSON.

    orjson reads integers beyond 64 bits as floats; a body with a run of 19+ digits is read by
    the standard library instead, so such integers are delivered exactly as posted.
    """
    if _LONG_DIGITS.search(raw) is not None:
        return json.loads(raw)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


class InvalidEnvelope(ValueError):
    """A message on the topic that no client can be given (not JSON, no valid channel, ...)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    id: str
    channel: str
    data: Any
    ts: int
    sub: str | None = None

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "channel": self.channel,
            "data": self.data,
            "ts": self.ts,
        }
        if self.sub is not None:
            body["sub"] = self.sub
        return dumps(body)

    def attributes(self) -> dict[str, str]:
        return {CHANNEL_ATTRIBUTE: self.channel}


def decode_envelope(
    body: bytes, attributes: Mapping[str, str], fallback_id: str, fallback_ts_ms: int
) -> Envelope:
    """Reads a channel message; a missing `id` or `ts` falls back to Pub/Sub's id and time."""
    try:
        decoded = loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidEnvelope("body is not JSON") from exc
    if not isinstance(decoded, dict):
        raise InvalidEnvelope("body is not a JSON object")
    channel = decoded.get("channel", attributes.get(CHANNEL_ATTRIBUTE))
    if not is_valid_channel(channel):
        raise InvalidEnvelope("missing or invalid channel")
    message_id = decoded.get("id")
    if message_id is None:
        message_id = fallback_id
    elif not is_valid_message_id(message_id):
        raise InvalidEnvelope("invalid id")
    ts = decoded.get("ts")
    if ts is None:
        ts = fallback_ts_ms
    elif isinstance(ts, bool) or not isinstance(ts, int | float):
        raise InvalidEnvelope("invalid ts")
    sub = decoded.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise InvalidEnvelope("invalid sub")
    return Envelope(
        id=message_id, channel=str(channel), data=decoded.get("data"), ts=int(ts), sub=sub
    )
