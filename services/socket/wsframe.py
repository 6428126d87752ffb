"""Server-to-client websocket frames, built once and written to many connections.

Server frames are unmasked and we negotiate no compression, so a message's wire bytes are the
same for every connection: framing it once per pod is the floor of fan-out cost.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """A complete, unfragmented text frame (RFC 6455 section 5.2) carrying `payload`."""
    length = len(payload)
    if length < 126:
        return bytes((_FIN_TEXT, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", _FIN_TEXT, 126, length) + payload
    return struct.pack("!BBQ", _FIN_TEXT, 127, length) + payload
