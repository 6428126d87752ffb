"""Engine.IO protocol 4 and Socket.IO protocol 5 packets: the encodings this server speaks.

Engine.IO packet: one type digit, then the data. Over HTTP long-polling, several packets share a
body, separated by the record separator 0x1e; over a websocket, one packet per message.
Socket.IO packet (inside an Engine.IO `message`):
`<type>[<attachments>-][<nsp>,][<ack id>][<json>]`.
Binary packets (types 5 and 6, and Engine.IO `b` packets) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from services.core.envelope import dumps

# Engine.IO packet types
EIO_OPEN = "0"
EIO_CLOSE = "1"
EIO_PING = "2"
EIO_PONG = "3"
EIO_MESSAGE = "4"
EIO_UPGRADE = "5"
EIO_NOOP = "6"
RECORD_SEPARATOR = b"\x1e"

PING = b"2"
NOOP = b"6"
CLOSE = b"1"
PROBE = "2probe"
PROBE_ANSWER = b"3probe"

# Socket.IO packet types
CONNECT = 0
DISCONNECT = 1
EVENT = 2
ACK = 3
CONNECT_ERROR = 4
BINARY_EVENT = 5
BINARY_ACK = 6

ACK_ID_MAX_DIGITS = 15
# Event names a client may not emit (socket.io-parser's list).
RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
)

# Engine.IO HTTP error codes and messages (engine.io's Server.errors)
UNKNOWN_TRANSPORT = 0
UNKNOWN_SID = 1
BAD_HANDSHAKE_METHOD = 2
BAD_REQUEST = 3
FORBIDDEN = 4
UNSUPPORTED_PROTOCOL_VERSION = 5
ERROR_MESSAGES = {
    UNKNOWN_TRANSPORT: "Transport unknown",
    UNKNOWN_SID: "Session ID unknown",
    BAD_HANDSHAKE_METHOD: "Bad handshake method",
    BAD_REQUEST: "Bad request",
    FORBIDDEN: "Forbidden",
    UNSUPPORTED_PROTOCOL_VERSION: "Unsupported protocol version",
}


class PacketError(ValueError):
    """A packet that does not parse: the server closes the session (as socket.io does)."""


@dataclass(frozen=True, slots=True)
class SioPacket:
    type: int
    nsp: str = "/"
    id: int | None = None
    data: Any = None
    attachments: int = 0


def _is_digit(char: str) -> bool:
    return "0" <= char <= "9"


def decode(text: str) -> SioPacket:
    """Parses one Socket.IO packet sent by a client."""
    if not text or not _is_digit(text[0]) or int(text[0]) > BINARY_ACK:
        raise PacketError("unknown packet type")
    kind = int(text[0])
    index, end = 1, len(text)
    attachments = 0
    if kind in (BINARY_EVENT, BINARY_ACK):
        dash = text.find("-", index)
        count = text[index:dash] if dash > 0 else ""
        if not count or not all(_is_digit(c) for c in count) or len(count) > 6:
            raise PacketError("illegal attachments")
        attachments = int(count)
        index = dash + 1
    nsp = "/"
    if index < end and text[index] == "/":
        comma = text.find(",", index)
        if comma < 0:
            nsp, index = text[index:], end
        else:
            nsp, index = text[index:comma], comma + 1
    start = index
    while index < end and _is_digit(text[index]):
        index += 1
    if index - start > ACK_ID_MAX_DIGITS:
        raise PacketError("ack id too long")
    ack_id = int(text[start:index]) if index > start else None
    data: Any = None
    if index < end:
        try:
            data = orjson.loads(text[index:])
        except orjson.JSONDecodeError:
            raise PacketError("invalid payload") from None
    if not _payload_valid(kind, data):
        raise PacketError("invalid payload")
    return SioPacket(kind, nsp, ack_id, data, attachments)


def _payload_valid(kind: int, data: Any) -> bool:
    """socket.io-parser's `isPayloadValid`, for what a client may send."""
    if kind == CONNECT:
        return data is None or isinstance(data, dict)
    if kind == DISCONNECT:
        return data is None
    if kind in (EVENT, BINARY_EVENT):
        return (
            isinstance(data, list)
            and len(data) > 0
            and (
                (isinstance(data[0], str) and data[0] not in RESERVED_EVENTS)
                or (isinstance(data[0], int | float) and not isinstance(data[0], bool))
            )
        )
    if kind in (ACK, BINARY_ACK):
        return isinstance(data, list)
    return False  # CONNECT_ERROR comes from servers only


def decode_payload(body: bytes) -> list[str]:
    """The Engine.IO packets of a long-polling request body."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        raise PacketError("payload is not UTF-8") from None
    return text.split("\x1e") if text else []


# -- server packets (Engine.IO `message` + Socket.IO packet, as bytes) ---------------------------
def _nsp_prefix(nsp: str) -> bytes:
    return b"" if nsp == "/" else nsp.encode() + b","


def open_packet(
    sid: str,
    upgrades: list[str],
    ping_interval_ms: int,
    ping_timeout_ms: int,
    max_payload: int,
) -> bytes:
    """Exactly the protocol's keys (the serving pod is in the `X-Pubsock-Pod` header)."""
    return b"0" + orjson.dumps(
        {
            "sid": sid,
            "upgrades": upgrades,
            "pingInterval": ping_interval_ms,
            "pingTimeout": ping_timeout_ms,
            "maxPayload": max_payload,
        }
    )


def connect_packet(sid: str, pid: str | None) -> bytes:
    body: dict[str, str] = {"sid": sid}
    if pid is not None:
        body["pid"] = pid
    return b"40" + orjson.dumps(body)


def connect_error_packet(nsp: str, message: str, data: Any = None) -> bytes:
    body: dict[str, Any] = {"message": message}
    if data is not None:
        body["data"] = data
    return b"44" + _nsp_prefix(nsp) + dumps(body)


def disconnect_packet(nsp: str = "/") -> bytes:
    return b"41" + _nsp_prefix(nsp)


def event_packet(args: list[Any]) -> bytes:
    return b"42" + dumps(args)


def ack_packet(ack_id: int, args: list[Any]) -> bytes:
    return b"43" + str(ack_id).encode() + dumps(args)


def error_body(code: int, message: str | None = None) -> dict[str, Any]:
    """The JSON body of an Engine.IO HTTP error (400/403), as engine.io sends it."""
    return {"code": code, "message": message or ERROR_MESSAGES[code]}
