"""Hub fan-out and the pump, on the memory broker: one encoding per message, dedup, slow clients."""

from __future__ import annotations

import orjson

from services.core.broker import Delivery
from services.core.channels import NamespaceLabeler
from services.core.envelope import Envelope
from services.socket.delivery import NATIVE
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.pump import Pump


class FakeSession:
    sub = None
    framing = NATIVE

    def __init__(self, slow: bool = False) -> None:
        self.frames: list[bytes] = []
        self.slow = slow
        self.closed_slow = False

    def deliver(self, frame: bytes) -> bool:
        if self.slow:
            return False
        self.frames.append(frame)
        return True

    def deliver_batch(self, frames: list[bytes]) -> bool:
        return self.deliver(b"".join(frames))

    def close_slow(self) -> None:
        self.closed_slow = True


def make_pump() -> tuple[Pump, Hub, History, SocketMetrics]:
    metrics = SocketMetrics()
    history = History(100, 60, 100, 0)
    history.stream_started(0)
    hub = Hub(history, metrics, recovery_wait_s=0)
    pump = Pump(None, history, hub, metrics, NamespaceLabeler(frozenset({"room"})))  # type: ignore[arg-type]
    pump.live_from_ms = 0
    return pump, hub, history, metrics


def delivery(envelope: Envelope, **attributes: str) -> Delivery:
    return Delivery(
        data=envelope.encode(),
        attributes={"channel": envelope.channel, **attributes},
        message_id=f"pubsub-{envelope.id}",
        publish_ms=envelope.ts,
    )


def test_one_frame_object_goes_to_every_session():
    pump, hub, _, metrics = make_pump()
    sessions = [FakeSession() for _ in range(3)]
    for session in sessions:
        hub.add("room:1", session)
    pump.handle(delivery(Envelope("m1", "room:1", {"x": 1}, 1)))
    frames = [s.frames[0] for s in sessions]
    assert all(frame is frames[0] for frame in frames)  # encoded once, the same bytes object
    payload = orjson.loads(frames[0][2:])
    assert payload == {
        "type": "message",
        "channel": "room:1",
        "id": "m1",
        "data": {"x": 1},
        "ts": 1,
    }
    assert metrics.frames_sent._value.get() == 3


def test_duplicates_are_dropped():
    pump, hub, _, metrics = make_pump()
    session = FakeSession()
    hub.add("room:1", session)
    for _ in range(3):
        pump.handle(delivery(Envelope("m1", "room:1", 1, 1)))
    assert len(session.frames) == 1
    assert metrics.duplicates_dropped._value.get() == 2


def test_slow_session_is_closed_and_others_still_get_the_frame():
    pump, hub, _, metrics = make_pump()
    fast, slow, fast2 = FakeSession(), FakeSession(slow=True), FakeSession()
    for session in (fast, slow, fast2):
        hub.add("c", session)
    pump.handle(delivery(Envelope("m1", "c", 1, 1)))
    assert slow.closed_slow and len(fast.frames) == 1 and len(fast2.frames) == 1


def test_presence_and_garbage_never_reach_sessions():
    pump, hub, history, metrics = make_pump()
    session = FakeSession()
    hub.add("c", session)
    pump.handle(delivery(Envelope("p", "c", 1, 1), kind="presence"))
    garbage = Delivery(b"nope", {"channel": "c"}, "x", 1)
    pump.handle(garbage)
    assert session.frames == [] and history.message_count == 0
    assert metrics.invalid_messages._value.get() == 1


def test_history_only_messages_are_not_sent_live():
    pump, hub, history, _ = make_pump()
    session = FakeSession()
    hub.add("c", session)
    pump.live_from_ms = 10  # published (ts 1) before the subscription existed: warm start replay
    pump.handle(delivery(Envelope("old", "c", 1, 1)))
    assert session.frames == [] and history.contains("c", "old")


def test_add_and_remove_count_subscriptions():
    _, hub, _, _ = make_pump()
    session = FakeSession()
    assert hub.add("a", session) and not hub.add("a", session)
    hub.add("b", session)
    assert hub.subscription_count == 2
    hub.remove_all(["a", "b"], session)
    assert hub.subscription_count == 0 and hub.session_count("a") == 0


def test_presence_reannouncing_the_same_members_emits_no_events():
    """A snapshot repeating what a delta said changes nothing: no leave/join flicker."""
    import time as _time

    from services.core.broker.memory import MemoryBroker
    from services.socket.presence import Presence

    events: list = []
    presence = Presence("me", MemoryBroker(), 1, 10, 30, events.extend)

    def announce(kind: str, seq: int, channels: dict) -> None:
        body = {"v": 1, "pod": "other", "seq": seq, "type": kind, "channels": channels}
        if kind == "snapshot":
            body.update(snapshot=seq, part=0, parts=1)
        presence.on_announcement(
            Delivery(
                orjson.dumps(body),
                {"kind": "presence"},
                str(seq),
                int(_time.time() * 1000),
            )
        )

    grace = {"demo:lobby": {"count": 1, "subs": {"Grace": 1}}}
    announce("delta", 1, grace)
    assert events == [("demo:lobby", "join", "Grace")]
    announce("snapshot", 2, grace)
    announce("delta", 3, {"demo:lobby": {"count": 2, "subs": {"Grace": 2}}})
    assert events == [("demo:lobby", "join", "Grace")]
    assert presence.count("demo:lobby") == (2, ["Grace"])
    announce("delta", 1, {"demo:lobby": {"count": 0, "subs": {}}})  # late: ignored
    assert presence.count("demo:lobby") == (2, ["Grace"])
    announce("snapshot", 4, {})
    assert events[-1] == ("demo:lobby", "leave", "Grace")
    assert presence.count("demo:lobby") == (0, [])


def test_a_batch_is_one_write_per_session_in_order():
    """Messages handled together reach each session as one write, in their order."""
    pump, hub, _, metrics = make_pump()
    first, second = FakeSession(), FakeSession()
    hub.add("a", first)
    hub.add("b", first)
    hub.add("a", second)
    hub.begin_batch()
    for n, channel in enumerate(["a", "b", "a"]):
        pump.handle(delivery(Envelope(f"id-{n}", channel, n, 1)))
    assert first.frames == [] and second.frames == []  # nothing written before the end
    hub.end_batch()
    assert len(first.frames) == 1 and len(second.frames) == 1
    chunk = first.frames[0]
    assert chunk.index(b'"id-0"') < chunk.index(b'"id-1"') < chunk.index(b'"id-2"')
    assert b'"id-1"' not in second.frames[0] and b'"id-2"' in second.frames[0]
    assert metrics.frames_sent._value.get() == 5
