"""The server end of one websocket, shared by every kind of session that speaks websocket.

websockets' sans-I/O `ServerProtocol` does the protocol (framing, control frames, the closing
handshake); this wires it to an asyncio transport: whole messages out of the bytes received,
what the protocol has to send written, the closing handshake bounded by a timer that cuts the
TCP connection when the client never answers. A session kind adds only what its messages mean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol

from services.socket.wsframe import MessageAssembler, flush


class WsLink:
    __slots__ = ("_assembler", "_close_timeout_s", "_close_timer", "protocol", "transport")

    def __init__(
        self, transport: asyncio.Transport, protocol: ServerProtocol, close_timeout_s: float
    ) -> None:
        self.transport = transport
        self.protocol = protocol
        self._assembler = MessageAssembler()
        self._close_timeout_s = close_timeout_s
        self._close_timer: asyncio.TimerHandle | None = None

    def receive(self, data: bytes, on_message: Callable[[bytes, bool], None]) -> bool:
        """Feeds received bytes: `on_message(data, is_text)` for each whole message, then writes
        the protocol's answers. True once the closing handshake has begun (either side)."""
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                message = self._assembler.add(event)
                if message is not None:
                    on_message(*message)
        flush(protocol, self.transport)
        return protocol.state is State.CLOSING or protocol.state is State.CLOSED

    def ping(self, payload: bytes) -> None:
        self.protocol.send_ping(payload)
        flush(self.protocol, self.transport)

    def close(self, code: int, reason: str = "") -> None:
        """Starts the closing handshake (if still open); the TCP connection is cut if the
        client never answers."""
        if self.protocol.state is State.OPEN:
            self.protocol.send_close(code, reason)
            flush(self.protocol, self.transport)
        self.arm_close_timer()

    def arm_close_timer(self) -> None:
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(
                self._close_timeout_s, self.transport.abort
            )

    def connection_lost(self) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
