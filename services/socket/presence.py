"""Presence across pods: who is subscribed to a channel, eventually consistent within seconds.

Each pod announces its own subscribers on the topic (attribute `kind` = `presence`, ordering key
`presence:<pod>`): deltas coalesced to one announcement per PRESENCE_INTERVAL_S (a heartbeat when
nothing changed) and a full snapshot every PRESENCE_SNAPSHOT_S, split into parts well under the
Pub/Sub message limit. Announcements are numbered per pod, so a late delta never overrides a
newer snapshot. Every pod aggregates them; a pod not heard for PRESENCE_TTL_S is forgotten. A pod
also hears its own announcements: when they stop coming back, it is deaf (`last_own_heard`).

Body (version 1): {"v": 1, "pod", "seq", "type": "delta" | "snapshot", "snapshot": id,
"part", "parts", "channels": {channel: {"count": n, "subs": {sub: connections}}}}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.core.broker import Broker, BrokerBusy, BrokerUnavailable, Delivery, OutgoingMessage
from services.core.envelope import KIND_ATTRIBUTE, PRESENCE_KIND

log = logging.getLogger(__name__)

VERSION = 1
PART_MAX_BYTES = 256 * 1024  # Pub/Sub allows 10 MB; parts stay far below it


@dataclass(slots=True)
class ChannelState:
    count: int = 0  # connections, anonymous ones included
    subs: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "subs": dict(self.subs)}


@dataclass(slots=True)
class RemotePod:
    seq: int = 0
    heard_at: float = 0.0
    channels: dict[str, ChannelState] = field(default_factory=dict)
    pending_snapshot: dict[str, ChannelState] | None = None


# (channel, "join" | "leave", sub)
PresenceEvent = tuple[str, str, str]


class Presence:
    def __init__(
        self,
        pod_name: str,
        broker: Broker,
        interval_s: float,
        snapshot_s: float,
        ttl_s: float,
        on_events: Callable[[list[PresenceEvent]], None],
        on_sent: Callable[[], None] = lambda: None,
    ) -> None:
        self.pod_name = pod_name
        self._broker = broker
        self._interval_s = interval_s
        self._snapshot_s = snapshot_s
        self._ttl_s = ttl_s
        self._on_events = on_events
        self._on_sent = on_sent
        self._local: dict[str, ChannelState] = {}
        self._remote: dict[str, RemotePod] = {}
        self._totals: dict[str, ChannelState] = {}
        self._dirty: set[str] = set()
        self._seq = 0
        self._snapshot_id = 0
        self.last_own_heard = time.monotonic()
        self.own_heard = asyncio.Event()
        self.announcements_sent = 0

    def restart_silence(self) -> None:
        """Deafness is judged from now on (the pod just started, or just restarted its stream):
        one restart per silence."""
        self.last_own_heard = time.monotonic()

    # -- local sessions ------------------------------------------------------------------------
    def joined(self, channel: str, sub: str | None) -> None:
        self._change_local(channel, sub, +1)

    def left(self, channel: str, sub: str | None) -> None:
        self._change_local(channel, sub, -1)

    def _change_local(self, channel: str, sub: str | None, delta: int) -> None:
        state = self._local.get(channel)
        if state is None:
            state = self._local[channel] = ChannelState()
        state.count += delta
        if sub is not None:
            state.subs[sub] += delta
            if state.subs[sub] <= 0:
                del state.subs[sub]
        if state.count <= 0:
            del self._local[channel]
        self._dirty.add(channel)
        events: list[PresenceEvent] = []
        self._apply(channel, 1 if delta > 0 else -1, sub, events)
        if events:
            self._on_events(events)

    # -- the aggregate ---------------------------------------------------------------------------
    def _apply(
        self, channel: str, count_delta: int, sub: str | None, events: list[PresenceEvent]
    ) -> None:
        self._add(channel, count_delta, {sub: count_delta} if sub is not None else {}, events)

    def _add(
        self, channel: str, count_delta: int, subs: dict[str, int], events: list[PresenceEvent]
    ) -> None:
        total = self._totals.get(channel)
        if total is None:
            total = self._totals[channel] = ChannelState()
        total.count += count_delta
        for sub, delta in subs.items():
            before = total.subs[sub]
            after = before + delta
            if after <= 0:
                del total.subs[sub]
            else:
                total.subs[sub] = after
            if before <= 0 < after:
                events.append((channel, "join", sub))
            elif after <= 0 < before:
                events.append((channel, "leave", sub))
        if total.count <= 0 and not total.subs:
            del self._totals[channel]

    def _set_remote_channel(
        self, pod: RemotePod, channel: str, new: ChannelState | None, events: list[PresenceEvent]
    ) -> None:
        """Replaces a remote pod's state of a channel, applying only the net change: a member
        announced again (every snapshot) must not look like a leave and a join."""
        old = pod.channels.pop(channel, None)
        if new is not None and new.count > 0:
            pod.channels[channel] = new
        else:
            new = None
        old_count = old.count if old is not None else 0
        new_count = new.count if new is not None else 0
        subs: dict[str, int] = {}
        for sub in set(old.subs if old else ()) | set(new.subs if new else ()):
            delta = (new.subs.get(sub, 0) if new else 0) - (old.subs.get(sub, 0) if old else 0)
            if delta:
                subs[sub] = delta
        if subs or new_count != old_count:
            self._add(channel, new_count - old_count, subs, events)

    def count(self, channel: str) -> tuple[int, list[str]]:
        total = self._totals.get(channel)
        if total is None:
            return 0, []
        return max(0, total.count), sorted(total.subs)

    def summary(self, channel: str, members_max: int) -> dict[str, object]:
        """A presence answer's body, whatever the kind of session asks: `count`, and `members`
        when there are no more than `members_max` of them."""
        count, members = self.count(channel)
        body: dict[str, object] = {"count": count}
        if len(members) <= members_max:
            body["members"] = [{"sub": sub} for sub in members]
        return body

    # -- announcements in ------------------------------------------------------------------------
    def on_announcement(self, delivery: Delivery) -> None:
        """Applies another pod's announcement; notes our own (we are not deaf)."""
        try:
            body = orjson.loads(delivery.data)
            if not isinstance(body, dict) or body.get("v") != VERSION:
                return
            pod_name = str(body["pod"])
            seq = int(body["seq"])
            channels = body.get("channels") or {}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        now = time.monotonic()
        if pod_name == self.pod_name:
            self.last_own_heard = now
            self.own_heard.set()
            return
        age_s = time.time() - delivery.publish_ms / 1000
        if age_s > self._ttl_s:
            return  # a stale announcement (warm start replays the topic): that pod may be gone
        pod = self._remote.get(pod_name)
        if pod is None:
            pod = self._remote[pod_name] = RemotePod()
        if seq <= pod.seq:
            return  # late: a newer announcement of that pod was applied already
        pod.seq = seq
        pod.heard_at = now
        states = {
            str(ch): ChannelState(int(st.get("count", 0)), Counter(st.get("subs") or {}))
            for ch, st in channels.items()
            if isinstance(st, dict)
        }
        events: list[PresenceEvent] = []
        if body.get("type") == "snapshot":
            pending = pod.pending_snapshot if int(body.get("part", 0)) > 0 else None
            pending = {} if pending is None else pending
            pending.update(states)
            if int(body.get("part", 0)) + 1 >= int(body.get("parts", 1)):
                for channel in set(pod.channels) - set(pending):
                    self._set_remote_channel(pod, channel, None, events)
                for channel, state in pending.items():
                    self._set_remote_channel(pod, channel, state, events)
                pod.pending_snapshot = None
            else:
                pod.pending_snapshot = pending
        else:
            for channel, state in states.items():
                self._set_remote_channel(pod, channel, state, events)
        if events:
            self._on_events(events)

    def expire(self) -> None:
        """Forgets pods not heard within PRESENCE_TTL_S (killed, partitioned)."""
        cutoff = time.monotonic() - self._ttl_s
        events: list[PresenceEvent] = []
        for name in [n for n, p in self._remote.items() if p.heard_at < cutoff]:
            pod = self._remote.pop(name)
            for channel in list(pod.channels):
                self._set_remote_channel(pod, channel, None, events)
            log.info("forgot a silent pod's presence", extra={"gone_pod": name})
        if events:
            self._on_events(events)

    # -- announcements out -----------------------------------------------------------------------
    def _messages(self, kind: str, channels: dict[str, dict[str, Any]]) -> list[bytes]:
        """Numbered announcement bodies, split so none nears the Pub/Sub size limit."""
        parts: list[dict[str, dict[str, Any]]] = [{}]
        size = 0
        for channel, state in channels.items():
            entry = len(channel) + 32 + sum(len(s) + 8 for s in state["subs"])
            if parts[-1] and size + entry > PART_MAX_BYTES:
                parts.append({})
                size = 0
            parts[-1][channel] = state
            size += entry
        self._snapshot_id += kind == "snapshot"
        bodies = []
        for index, part in enumerate(parts):
            self._seq += 1
            body = {"v": VERSION, "pod": self.pod_name, "seq": self._seq, "type": kind}
            if kind == "snapshot":
                body.update(snapshot=self._snapshot_id, part=index, parts=len(parts))
            body["channels"] = part
            bodies.append(orjson.dumps(body))
        return bodies

    async def announce(self, snapshot: bool = False) -> None:
        """One coalesced delta (a heartbeat when nothing changed), or a full snapshot."""
        if snapshot:
            channels = {ch: st.as_json() for ch, st in self._local.items()}
            self._dirty.clear()
            bodies = self._messages("snapshot", channels)
        else:
            dirty, self._dirty = self._dirty, set()
            channels = {
                ch: (self._local[ch].as_json() if ch in self._local else {"count": 0, "subs": {}})
                for ch in dirty
            }
            bodies = self._messages("delta", channels)
        key = f"presence:{self.pod_name}"
        attributes = {KIND_ATTRIBUTE: PRESENCE_KIND}
        for body in bodies:
            try:
                await self._broker.publish(OutgoingMessage(body, key, attributes))
                self.announcements_sent += 1
                self._on_sent()
            except (BrokerUnavailable, BrokerBusy):
                self._dirty.update(channels)  # try again next round
                return

    async def run(self) -> None:
        next_snapshot = time.monotonic() + self._snapshot_s
        while True:
            now = time.monotonic()
            snapshot = now >= next_snapshot
            if snapshot:
                next_snapshot = now + self._snapshot_s
            await self.announce(snapshot)
            self.expire()
            await asyncio.sleep(self._interval_s)
