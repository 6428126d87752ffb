"""The one delivery interface: what the hub needs of a session, whatever its kind.

Every kind of session (native websocket, socket.io over websocket or long-polling, and any later
transport) is a `Subscriber` to the hub: one registry, one fan-out, one presence count, one
slow-consumer rule. A kind supplies only what differs: its `Framing` (how a message or a presence
event looks on its wire) and its transport (`deliver`). The hub builds each message once per
framing per pod, never per connection; sessions sharing a framing share the same bytes.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import orjson

from services.core.closecodes import CloseCode
from services.socket.guards import SendBudget
from services.socket.history import Entry
from services.socket.wsframe import text_frame


class Framing(Protocol):
    """How one kind of session writes a message; hashable: equal framings share one build."""

    def frame(self, channel: str, entry: Entry) -> bytes:
        """The bytes of a live message, ready for the session's transport."""
        ...

    def presence(self, channel: str, kind: str, sub: str | None) -> bytes | None:
        """A join/leave event (None: this kind has no presence events)."""
        ...


class NativeFraming:
    """The native websocket's: the frame the pump built with the history entry."""

    __slots__ = ()

    def frame(self, channel: str, entry: Entry) -> bytes:
        return entry.frame

    def presence(self, channel: str, kind: str, sub: str | None) -> bytes | None:
        return text_frame(orjson.dumps({"type": kind, "channel": channel, "sub": sub}))


NATIVE = NativeFraming()


class Subscriber(Protocol):
    """What the hub needs of a session."""

    @property
    def framing(self) -> Framing: ...

    @property
    def sub(self) -> str | None: ...

    def deliver(self, data: bytes) -> bool:
        """Writes live data; False when the session is over its send budget (the hub then
        calls `close_slow`, after the fan-out loop)."""
        ...

    def deliver_batch(self, frames: list[bytes]) -> bool:
        """Several live messages in one write (the pump was behind)."""
        ...

    def close_slow(self) -> None: ...

    def wants_presence(self, channel: str) -> bool: ...

    def send_raw(self, data: bytes) -> None:
        """Control data (presence events): always written."""
        ...


class LiveSession(Protocol):
    """What the pod's session registry needs: the one drain and maintenance path."""

    @property
    def open(self) -> bool: ...

    def maintain(self, now: float) -> None:
        """Once a maintenance tick: send budget, maximum age, liveness."""
        ...

    def close(self, code: CloseCode, reason: str) -> None:
        """Ends the session so that the client comes back (to this pod or another)."""
        ...

    def abort(self) -> None:
        """Ends it now, without a goodbye (the drain's last step)."""
        ...


class Wire:
    """A websocket's TCP transport under the send budget: the delivery path of every kind of
    session that writes websocket frames."""

    __slots__ = ("budget", "transport")

    def __init__(self, transport: asyncio.Transport, send_buffer_max_bytes: int) -> None:
        self.transport = transport
        self.budget = SendBudget(send_buffer_max_bytes)

    def deliver(self, data: bytes) -> bool:
        """Writes live data unless the unsent data is over budget."""
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        # usually 0: the kernel took everything written so far
        if buffered and not self.budget.admits(buffered):
            return False
        transport.write(data)
        return True

    def stalled(self) -> bool:
        return self.budget.stalled(self.transport.get_write_buffer_size())

    def replayed(self) -> None:
        """A replay is bounded by what the client asked for: not counted against live data."""
        self.budget.replayed(self.transport.get_write_buffer_size())
