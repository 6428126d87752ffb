"""A message's socket.io form, built once per pod from the message's fields, cached on the entry.

Event packet: `42["<event>",<data>,{"id","channel","ts","sub"?},"<offset>"]` (the offset only with
connection state recovery). `<data>` is the JSON the pump already encoded for the native frame
(`Entry.data_start`/`data_end` say where it lies, services.core.protocol.MessageFrame): encoded
once per pod, whatever the framing.
"""

from __future__ import annotations

import weakref

from services.core.envelope import dumps
from services.socket.history import Entry
from services.socket.socketio.recovery import message_offset
from services.socket.wsframe import text_frame


class EventFrames:
    def __init__(self, event: str, with_offset: bool) -> None:
        self._head = b"42[" + dumps(event) + b","
        self._with_offset = with_offset
        # Alive while a session uses them (weak values): one per (transport, room set).
        self._framings: weakref.WeakValueDictionary[tuple[bool, bytes | None], SioFraming] = (
            weakref.WeakValueDictionary()
        )

    def framing(self, websocket: bool, suffix: bytes | None) -> SioFraming:
        """The one framing object for a transport and a signed room set (None: the default)."""
        key = (websocket, suffix)
        framing = self._framings.get(key)
        if framing is None:
            framing = self._framings[key] = SioFraming(self, websocket, suffix)
        return framing

    def build(self, channel: str, entry: Entry) -> tuple[bytes, bytes]:
        """(Engine.IO packet, websocket frame of it); cached on the entry."""
        cached = entry.sio
        if cached is not None:
            return cached
        data = entry.frame[entry.data_start : entry.data_end]
        meta = b'{"id":' + dumps(entry.id) + b',"channel":' + dumps(channel) + b',"ts":'
        meta += dumps(entry.ts)
        if entry.sub is not None:
            meta += b',"sub":' + dumps(entry.sub)
        meta += b"}"
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


class SioFraming:
    """socket.io's framing (delivery.py): a message's event packet for long-polling or its
    websocket frame, for the pod's default offsets or a session's signed room set. Interned by
    `EventFrames.framing`: sessions with equal framings share one object, so the hub's lookup of
    a message's build is an identity hash in C, and they share one build per message."""

    __slots__ = ("__weakref__", "_frames", "_suffix", "_websocket")

    def __init__(self, frames: EventFrames, websocket: bool, suffix: bytes | None) -> None:
        self._frames = frames
        self._websocket = websocket
        self._suffix = suffix

    def frame(self, channel: str, entry: Entry) -> bytes:
        packet, frame = self._frames.build(channel, entry)
        if self._suffix is not None:
            packet, frame = EventFrames.with_rooms(packet, self._suffix)
        return frame if self._websocket else packet

    def presence(self, channel: str, kind: str, sub: str | None) -> bytes | None:
        return None  # socket.io clients ask with the `presence` event
