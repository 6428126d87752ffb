"""Server-to-client websocket frames, built once and written to many connections.

Server frames are unmasked and we negotiate no compression, so a message's wire bytes are the
same for every connection: framing it once per pod is the floor of fan-out cost.
"""

from __future__ import annotations

import asyncio
import struct

from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from services.core.envelope import Envelope
from services.core.protocol import message_frame_parts

_FIN_TEXT = 0x81


def flush(protocol: ServerProtocol, transport: asyncio.Transport) -> None:
    """Writes what the sans-I/O protocol has to send; its empty chunk means: close the TCP."""
    for data in protocol.data_to_send():
        if data:
            transport.write(data)
        else:
            transport.close()


def text_frame(payload: bytes) -> bytes:
    """A complete, unfragmented text frame (RFC 6455 section 5.2) carrying `payload`."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, length) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, length) + payload


class MessageAssembler:
    """Client messages out of websocket frames, fragmented ones joined (RFC 6455 section 5.4).

    The size of a whole message is bounded by the sans-I/O protocol's `max_size` (1009 beyond).
    """

    __slots__ = ("_fragments", "_is_text")

    def __init__(self) -> None:
        self._fragments: list[bytes] | None = None
        self._is_text = True

    def add(self, frame: Frame) -> tuple[bytes, bool] | None:
        """(data, is_text) once a message is complete; None for control frames and fragments."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                return bytes(frame.data), opcode is Opcode.TEXT
            self._fragments = [bytes(frame.data)]
            self._is_text = opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data, self._fragments = b"".join(self._fragments), None
                return data, self._is_text
        return None


def message_text_frame(envelope: Envelope) -> tuple[bytes, tuple[int, int]]:
    """The `message` frame of an envelope as a websocket text frame, and where its `data` lies
    in that frame (for socket.io's form of the same message)."""
    payload, data_start, data_end = message_frame_parts(envelope)
    frame = text_frame(payload)
    header = len(frame) - len(payload)
    return frame, (header + data_start, header + data_end)
