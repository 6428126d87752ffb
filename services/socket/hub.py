"""The one place on a pod that owns channel subscriptions: who listens to what, history, fan-out.

Fan-out writes one pre-built frame to every session of a channel in a plain loop: no `await` per
connection, so a slow client can never hold up the others; a session over its send budget is
closed with 1013 after the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

import orjson

from services.core.ids import id_time_ms
from services.socket.history import NOT_RECOVERED, Entry, History, Recovery, Rewind
from services.socket.metrics import SocketMetrics
from services.socket.presence import Presence, PresenceEvent
from services.socket.wsframe import text_frame


class Subscriber(Protocol):
    """What the hub needs of a session."""

    @property
    def sub(self) -> str | None: ...

    def deliver(self, frame: bytes) -> bool:
        """Writes a live frame; False when the session is over its send budget."""
        ...

    def close_slow(self) -> None: ...

    def wants_presence(self, channel: str) -> bool: ...

    def send_raw(self, frame: bytes) -> None: ...


class Hub:
    def __init__(
        self,
        history: History,
        metrics: SocketMetrics,
        recovery_wait_s: float,
        presence: Presence | None = None,
    ) -> None:
        self.history = history
        self.presence = presence
        self._metrics = metrics
        self._recovery_wait_s = recovery_wait_s
        self._channels: dict[str, set[Subscriber]] = {}
        self._arrivals: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.subscription_count = 0
        # Set only while another kind of subscriber (socket.io rooms) exists on this pod: called
        # once per live message, never per connection.
        self.sidecar: Callable[[str, Entry], None] | None = None
        self._batching = False
        self._pending: dict[Subscriber, list[bytes]] = {}

    # -- delivery ----------------------------------------------------------------------------
    def publish(self, channel: str, entry: Entry, live: bool = True) -> None:
        """Hands a new history entry to every session on the channel (live messages only)."""
        waiter = self._arrivals.pop((channel, entry.id), None) if self._arrivals else None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if not live:
            return
        sidecar = self.sidecar
        if sidecar is not None:
            sidecar(channel, entry)
        sessions = self._channels.get(channel)
        if not sessions:
            return
        frame = entry.frame
        self._metrics.frames_sent.inc(len(sessions))
        if self._batching:
            pending = self._pending
            for session in sessions:
                frames = pending.get(session)
                if frames is None:
                    pending[session] = [frame]
                else:
                    frames.append(frame)
            return
        slow: list[Subscriber] | None = None
        for session in sessions:
            if not session.deliver(frame):
                if slow is None:
                    slow = []
                slow.append(session)
        if slow:
            for session in slow:
                session.close_slow()

    def begin_batch(self) -> None:
        """Until `end_batch`, frames are collected per session instead of written one by one.

        Writing is most of a delivery's cost (one `send` system call each); when the pump hands
        over several messages at once (it is behind), each connection gets one write for all.
        """
        self._batching = True

    def end_batch(self) -> None:
        self._batching = False
        pending = self._pending
        if not pending:
            return
        self._pending = {}
        slow: list[Subscriber] | None = None
        for session, frames in pending.items():
            if not session.deliver(frames[0] if len(frames) == 1 else b"".join(frames)):
                if slow is None:
                    slow = []
                slow.append(session)
        if slow:
            for session in slow:
                session.close_slow()

    # -- subscriptions -----------------------------------------------------------------------
    def add(self, channel: str, session: Subscriber) -> bool:
        sessions = self._channels.get(channel)
        if sessions is None:
            sessions = self._channels[channel] = set()
        if session in sessions:
            return False
        sessions.add(session)
        self.subscription_count += 1
        if self.presence is not None:
            self.presence.joined(channel, session.sub)
        return True

    def remove(self, channel: str, session: Subscriber) -> bool:
        sessions = self._channels.get(channel)
        if sessions is None or session not in sessions:
            return False
        sessions.discard(session)
        self.subscription_count -= 1
        if self.presence is not None:
            self.presence.left(channel, session.sub)
        if not sessions:
            del self._channels[channel]
        return True

    def remove_all(self, channels: Iterable[str], session: Subscriber) -> None:
        for channel in channels:
            self.remove(channel, session)

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self, channel: str, since: str) -> Recovery:
        """The history after `since`, waiting briefly for an id this pod has not received yet.

        A client may come from a pod that delivered a message a moment before this pod got it.
        A time-ordered id newer than what this pod has seen says "wait"; membership decides.
        The caller must attach the session with no `await` after this returns.
        """
        recovery = self.history.recover(channel, since)
        if recovery is None and self._worth_waiting(since):
            key = (channel, since)
            waiter = self._arrivals.get(key)
            if waiter is None:
                waiter = self._arrivals[key] = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self._recovery_wait_s)
            except TimeoutError:
                self._arrivals.pop(key, None)
            recovery = self.history.recover(channel, since)
        if recovery is None:
            recovery = NOT_RECOVERED
        self._metrics.recoveries.labels(
            "recovered" if recovery.recovered else "not_recovered"
        ).inc()
        return recovery

    def rewind(self, channel: str, count: int | None, seconds: int | None) -> Rewind:
        """The channel's recent history a subscribe asked for (History.rewind), counted.
        The caller must attach the session with no `await` after this returns."""
        rewind = self.history.rewind(channel, count, seconds)
        self._metrics.rewinds.labels("complete" if rewind.complete else "incomplete").inc()
        self._metrics.rewound_messages.inc(len(rewind.entries))
        return rewind

    def _worth_waiting(self, since: str) -> bool:
        created_ms = id_time_ms(since)
        if created_ms is None or self._recovery_wait_s <= 0:
            return False
        # Older than what this pod has already processed (minus clock slack): it is not coming.
        return created_ms >= self.history.watermark_ms - self.history.position_slack_ms

    def presence_events(self, events: list[PresenceEvent]) -> None:
        """join/leave frames to the sessions that asked for presence on those channels."""
        for channel, kind, sub in events:
            sessions = self._channels.get(channel)
            if not sessions:
                continue
            frame = text_frame(orjson.dumps({"type": kind, "channel": channel, "sub": sub}))
            for session in sessions:
                if session.wants_presence(channel):
                    session.send_raw(frame)

    def all_sessions(self) -> set[Subscriber]:
        return {s for sessions in self._channels.values() for s in sessions}

    def session_count(self, channel: str) -> int:
        sessions = self._channels.get(channel)
        return len(sessions) if sessions else 0
