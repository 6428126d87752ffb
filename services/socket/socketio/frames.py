"""A message's socket.io form, built once per pod from its websocket frame, and cached on the entry.

Event packet: `42["<event>",<data>,{"id","channel","ts","sub"?},"<offset>"]` (the offset only with
connection state recovery). The data bytes are cut out of the native frame, not re-encoded: the
native payload is `{"type":"message","channel":..,"id":..,"data":<data>,"ts":<ts>[,"sub":..]}`
(services.core.protocol.message_frame), and the last `,"ts":` in it is the envelope's (a JSON
string cannot hold an unescaped quote). Anything else is parsed and re-encoded instead.
"""

from __future__ import annotations

from services.core.envelope import dumps, loads
from services.socket.history import Entry
from services.socket.socketio.recovery import message_offset
from services.socket.wsframe import text_frame

_TS_KEY = b',"ts":'


def ws_payload(frame: bytes) -> bytes:
    """The payload of an unmasked server text frame built by `wsframe.text_frame`."""
    length = frame[1] & 0x7F
    return frame[2 + (2 if length == 126 else 8 if length == 127 else 0) :]


class EventFrames:
    def __init__(self, event: str, with_offset: bool) -> None:
        self._head = b"42[" + dumps(event) + b","
        self._with_offset = with_offset

    def build(self, channel: str, entry: Entry) -> tuple[bytes, bytes]:
        """(Engine.IO packet, websocket frame of it); cached on the entry."""
        cached = entry.sio
        if cached is not None:
            return cached
        payload = ws_payload(entry.frame)
        channel_json = dumps(channel)
        id_json = dumps(entry.id)
        prefix = b'{"type":"message","channel":' + channel_json + b',"id":' + id_json + b',"data":'
        cut = payload.rfind(_TS_KEY)
        if payload.startswith(prefix) and cut > len(prefix) and payload.endswith(b"}"):
            data = payload[len(prefix) : cut]
            tail = payload[cut + len(_TS_KEY) : -1]  # <ts>[,"sub":"..."]
        else:  # pragma: no cover - every pod frame has that shape; be safe anyway
            message = loads(payload)
            data = dumps(message.get("data"))
            tail = dumps(message.get("ts"))
            if message.get("sub") is not None:
                tail += b',"sub":' + dumps(message["sub"])
        meta = b'{"id":' + id_json + b',"channel":' + channel_json + b',"ts":' + tail + b"}"
        packet = self._head + data + b"," + meta
        if self._with_offset:
            packet += b',"' + message_offset(channel, entry.id).encode() + b'"'
        packet += b"]"
        built = (packet, text_frame(packet))
        entry.sio = built
        return built

    @staticmethod
    def with_rooms(packet: bytes, suffix: bytes) -> tuple[bytes, bytes]:
        """A message's packet for a session with a signed room set: `suffix` (`~rooms~mac`)
        appended to its offset, the event's last string."""
        varied = packet[:-2] + suffix + b'"]'
        return varied, text_frame(varied)
