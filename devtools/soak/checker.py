"""The soak's checker: from the publish log and every client's record, prove nothing was lost,
repeated or reordered, and that every `recovered: false` had a cause.

Inputs (plain data, so hand-made histories unit-test it):

- `messages`: what the publishers sent, one `Msg` per message id (its channel, publisher and
  place in that publisher's sequence, when it was first sent, whether a 202 came back);
- `clients`: per client, its events in order (dicts with `e`):
  `join {ch}`, `leave {ch}`, `subd {ch, pos, rec, since, pod}` (a `subscribed` frame or a socket.io
  join ack; `rec` is true, false or null), `msg {ch, id, ts}` (handed to the application, after the
  client's documented de-duplication), `wiredup {ch, id}` (the same id arrived twice on the wire
  where the contract says at most once), `sio {rec, pod}` (a socket.io CONNECT; `rec` is
  `socket.recovered`), `end {drained}` (the run's end: `drained` once the client was told every
  last accepted id);
- `faults` (what the nemesis did, with start and end) and `marks` (what pods logged: a marked
  break, a deaf stream, a warm start that did not finish).

Rules:

1. Order. Per channel, every publisher's own sequence (it waits for each answer before its next
   request) and every client's deliveries (within a continuous stretch) are edges of one graph.
   A cycle is a violation: two clients disagree, or a client disagrees with a publisher. The
   graph's topological order is the channel's order.
2. Stretches. A client's life on a channel is cut into continuous stretches: from a subscribe's
   position to the next `recovered: false` (a new stretch starts at its position), a leave, or
   the end. `recovered: true` continues the stretch. Within a stretch, every accepted message
   after the stretch's position up to its last delivery (to the channel's end for a stretch
   still open when the run ended and drained) is delivered exactly once, in order. Messages
   whose publish got no 202 (503, a cut connection) may appear at most once.
3. Every `recovered: false` (and socket.io `recovered === false`) must be explained: the history
   window passed (`history_size` messages or `history_age_s` since the position), the answering
   pod marked a break after the position or started without a complete warm start, or a Pub/Sub
   fault was under way around it (the pod had not received the position yet). Anything else is
   a violation.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Event = Mapping[str, Any]

# Faults that can leave a pod behind the others (its stream broken, stalled or refused): a
# recovery on that pod may then wait for an id it has not got and answer `recovered: false`.
STREAM_FAULTS = ("close_streams", "unavailable", "stall")
# Faults after which a pod may be behind the others: stream faults, and a new pod in a killed or
# drained one's place (warm starting).
BEHIND_FAULTS = (*STREAM_FAULTS, "kill_pod", "drain_pod")
# How long after a stream fault ends a pod may still be catching up: the pump's reopen backoff
# (30 s at most) plus a deaf pod's detection.
STREAM_FAULT_TAIL_MS = 45_000
# Clock granularity between the api's `ts`, Pub/Sub's publish time and a pod's `@<ms>`.
CLOCK_EPSILON_MS = 5


@dataclass(slots=True)
class Msg:
    id: str
    ch: str
    pub: str
    seq: int  # the place in its publisher's sequence on this channel
    sent_ms: float  # first attempt
    accepted: bool  # a 202 came back (for this id, on some attempt)


@dataclass
class Violation:
    kind: str  # lost, duplicate, reorder, unexplained_gap, phantom, wire_duplicate
    client: str | None
    channel: str | None
    ids: list[str]
    t_ms: float | None
    detail: str
    faults: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "client": self.client,
            "channel": self.channel,
            "ids": self.ids[:20],
            "id_count": len(self.ids),
            "t_ms": self.t_ms,
            "detail": self.detail,
            "faults": self.faults,
        }


@dataclass
class Stretch:
    client: str
    channel: str
    position: str | None
    start_ms: float
    deliveries: list[tuple[str, float]] = field(default_factory=list)  # (id, ts)
    end: str = "open"  # gap, left, final, reset, open
    end_ms: float | None = None
    membership: int = 0  # stretches of one join (to its leave) share it


@dataclass
class Recovery:
    client: str
    channel: str | None  # None: a socket.io CONNECT
    since: str | None
    pod: str | None
    t_ms: float
    recovered: bool


@dataclass
class Settings:
    history_size: int = 1000
    history_age_s: float = 3600.0
    position_slack_ms: int = 2000


@dataclass
class Result:
    violations: list[Violation]
    deliveries: int
    stretches: int
    recoveries: dict[str, int]  # "true", "false:<cause>"
    messages_accepted: int
    messages_unknown: int
    wire_duplicates: int
    orders: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not self.violations


def check(
    messages: Mapping[str, Msg],
    clients: Mapping[str, Sequence[Event]],
    faults: Sequence[Mapping[str, Any]] = (),
    marks: Sequence[Mapping[str, Any]] = (),
    settings: Settings | None = None,
) -> Result:
    settings = settings or Settings()
    violations: list[Violation] = []
    stretches: list[Stretch] = []
    recoveries: list[Recovery] = []
    wire_dups = 0
    for name, events in clients.items():
        found, recs, dups = _stretches(name, events)
        stretches.extend(found)
        recoveries.extend(recs)
        for event in dups:
            wire_dups += 1
            violations.append(
                Violation(
                    "wire_duplicate",
                    name,
                    event.get("ch"),
                    [str(event.get("id"))],
                    event.get("t"),
                    "the same id arrived twice on the wire (the client dropped it)",
                    _faults_near(faults, event.get("t")),
                )
            )

    # 1. One order per channel.
    seen_ts: dict[str, float] = {}
    for stretch in stretches:
        for message_id, ts in stretch.deliveries:
            seen_ts.setdefault(message_id, ts)
    orders, order_violations = _orders(messages, stretches, seen_ts, faults)
    violations.extend(order_violations)
    index = {ch: {m: i for i, m in enumerate(order)} for ch, order in orders.items()}

    # 2. Every stretch: exactly once, in order, nothing missing.
    # What the application got over a whole membership (join to leave): a message it already
    # has from an earlier stretch needs no second copy after a `recovered: false` (clients
    # drop it as a duplicate), and a second copy anywhere in the membership is a duplicate.
    got: dict[tuple[str, str, int], set[str]] = defaultdict(set)
    counted: dict[tuple[str, str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for stretch in stretches:
        key = (stretch.client, stretch.channel, stretch.membership)
        got[key].update(m for m, _ in stretch.deliveries)
        for m, _ in stretch.deliveries:
            counted[key][m] += 1
    for (client, channel, _), copies in counted.items():
        twice = [m for m, n in copies.items() if n > 1]
        if twice:
            violations.append(
                Violation(
                    "duplicate",
                    client,
                    channel,
                    twice,
                    seen_ts.get(twice[0]),
                    "handed to the application more than once",
                    _faults_near(faults, seen_ts.get(twice[0])),
                )
            )
    deliveries = 0
    for stretch in stretches:
        deliveries += len(stretch.deliveries)
        had = got[(stretch.client, stretch.channel, stretch.membership)]
        violations.extend(_check_stretch(stretch, messages, orders, index, seen_ts, faults, had))

    # 3. Every recovered: false explained. When each pod first handed each message to any of
    # its clients: a pod that answers `recovered: false` for an id it had is not behind.
    pod_first: dict[str, dict[str, float]] = defaultdict(dict)
    for events in clients.values():
        for event in events:
            pod = event.get("pod")
            if event["e"] == "msg" and pod:
                first = pod_first[pod]
                t = float(event["t"])
                if t < first.get(event["id"], float("inf")):
                    first[event["id"]] = t
    counts: dict[str, int] = defaultdict(int)
    for rec in recoveries:
        if rec.recovered:
            counts["true"] += 1
            continue
        cause = _explain(rec, messages, orders, index, seen_ts, faults, marks, settings, pod_first)
        counts[f"false:{cause or 'unexplained'}"] += 1
        if cause is None:
            violations.append(
                Violation(
                    "unexplained_gap",
                    rec.client,
                    rec.channel,
                    [rec.since] if rec.since else [],
                    rec.t_ms,
                    f"recovered: false from pod {rec.pod} with no fault, break or window to "
                    "explain it",
                    _faults_near(faults, rec.t_ms),
                )
            )
    accepted = sum(1 for m in messages.values() if m.accepted)
    return Result(
        violations=violations,
        deliveries=deliveries,
        stretches=len(stretches),
        recoveries=dict(counts),
        messages_accepted=accepted,
        messages_unknown=len(messages) - accepted,
        wire_duplicates=wire_dups,
        orders=orders,
    )


# -- stretches ---------------------------------------------------------------------------------
def _stretches(
    client: str, events: Iterable[Event]
) -> tuple[list[Stretch], list[Recovery], list[Event]]:
    done: list[Stretch] = []
    recoveries: list[Recovery] = []
    wire_dups: list[Event] = []
    current: dict[str, Stretch] = {}
    joined: set[str] = set()
    membership: dict[str, int] = {}
    joins = 0

    def start(ch: str, position: str | None, t: float) -> None:
        current[ch] = Stretch(client, ch, position, t, membership=membership.get(ch, 0))

    def close(ch: str, end: str, t: float) -> None:
        stretch = current.pop(ch, None)
        if stretch is not None:
            stretch.end = end
            stretch.end_ms = t
            done.append(stretch)

    for event in events:
        kind = event["e"]
        t = float(event.get("t", 0))
        ch = str(event.get("ch"))
        if kind == "join":
            close(ch, "left", t)
            joined.add(ch)
            joins += 1
            membership[ch] = joins
        elif kind == "leave":
            close(ch, "left", t)
            joined.discard(ch)
        elif kind == "subd":
            rec = event.get("rec")
            if ch not in joined:
                continue  # an answer to a subscribe the application already took back
            if rec is True:
                recoveries.append(
                    Recovery(client, ch, event.get("since"), event.get("pod"), t, True)
                )
                if ch not in current:  # a first subscribe that named its own `since`
                    start(ch, event.get("since"), t)
            elif rec is False:
                recoveries.append(
                    Recovery(client, ch, event.get("since"), event.get("pod"), t, False)
                )
                close(ch, "gap", t)
                start(ch, event.get("pos"), t)
            else:
                close(ch, "reset", t)
                start(ch, event.get("pos"), t)
        elif kind == "msg":
            stretch = current.get(ch)
            if stretch is not None:
                stretch.deliveries.append((str(event["id"]), float(event.get("ts") or 0)))
        elif kind == "wiredup":
            wire_dups.append(event)
        elif kind == "sio":
            if event.get("rec") is False:
                recoveries.append(Recovery(client, None, None, event.get("pod"), t, False))
            elif event.get("rec") is True:
                recoveries.append(Recovery(client, None, None, event.get("pod"), t, True))
        elif kind == "end":
            for open_ch in list(current):
                close(open_ch, "final" if event.get("drained") else "left", t)
    for open_ch in list(current):
        close(open_ch, "left", float("inf"))
    return done, recoveries, wire_dups


# -- the order of each channel ----------------------------------------------------------------
def _orders(
    messages: Mapping[str, Msg],
    stretches: Sequence[Stretch],
    seen_ts: Mapping[str, float],
    faults: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, list[str]], list[Violation]]:
    edges: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    nodes: dict[str, set[str]] = defaultdict(set)

    def edge(ch: str, a: str, b: str, source: str) -> None:
        if a != b:
            edges[ch][a].setdefault(b, source)

    by_pub: dict[tuple[str, str], list[Msg]] = defaultdict(list)
    for msg in messages.values():
        nodes[msg.ch].add(msg.id)
        by_pub[(msg.pub, msg.ch)].append(msg)
    for (pub, ch), sequence in by_pub.items():
        sequence.sort(key=lambda m: m.seq)
        for before, after in itertools.pairwise(sequence):
            edge(ch, before.id, after.id, f"publisher {pub}")
    for stretch in stretches:
        ids = _first_copies(stretch.deliveries)
        nodes[stretch.channel].update(ids)
        for a, b in itertools.pairwise(ids):
            edge(stretch.channel, a, b, f"client {stretch.client}")

    def rank(message_id: str) -> tuple[float, str]:
        msg = messages.get(message_id)
        ts = seen_ts.get(message_id)
        if ts is None and msg is not None:
            ts = msg.sent_ms
        return (ts if ts is not None else float("inf"), message_id)

    orders: dict[str, list[str]] = {}
    violations: list[Violation] = []
    for ch, members in nodes.items():
        out = edges.get(ch, {})
        indegree: dict[str, int] = dict.fromkeys(members, 0)
        for targets in out.values():
            for target in targets:
                indegree[target] = indegree.get(target, 0) + 1
        ready = [(rank(m), m) for m, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while True:
            while ready:
                _, node = heapq.heappop(ready)
                order.append(node)
                for target in out.get(node, {}):
                    indegree[target] -= 1
                    if indegree[target] == 0:
                        heapq.heappush(ready, (rank(target), target))
            if len(order) == len(indegree):
                break
            # A cycle: report it, then break it at its earliest-ranked member and go on.
            left = {m for m, d in indegree.items() if d > 0}
            cycle = _find_cycle(left, out)
            sources = sorted(
                {out[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=False)}
            )
            violations.append(
                Violation(
                    "reorder",
                    None,
                    ch,
                    cycle,
                    seen_ts.get(cycle[0]),
                    "deliveries in conflicting orders, from: " + ", ".join(sources),
                    _faults_near(faults, seen_ts.get(cycle[0])),
                )
            )
            first = min(cycle, key=rank)
            indegree[first] = 0
            heapq.heappush(ready, (rank(first), first))
            # Its remaining in-edges now take its in-degree below zero: never pushed twice.
        orders[ch] = _unique(order)
    return orders, violations


def _find_cycle(left: set[str], out: Mapping[str, Mapping[str, str]]) -> list[str]:
    """A cycle among `left` (nodes whose in-degree never reached zero): walking back through
    unplaced predecessors, which every such node has, must come round."""
    back: dict[str, list[str]] = defaultdict(list)
    for a, targets in out.items():
        if a in left:
            for b in targets:
                if b in left:
                    back[b].append(a)
    path: list[str] = []
    on_path: dict[str, int] = {}
    node = min(left)
    while node not in on_path:
        on_path[node] = len(path)
        path.append(node)
        node = min(back[node])
    cycle = path[on_path[node] :]
    cycle.reverse()  # forward order: each member's edge goes to the next
    return cycle


def _unique(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for item in items:
        if item not in seen:
            seen.add(item)
            result.append(item)
    return result


def _first_copies(deliveries: Sequence[tuple[str, float]]) -> list[str]:
    return _unique(m for m, _ in deliveries)


# -- one stretch --------------------------------------------------------------------------------
def _check_stretch(
    stretch: Stretch,
    messages: Mapping[str, Msg],
    orders: Mapping[str, list[str]],
    index: Mapping[str, Mapping[str, int]],
    seen_ts: Mapping[str, float],
    faults: Sequence[Mapping[str, Any]],
    had: set[str] | None = None,
) -> list[Violation]:
    found: list[Violation] = []
    ch = stretch.channel
    order = orders.get(ch, [])
    where = index.get(ch, {})
    ids = [m for m, _ in stretch.deliveries]

    def violation(kind: str, which: list[str], detail: str, t: float | None) -> None:
        found.append(Violation(kind, stretch.client, ch, which, t, detail, _faults_near(faults, t)))

    copies = set(ids)
    phantom = [m for m in copies if m not in messages]
    if phantom:
        violation("phantom", phantom, "delivered but never published", seen_ts.get(phantom[0]))
    unique = _first_copies(stretch.deliveries)
    places = [where[m] for m in unique if m in where]
    for a, b in itertools.pairwise(places):
        if b < a:
            violation(
                "reorder",
                [order[a], order[b]],
                "delivered against the channel's order",
                seen_ts.get(order[b]),
            )
            break

    # What had to come: accepted messages after the stretch's position, up to its end.
    if stretch.end == "final":
        last = len(order) - 1
    elif places:
        last = max(places)
    else:
        return found
    position = stretch.position
    first = -1  # required strictly after this place
    floor_ms: float | None = None
    if position is not None and position in where:
        first = where[position]
    else:  # a time position (then its floor counts too), or unknown: from the first delivery on
        if position is not None and position.startswith("@") and position[1:].isdigit():
            floor_ms = float(position[1:])
        first = min(places) if places else last + 1
    delivered = set(unique) | (had or set())
    missing: list[str] = []
    for i in range(0 if floor_ms is not None else first + 1, last + 1):
        m = order[i]
        msg = messages.get(m)
        if msg is None or not msg.accepted or m in delivered:
            continue
        if i > first:
            missing.append(m)
        elif floor_ms is not None:
            lower = seen_ts.get(m, msg.sent_ms)
            if lower > floor_ms + CLOCK_EPSILON_MS:
                missing.append(m)
    if missing:
        t = seen_ts.get(missing[0]) or messages[missing[0]].sent_ms
        violation(
            "lost",
            missing,
            f"accepted after the stretch's position {position} (stretch {stretch.end}, "
            f"{len(unique)} delivered) and never delivered",
            t,
        )
    return found


# -- explaining recovered: false ---------------------------------------------------------------
def _explain(
    rec: Recovery,
    messages: Mapping[str, Msg],
    orders: Mapping[str, list[str]],
    index: Mapping[str, Mapping[str, int]],
    seen_ts: Mapping[str, float],
    faults: Sequence[Mapping[str, Any]],
    marks: Sequence[Mapping[str, Any]],
    settings: Settings,
    pod_first: Mapping[str, Mapping[str, float]] | None = None,
) -> str | None:
    since_ms = _position_ms(rec.since, messages, seen_ts)
    t = rec.t_ms
    if rec.channel is not None and rec.since is not None:
        where = index.get(rec.channel, {})
        if rec.since in where:
            later = [
                m
                for m in orders[rec.channel][where[rec.since] + 1 :]
                if seen_ts.get(m, messages[m].sent_ms if m in messages else 0) <= t
            ]
            if len(later) >= settings.history_size:
                return "history_window"
        if since_ms is not None and t - since_ms > settings.history_age_s * 1000:
            return "history_window"
    low = (since_ms if since_ms is not None else t - STREAM_FAULT_TAIL_MS) - (
        settings.position_slack_ms
    )
    for mark in marks:
        if rec.pod is not None and mark.get("pod") != rec.pod:
            continue
        if low <= float(mark["t"]) <= t + CLOCK_EPSILON_MS:
            return f"pod_{mark['kind']}"
    observed = (pod_first or {}).get(rec.pod or "", {})
    if rec.since is not None and rec.since in messages and observed:
        # The answering pod's own clients show when it had the position's message.
        had_at = observed.get(rec.since)
        if had_at is not None and had_at <= t - CLOCK_EPSILON_MS:
            return None  # it had it, marked no break: nothing explains a false
        for fault in faults:
            start = float(fault["start_ms"])
            end = float(fault.get("end_ms") or start) + STREAM_FAULT_TAIL_MS
            if fault.get("kind") in BEHIND_FAULTS and start <= t <= end:
                return f"pod_behind_after_{fault['kind']}"
        return None
    for fault in faults:
        if fault.get("kind") not in STREAM_FAULTS:
            continue
        start = float(fault["start_ms"])
        end = float(fault.get("end_ms") or start) + STREAM_FAULT_TAIL_MS
        if start - settings.position_slack_ms <= t <= end:
            return f"during_{fault['kind']}"
    return None


def _position_ms(
    position: str | None, messages: Mapping[str, Msg], seen_ts: Mapping[str, float]
) -> float | None:
    if position is None:
        return None
    if position.startswith("@") and position[1:].isdigit():
        return float(position[1:])
    if position in seen_ts:
        return seen_ts[position]
    msg = messages.get(position)
    return msg.sent_ms if msg is not None else None


def _faults_near(
    faults: Sequence[Mapping[str, Any]], t: float | None, window_ms: float = 30_000
) -> list[dict[str, Any]]:
    if t is None:
        return []
    near = []
    for fault in faults:
        start = float(fault["start_ms"])
        end = float(fault.get("end_ms") or start)
        if start - window_ms <= t <= end + window_ms:
            near.append(dict(fault))
    return near[:8]
