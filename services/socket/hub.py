"""The one place on a pod that owns channel subscriptions: who listens to what, history, fan-out.

Every kind of session subscribes here (delivery.py): one registry, one presence count. Fan-out
writes pre-built bytes to every session of a channel in a plain loop: no `await` per connection,
so a slow client can never hold up the others; a session over its send budget is closed after the
loop. A message is built once per framing per pod (the native frame comes with the history
entry; another kind's is built at its first session and shared by the rest).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from services.core.ids import id_time_ms
from services.socket.delivery import NATIVE, Framing, Subscriber
from services.socket.history import NOT_RECOVERED, Entry, History, Recovery, Rewind
from services.socket.metrics import SocketMetrics
from services.socket.presence import Presence, PresenceEvent


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
        sessions = self._channels.get(channel)
        if not sessions:
            return
        self._metrics.frames_sent.inc(len(sessions))
        native_frame = entry.frame
        built: dict[Framing, bytes] | None = None  # other framings', once each
        if self._batching:
            pending = self._pending
            for session in sessions:
                framing = session.framing
                if framing is NATIVE:
                    frame = native_frame
                else:
                    if built is None:
                        built = {}
                    frame = _framed(framing, channel, entry, built)
                frames = pending.get(session)
                if frames is None:
                    pending[session] = [frame]
                else:
                    frames.append(frame)
            return
        slow: list[Subscriber] | None = None
        for session in sessions:
            framing = session.framing
            if framing is NATIVE:  # inline: the common case costs one identity check
                delivered = session.deliver(native_frame)
            else:
                if built is None:
                    built = {}
                delivered = session.deliver(_framed(framing, channel, entry, built))
            if not delivered:
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
            delivered = (
                session.deliver(frames[0]) if len(frames) == 1 else session.deliver_batch(frames)
            )
            if not delivered:
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
        """join/leave events to the sessions that asked for presence on those channels, built
        once per framing."""
        for channel, kind, sub in events:
            sessions = self._channels.get(channel)
            if not sessions:
                continue
            built: dict[Framing, bytes | None] = {}
            for session in sessions:
                if not session.wants_presence(channel):
                    continue
                framing = session.framing
                if framing in built:
                    frame = built[framing]
                else:
                    frame = built[framing] = framing.presence(channel, kind, sub)
                if frame is not None:
                    session.send_raw(frame)

    def session_count(self, channel: str) -> int:
        sessions = self._channels.get(channel)
        return len(sessions) if sessions else 0


def _framed(framing: Framing, channel: str, entry: Entry, built: dict[Framing, bytes]) -> bytes:
    """The message as a non-native `framing` writes it, built once per message for each
    distinct framing (the native frame comes with the entry)."""
    frame = built.get(framing)
    if frame is None:
        frame = built[framing] = framing.frame(channel, entry)
    return frame
