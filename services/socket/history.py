"""A bounded per-channel history of delivered frames, and the recovery rules built on it.

Recovery must never leave a silent gap. The history knows three things that make that possible:
- which ids it holds per channel (exact resume after an id, and duplicate detection);
- `break_seq`: entries received before the last continuity break (the stream died, the pod
  resubscribed) cannot prove that nothing is missing after them;
- `complete_from_ms`, and per channel the publish time of the newest evicted entry: the window
  of publish times for which this pod holds every message, used to resolve `@<ms>` positions.
- while a warm start's backlog (a seek's replay) is still arriving, `backlog_until_ms`: a channel
  is complete from the seek point only once a message of it published after the opening arrived
  (Pub/Sub keeps each channel's order, so its backlog is over); until then from the opening.

The same knowledge answers a rewind (the last N messages, or those of the last T seconds) with
an honest `complete` flag: whether these are all of the window's messages.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

POSITION_PREFIX = "@"


@dataclass(slots=True)
class Entry:
    id: str
    seq: int
    publish_ms: int
    frame: bytes  # the websocket frame, ready to write to any connection
    # The message's fields other framings are built from: `data` is frame[data_start:data_end]
    # (already encoded JSON), `ts` and `sub` the envelope's.
    ts: int = 0
    sub: str | None = None
    data_start: int = 0
    data_end: int = 0
    # The socket.io form of the same message (services.socket.socketio.frames), built once per
    # pod, lazily: only when a socket.io client is in the channel.
    sio: tuple[bytes, bytes] | None = None


@dataclass(slots=True)
class ChannelHistory:
    entries: deque[Entry] = field(default_factory=deque)
    index: dict[str, Entry] = field(default_factory=dict)
    evicted_ms: int = 0  # publish time of the newest entry evicted from this channel


class Recovery(NamedTuple):
    recovered: bool
    entries: list[Entry]


NOT_RECOVERED = Recovery(False, [])


class Rewind(NamedTuple):
    """The newest messages of a window, oldest first; `complete`: provably all of them."""

    entries: list[Entry]
    complete: bool


def parse_position_ms(position: str) -> int | None:
    if not position.startswith(POSITION_PREFIX):
        return None
    digits = position[1:]
    if not digits.isdigit() or len(digits) > 15:
        return None
    return int(digits)


class History:
    def __init__(
        self,
        size: int,
        age_s: float,
        max_channels: int,
        position_slack_ms: int,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        stream_ms: Callable[[], int] | None = None,
    ) -> None:
        self.size = size
        self.age_ms = int(age_s * 1000)
        self.max_channels = max_channels
        self.position_slack_ms = position_slack_ms
        self._clock_ms = clock_ms
        # What this pod has processed of the stream (the pod passes its pump's), no later than
        # the clock: a position is never ahead of the messages this pod has received.
        self._stream_ms = stream_ms or clock_ms
        self._channels: OrderedDict[str, ChannelHistory] = OrderedDict()
        self._seq = 0
        self._messages = 0
        self.break_seq = 0
        self.complete_from_ms = 2**62  # nothing is complete until the stream starts
        self.lru_evicted_ms = 0
        self.watermark_ms = 0  # newest publish time seen
        self.backlog_until_ms: int | None = None
        self._backlog_over: set[str] = set()  # channels whose backlog is known to be over

    # -- the stream --------------------------------------------------------------------------
    def stream_started(self, complete_from_ms: int, backlog_until_ms: int | None = None) -> None:
        """The pod's stream (re)started; it is complete for messages published from then on
        (with `backlog_until_ms`: once each channel's backlog published before then is in).

        Called again after a break: entries received before it can no longer anchor a recovery.
        """
        self.break_seq = self._seq + 1
        self.complete_from_ms = complete_from_ms
        self.backlog_until_ms = backlog_until_ms
        self._backlog_over.clear()

    def backlog_over(self) -> None:
        """The whole backlog is in: every channel is complete from `complete_from_ms`."""
        self.backlog_until_ms = None
        self._backlog_over.clear()

    def _in_backlog(self, channel: str) -> bool:
        return self.backlog_until_ms is not None and channel not in self._backlog_over

    def entry(self, channel: str, message_id: str) -> Entry | None:
        """The entry of a message id in the channel's history, if held."""
        history = self._channels.get(channel)
        return history.index.get(message_id) if history is not None else None

    def contains(self, channel: str, message_id: str) -> bool:
        history = self._channels.get(channel)
        return history is not None and message_id in history.index

    def append(
        self,
        channel: str,
        message_id: str,
        publish_ms: int,
        frame: bytes,
        ts: int = 0,
        sub: str | None = None,
        data_span: tuple[int, int] = (0, 0),
    ) -> Entry:
        history = self._channels.get(channel)
        if history is None:
            history = self._channels[channel] = ChannelHistory()
            if len(self._channels) > self.max_channels:
                self._evict_channel()
        else:
            self._channels.move_to_end(channel)
        self._seq += 1
        if self.backlog_until_ms is not None and publish_ms >= self.backlog_until_ms:
            self._backlog_over.add(channel)
        entry = Entry(message_id, self._seq, publish_ms, frame, ts, sub, data_span[0], data_span[1])
        history.entries.append(entry)
        history.index[message_id] = entry
        self._messages += 1
        if publish_ms > self.watermark_ms:
            self.watermark_ms = publish_ms
        if len(history.entries) > self.size:
            self._evict_oldest(history)
        return entry

    def _evict_oldest(self, history: ChannelHistory) -> None:
        old = history.entries.popleft()
        del history.index[old.id]
        self._messages -= 1
        history.evicted_ms = max(history.evicted_ms, old.publish_ms)

    def _evict_channel(self) -> None:
        _, history = self._channels.popitem(last=False)
        self._messages -= len(history.entries)
        newest = history.entries[-1].publish_ms if history.entries else history.evicted_ms
        self.lru_evicted_ms = max(self.lru_evicted_ms, newest)

    def expire(self) -> None:
        """Drops entries older than the age bound; run periodically."""
        cutoff = self._clock_ms() - self.age_ms
        for channel in list(self._channels):
            history = self._channels[channel]
            while history.entries and history.entries[0].publish_ms < cutoff:
                self._evict_oldest(history)
            if not history.entries:
                del self._channels[channel]
                self.lru_evicted_ms = max(self.lru_evicted_ms, history.evicted_ms)

    # -- positions and recovery ------------------------------------------------------------
    def position(self, channel: str) -> str:
        """Where the channel stands here: its newest id, or `@<ms>` when no id can anchor, at
        the stream time (`now_ms`)."""
        history = self._channels.get(channel)
        if history and history.entries and history.entries[-1].seq >= self.break_seq:
            return history.entries[-1].id
        return f"{POSITION_PREFIX}{self.now_ms()}"

    def now_ms(self) -> int:
        """The time this pod's positions are stamped with: how far it has processed its stream,
        never the wall clock alone. A pod whose stream is stalled or deaf must not hand out a
        position past messages it has not received: a client resuming from it on another pod
        would skip them, told `recovered: true` (found by make soak)."""
        return min(self._clock_ms(), self._stream_ms())

    def _complete_after_ms(self, channel: str) -> int:
        history = self._channels.get(channel)
        evicted = history.evicted_ms if history is not None else self.lru_evicted_ms
        complete = max(self.complete_from_ms, evicted)
        if self.backlog_until_ms is not None and self._in_backlog(channel):
            complete = max(complete, self.backlog_until_ms)
        return complete

    def _anchors(self, channel: str, entry: Entry) -> bool:
        """Whether this pod provably holds every message of the channel after `entry`."""
        if entry.seq < self.break_seq or entry.publish_ms < self.complete_from_ms:
            # Before the break, or older than what the pod can prove it holds (the emulator
            # replays a retained backlog to a new subscription; the real service does not).
            return False
        # More of the channel's backlog may still be on its way.
        return not (
            self.backlog_until_ms is not None
            and entry.publish_ms < self.backlog_until_ms
            and self._in_backlog(channel)
        )

    def recover(self, channel: str, since: str) -> Recovery | None:
        """Everything after `since`, or NOT_RECOVERED; None for an id not seen (yet)."""
        position_ms = parse_position_ms(since)
        history = self._channels.get(channel)
        if position_ms is not None:
            # A mark without a message: the client saw nothing of the channel after about that
            # time. Messages in flight then may carry a slightly older publish time: the slack.
            floor = position_ms - self.position_slack_ms
            if floor < self._complete_after_ms(channel):
                return NOT_RECOVERED
            if history is None:
                return Recovery(True, [])
            tail: list[Entry] = []
            for entry in reversed(history.entries):
                if entry.publish_ms <= floor:
                    break
                tail.append(entry)
            tail.reverse()
            return Recovery(True, tail)
        found = history.index.get(since) if history is not None else None
        if found is None:
            return None
        entry = found
        if not self._anchors(channel, entry):
            return NOT_RECOVERED
        assert history is not None
        if entry is history.entries[-1]:
            return Recovery(True, [])
        tail = []
        for later in reversed(history.entries):
            if later is entry:
                break
            tail.append(later)
        tail.reverse()
        return Recovery(True, tail)

    def rewind(self, channel: str, count: int | None, seconds: float | None) -> Rewind:
        """The last `count` messages published in the last `seconds` (either bound may be
        absent: no count is no bound on the number; no seconds is the whole history window).

        `complete` when these are provably every message of that window:
        - the window's start is covered: this pod holds every message of the channel published
          after it (the rule of an `@<ms>` position: not before the stream started or last
          broke, not evicted, not in a backlog still arriving); or
        - `count` messages were found and the pod can prove it holds everything after the
          oldest of them (the rule of a `since` id: it arrived on the unbroken stream, after the
          point the pod is complete from, and the channel's warm-start backlog is over).
        Otherwise what is held is returned, and messages of the window may be missing before
        or among these. Either way nothing after them is missing: they end at the newest
        message this pod has, and what comes later arrives live.
        """
        window_ms = self.age_ms if seconds is None else int(seconds * 1000)
        floor = self._clock_ms() - window_ms
        history = self._channels.get(channel)
        entries: list[Entry] = []
        if history is not None:
            limit = len(history.entries) if count is None else count
            for entry in reversed(history.entries):
                if len(entries) >= limit or entry.publish_ms <= floor:
                    break
                entries.append(entry)
            entries.reverse()
        complete = floor >= self._complete_after_ms(channel) or (
            count is not None and 0 < count == len(entries) and self._anchors(channel, entries[0])
        )
        return Rewind(entries, complete)

    @property
    def channel_count(self) -> int:
        return len(self._channels)

    @property
    def message_count(self) -> int:
        return self._messages
