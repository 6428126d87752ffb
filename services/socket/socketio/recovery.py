"""Connection state recovery across pods: the signed session id (pid) and the offsets.

socket.io's client keeps two strings: the `pid` of its CONNECT packet and the last string argument
of the last event it received (the offset); on reconnect it sends `{pid, offset}` in the CONNECT
auth, and `socket.recovered` is true when the server answers with the same pid.

A pod that never saw the session must find everything in those two strings:
- pid = base64url(JSON {v, sid, sub, rooms, iat}) "." base64url(HMAC-SHA256): the socket.io id,
  the token's subject (a pid only resumes for the same `sub`) and the rooms declared at connect.
- offset = `<room>/<position>` on a message event (the room it came from and its id), or
  `<room>/<position>/<ms>` on pubsock's own per-session events (`pubsock:joined`, `pubsock:left`),
  or `/<ms>` when no room anchors it. A position is a message id or `@<ms>`, as on the websocket.
- A session whose rooms are no longer those of its pid (it joined or left rooms after connecting)
  gets `~<room>,<room>...~<mac>` after every offset it is sent, its whole room set signed: the
  pid is fixed at connect, and the offset is the only string the client keeps that the server
  can change. Such a session's message events are framed for its room set (once per distinct set
  per message); a session whose rooms are its pid's shares the pod's one frame per message.
  Channel names never hold `/`, `,` or `~` (services.core.channels), so no escaping is needed.
- A room joined moments ago is `<room>/<position>` in that set (its position at the join) until
  twice POSITION_SLACK_MS have passed: it resumes exactly after that position, not from the
  anchor's time minus the slack, which could reach back before the join and hand the client a
  message of that room it never had, behind later ones (found by make soak).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass

import orjson

from services.core.channels import CHANNEL_MAX_CHARS, is_valid_channel
from services.socket.history import parse_position_ms

PID_VERSION = 1
PID_MAX_CHARS = 16384
OFFSET_MAX_CHARS = 300  # without a room set
POSITION_MAX_CHARS = 128
_DOMAIN = b"pubsock socket.io pid\x00"
_ROOMS_DOMAIN = b"pubsock socket.io rooms\x00"
_MAC_BYTES = 16


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class SessionId:
    sid: str
    sub: str | None
    rooms: tuple[str, ...]
    issued_at: int


class PidSigner:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, _DOMAIN + body, hashlib.sha256).digest()[:_MAC_BYTES]

    def sign(self, sid: str, sub: str | None, rooms: list[str]) -> str:
        body = orjson.dumps(
            {"v": PID_VERSION, "sid": sid, "sub": sub, "rooms": rooms, "iat": int(time.time())}
        )
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def verify(self, pid: object) -> SessionId | None:
        """The session id's content, or None when it is malformed or not signed with our key."""
        if not isinstance(pid, str) or len(pid) > PID_MAX_CHARS or pid.count(".") != 1:
            return None
        encoded_body, encoded_mac = pid.split(".")
        try:
            body, mac = _unb64(encoded_body), _unb64(encoded_mac)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            claims = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(claims, dict) or claims.get("v") != PID_VERSION:
            return None
        sid, sub, rooms, issued = (claims.get(k) for k in ("sid", "sub", "rooms", "iat"))
        if (
            not isinstance(sid, str)
            or not (sub is None or isinstance(sub, str))
            or not isinstance(rooms, list)
            or not all(is_valid_channel(room) for room in rooms)
            or not isinstance(issued, int)
        ):
            return None
        return SessionId(sid, sub, tuple(rooms), issued)

    def _rooms_mac(self, joined: bytes) -> str:
        mac = hmac.new(self._key, _ROOMS_DOMAIN + joined, hashlib.sha256).digest()[:_MAC_BYTES]
        return _b64(mac)

    def rooms_suffix(self, rooms: list[str] | tuple[str, ...]) -> str:
        """`~<rooms>~<mac>`: what follows every offset of a session whose rooms left its pid's.

        The set is sorted, so sessions in the same rooms share one suffix (and one frame per
        message). It is not bound to a session: the rooms are checked against the reconnecting
        client's token anyway, and the signature only keeps a forged list out.
        """
        joined = ",".join(sorted(rooms))
        return f"~{joined}~{self._rooms_mac(joined.encode())}"

    def verify_rooms(self, suffix: str) -> tuple[str, ...] | None:
        """The room set of a suffix (without its leading `~`), or None when forged or malformed:
        its entries, `room` or `room/<join position>` (split_room_entry)."""
        joined, sep, mac = suffix.partition("~")
        if not sep or not hmac.compare_digest(mac, self._rooms_mac(joined.encode())):
            return None
        rooms = tuple(joined.split(",")) if joined else ()
        return rooms if all(split_room_entry(room) is not None for room in rooms) else None


@dataclass(frozen=True, slots=True)
class Offset:
    room: str | None  # the anchor: recovered exactly from `position`
    position: str | None
    sync_ms: int | None  # when the client was last in step (other rooms resume from here)
    rooms: str | None = None  # the signed room set after the first `~`, still to be verified


def _valid_position(position: str) -> bool:
    if not position or len(position) > POSITION_MAX_CHARS:
        return False
    if position.startswith("@"):
        return parse_position_ms(position) is not None
    return all(c.isascii() and (c.isalnum() or c in "_-") for c in position)


def offset_max_chars(max_rooms: int) -> int:
    """The longest offset a session in at most `max_rooms` rooms can be sent."""
    return (
        OFFSET_MAX_CHARS + max_rooms * (CHANNEL_MAX_CHARS + POSITION_MAX_CHARS + 2) + 2 * _MAC_BYTES
    )


def room_entry(room: str, position: str | None) -> str:
    """A room of a signed room set, with its join position while it was joined moments ago."""
    return room if position is None else f"{room}/{position}"


def split_room_entry(entry: str) -> tuple[str, str | None] | None:
    """(room, join position or None), or None when malformed."""
    room, sep, position = entry.partition("/")
    if not is_valid_channel(room) or (sep and not _valid_position(position)):
        return None
    return room, (position if sep else None)


def parse_offset(offset: object, max_rooms: int = 0) -> Offset | None:
    if not isinstance(offset, str) or len(offset) > offset_max_chars(max_rooms):
        return None
    offset, sep, rooms = offset.partition("~")
    if len(offset) > OFFSET_MAX_CHARS or (sep and not rooms):
        return None
    parsed = _parse_anchor(offset)
    if parsed is None or not sep:
        return parsed
    return Offset(parsed.room, parsed.position, parsed.sync_ms, rooms)


def _parse_anchor(offset: str) -> Offset | None:
    parts = offset.split("/")
    if len(parts) == 2 and parts[0] == "":
        ms = parts[1]
        return Offset(None, None, int(ms)) if ms.isdigit() and len(ms) <= 15 else None
    if len(parts) not in (2, 3) or not is_valid_channel(parts[0]) or not _valid_position(parts[1]):
        return None
    sync_ms: int | None = None
    if len(parts) == 3:
        if not parts[2].isdigit() or len(parts[2]) > 15:
            return None
        sync_ms = int(parts[2])
    return Offset(parts[0], parts[1], sync_ms)


def message_offset(channel: str, message_id: str) -> str:
    return f"{channel}/{message_id}"


def state_offset(room: str | None, position: str | None, now_ms: int) -> str:
    if room is None or position is None:
        return f"/{now_ms}"
    return f"{room}/{position}/{now_ms}"
