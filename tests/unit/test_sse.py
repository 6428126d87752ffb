"""Server-Sent Events: the Last-Event-ID codec, and the session core with a fake transport
(first event, ids, resume, recovery, presence, keep-alive, limits, closes) through the same
parts a pod wires."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.channels import CHANNEL_PATTERN
from services.core.closecodes import CloseCode
from services.core.protocol import RewindSpec
from services.socket.history import Entry
from services.socket.http import parse_head
from services.socket.parts import SessionLimits, SessionParts
from services.socket.sse import SSE, SseEndpoint, SseFraming, SseSession
from services.socket.sse_id import (
    RESUME_MARGIN_BYTES,
    BadEventId,
    ResumeBudget,
    decode_positions,
    encode_positions,
)
from tests.support import SseParser, eventually
from tests.unit.test_session_core import BUDGET, FakeTransport, Parts, claims, token

ULID_A = "01HV5XK4Z8D3Q2M7R9T1W6Y0AB"


# -- the id ------------------------------------------------------------------------------------
def test_positions_round_trip() -> None:
    pairs = [("room:1", ULID_A), ("a.b@c-d_e", "@1712345678901"), ("x", "ps-123_4")]
    text = encode_positions(pairs)
    assert text == f"room:1={ULID_A},a.b@c-d_e=@1712345678901,x=ps-123_4"
    assert decode_positions(text, 10) == dict(pairs)
    assert decode_positions("", 10) == {}


@pytest.mark.parametrize(
    "text",
    [
        "room:1",  # no position
        "room:1=",  # empty position
        "=abc",  # empty channel
        "room:1=abc,",  # empty pair
        "room 1=abc",  # invalid channel
        "room:1=a b",  # invalid position
        "room:1=@12a",  # invalid @ms
        "room:1=@1234567890123456",  # @ms too long
        "room:1=" + "x" * 129,  # id too long
        "room:1=a,room:1=b",  # a channel twice
        "a=1,b=2,c=3",  # over the limit of 2
        "room:1=a=b",
        "room:1=a\x00",
    ],
)
def test_bad_ids_are_refused(text: str) -> None:
    with pytest.raises(BadEventId):
        decode_positions(text, 2)


BUDGET_15K = ResumeBudget(position_chars=128, head_max_bytes=15 * 1024)


def test_the_resume_size_counts_the_longest_id_in_the_url_and_the_header() -> None:
    longest = encode_positions([("room:1", "x" * 128), ("b", "y" * 128)])
    encoded = 4 * 2  # ":", "=", ",", "=" each become three characters (%3A...)
    in_url = len("&last_event_id=") + len(longest) + encoded
    in_header = len("Last-Event-ID: \r\n") + len(longest)
    end_of_head = 2
    assert BUDGET_15K.head_bytes(500, ["room:1", "b"]) == (
        500 + in_url + in_header + end_of_head + RESUME_MARGIN_BYTES
    )
    shorter = ResumeBudget(position_chars=26, head_max_bytes=15 * 1024)
    assert (
        shorter.head_bytes(500, ["room:1", "b"])
        == BUDGET_15K.head_bytes(500, ["room:1", "b"]) - 4 * 102
    )


@given(
    st.lists(st.from_regex(CHANNEL_PATTERN, fullmatch=True), min_size=1, max_size=20),
    st.integers(14, 128),
)
def test_the_counted_size_is_the_built_ids(channels: list[str], chars: int) -> None:
    """The budget counts what building the id and percent-encoding it would give."""
    longest = encode_positions((channel, "x" * chars) for channel in channels)
    built = len("&last_event_id=") + len(quote(longest, safe="")) + len("Last-Event-ID: \r\n")
    built += len(longest) + 2 + RESUME_MARGIN_BYTES
    assert ResumeBudget(chars, 15 * 1024).head_bytes(0, channels) == built


@pytest.mark.parametrize("head", [200, 3000, 6000])
@pytest.mark.parametrize("budget", [BUDGET_15K, ResumeBudget(26, 8 * 1024)])
def test_the_channels_that_fit_are_the_most_that_do(head: int, budget: ResumeBudget) -> None:
    channels = [f"room:{n:03d}".ljust(60, "x") for n in range(100)]
    names = sum(len(c) + 1 for c in channels)
    fit = budget.channels_that_fit(head + names, channels)
    kept = head + sum(len(c) + 1 for c in channels[:fit])
    assert 0 < fit < len(channels)
    assert budget.head_bytes(kept, channels[:fit]) <= budget.head_max_bytes
    assert budget.head_bytes(kept + 61, channels[: fit + 1]) > budget.head_max_bytes
    assert budget.refusal(kept, channels[:fit], None) is None
    refusal = budget.refusal(kept + 61, channels[: fit + 1], None)
    assert refusal is not None and f"the first {fit} of these channels" in refusal


def test_a_reconnect_naming_every_channel_is_never_refused() -> None:
    """The stream was accepted before; its reconnect got here whole (a cookie the load balancer
    set since, a longer token), so refusing it would lose the very stream the rule protects."""
    channels = [f"room:{n:03d}".ljust(60, "x") for n in range(100)]
    every = {channel: "01HV5XK4Z8D3Q2M7R9T1W6Y0AB" for channel in channels}
    assert BUDGET_15K.refusal(14_000, channels, every) is None
    assert BUDGET_15K.refusal(14_000, channels, dict(list(every.items())[1:])) is not None
    assert BUDGET_15K.refusal(14_000, channels, None) is not None  # an unreadable id
    nothing_fits = BUDGET_15K.refusal(15_000, channels[:1], {})
    assert nothing_fits is not None and "not one of these channels fits" in nothing_fits


# -- the session --------------------------------------------------------------------------------
class Stream:
    """An SSE session on a fake transport, read as a browser would (SseParser)."""

    def __init__(self, session: SseSession, transport: FakeTransport) -> None:
        self.session = session
        self.transport = transport
        self.parser = SseParser()
        self._read = 0

    def events(self) -> list[dict[str, Any]]:
        data = bytes(self.transport.data[self._read :])
        self._read = len(self.transport.data)
        return self.parser.feed(data.decode())

    def messages(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "message"]


def sse_parts(parts: Parts, **limits: Any) -> SessionParts:
    settings = parts.settings.model_copy(update=limits)
    return SessionParts(
        parts.hub,
        parts.presence,
        parts.access,
        parts.registry,
        parts.metrics,
        SessionLimits.from_settings(settings),
        parts.tasks.spawn,
    )


def open_stream(
    parts: Parts,
    channels: list[str],
    positions: dict[str, str] | None = None,
    presence: set[str] | None = None,
    ttl_s: float = 600,
    rewind: tuple[RewindSpec, set[str]] | None = None,
    **limits: Any,
) -> Stream:
    transport = FakeTransport()
    session = SseSession(
        sse_parts(parts, **limits),
        transport,  # type: ignore[arg-type]
        claims(ttl_s=ttl_s),
        channels,
        presence or set(),
        rewind,
    )
    parts.registry.opened(session)
    session.start(positions if positions is not None else {})
    return Stream(session, transport)


@pytest.fixture
def parts() -> Parts:
    return Parts()


async def test_first_event_names_the_pod_and_carries_every_position(parts: Parts) -> None:
    parts.publish("room:1")
    stream = open_stream(parts, ["room:1", "room:2"])
    events = stream.events()
    assert [e["event"] for e in events] == ["pod", "subscribed", "subscribed"]
    assert events[0]["data"] == {"type": "pod", "pod": parts.settings.pod_name}
    positions = decode_positions(events[0]["id"], 10)
    assert positions["room:1"] == "m000001" and positions["room:2"].startswith("@")
    assert stream.parser.retry_ms is not None and 1000 <= stream.parser.retry_ms <= 3000
    assert "recovered" not in events[1]["data"]


async def test_each_message_moves_its_channel_in_the_id(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1", "room:2"])
    start = decode_positions(stream.events()[0]["id"], 10)
    parts.publish("room:2", {"n": 1})
    parts.publish("room:1", {"n": 2})
    first, second = stream.messages()
    assert first["data"]["data"] == {"n": 1}
    assert decode_positions(first["id"], 10) == {"room:1": start["room:1"], "room:2": "m000001"}
    assert decode_positions(second["id"], 10) == {"room:1": "m000002", "room:2": "m000001"}


async def test_the_id_follows_every_channel_whatever_the_order(parts: Parts) -> None:
    channels = ["room:1", "room:2", "room:3"]
    stream = open_stream(parts, channels)
    expected = decode_positions(stream.events()[0]["id"], 10)
    order = [2, 2, 1, 3, 1, 1, 2, 3, 3, 1]
    parts.hub.begin_batch()  # a batch too: one write of several events, each with its id
    parts.publish("room:1", "batched")
    parts.publish("room:3", "batched")
    parts.hub.end_batch()
    for n in order:
        parts.publish(f"room:{n}")
    messages = stream.messages()
    assert len(messages) == 2 + len(order)
    for message in messages:
        expected[message["data"]["channel"]] = message["data"]["id"]
        assert decode_positions(message["id"], 10) == expected


async def test_one_event_build_per_message_for_every_sse_session(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = [open_stream(parts, ["room:1"]), open_stream(parts, ["room:2", "room:1"])]
    for stream in streams:
        stream.events()
    built: list[bytes] = []
    original = SseFraming.frame

    def frame(self: SseFraming, channel: str, entry: Entry) -> bytes:
        built.append(original(self, channel, entry))
        return built[-1]

    monkeypatch.setattr(SseFraming, "frame", frame)
    parts.publish("room:1", {"n": 1})
    assert len(built) == 1 and streams[0].session.framing is SSE
    for stream in streams:
        assert bytes(stream.transport.data).endswith(bytes(built[0]))


async def test_resume_replays_once_and_new_channels_start_live(parts: Parts) -> None:
    parts.publish("room:1", 1)  # m000001
    parts.publish("room:1", 2)
    parts.publish("room:1", 3)
    stream = open_stream(parts, ["room:1", "room:2"], {"room:1": "m000001"})
    head = stream.events()
    assert [e["event"] for e in head] == ["pod", "subscribed"]
    assert head[1]["data"]["channel"] == "room:2"
    assert decode_positions(head[0]["id"], 10)["room:1"] == "m000001"  # until the replay
    await eventually(lambda: parts.hub.session_count("room:1") == 1)
    replay = stream.events()
    assert [e["event"] for e in replay] == ["subscribed", "message", "message"]
    assert replay[0]["data"]["recovered"] is True
    assert [e["data"]["id"] for e in replay[1:]] == ["m000002", "m000003"]
    assert decode_positions(replay[-1]["id"], 10)["room:1"] == "m000003"
    parts.publish("room:1", 4)
    assert [e["data"]["id"] for e in stream.messages()] == ["m000004"]


async def test_an_unknown_position_is_a_gap_and_moves_to_now(parts: Parts) -> None:
    parts.publish("room:1")
    stream = open_stream(parts, ["room:1"], {"room:1": "never-seen"})
    stream.events()
    await eventually(lambda: parts.hub.session_count("room:1") == 1)
    (subscribed,) = stream.events()
    assert subscribed["data"]["recovered"] is False
    assert decode_positions(subscribed["id"], 10) == {"room:1": "m000001"}


async def test_an_unreadable_id_starts_every_channel_over_with_a_gap(parts: Parts) -> None:
    transport = FakeTransport()
    session = SseSession(sse_parts(parts), transport, None, ["room:1", "room:2"], set())  # type: ignore[arg-type]
    session.start(None)
    events = Stream(session, transport).events()
    assert [e["data"].get("recovered") for e in events[1:]] == [False, False]


async def test_a_rewind_comes_first_and_the_id_names_its_channel_only_from_its_messages(
    parts: Parts,
) -> None:
    for n in range(3):
        parts.publish("room:1", n)  # m000001..3
    rewind = (RewindSpec(count=2), {"room:1"})
    stream = open_stream(parts, ["room:1", "room:2"], rewind=rewind)
    events = stream.events()
    assert [e["event"] for e in events] == ["pod", "subscribed", "message", "message", "subscribed"]
    # Cut before the rewind's first message, the stream asks for the rewind again.
    assert "room:1" not in decode_positions(events[0]["id"], 10)
    assert events[1]["data"]["rewound"] == {"count": 2, "complete": True}
    assert [e["data"]["id"] for e in events[2:4]] == ["m000002", "m000003"]
    assert decode_positions(events[2]["id"], 10)["room:1"] == "m000002"
    assert "rewound" not in events[4]["data"]  # room:2 asked for none
    parts.publish("room:1", 4)
    assert [m["data"]["id"] for m in stream.messages()] == ["m000004"]


async def test_a_rewind_is_served_only_where_the_stream_cannot_resume(parts: Parts) -> None:
    for n in range(3):
        parts.publish("room:1", n)
        parts.publish("room:2", n)  # room:1 odd ids, room:2 even
    rewind = (RewindSpec(count=5), {"room:1", "room:2"})
    stream = open_stream(
        parts, ["room:1", "room:2"], {"room:1": "m000003", "room:2": "gone"}, rewind=rewind
    )
    await eventually(lambda: parts.hub.session_count("room:2") == 1)
    events = stream.events()[1:]
    answers = {e["data"]["channel"]: e["data"] for e in events if e["event"] == "subscribed"}
    assert answers["room:1"]["recovered"] is True and "rewound" not in answers["room:1"]
    assert answers["room:2"]["recovered"] is False
    assert answers["room:2"]["rewound"] == {"count": 3, "complete": True}
    ids = [e["data"]["id"] for e in events if e["event"] == "message"]
    assert sorted(ids) == ["m000002", "m000004", "m000005", "m000006"]


async def test_presence_events_only_on_the_chosen_channels(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1", "room:2"], presence={"room:1"})
    # Not told of its own join (the hub announces it while the session attaches).
    assert [e["event"] for e in stream.events()] == ["pod", "subscribed", "subscribed"]
    parts.hub.presence_events([("room:1", "join", "bob"), ("room:2", "join", "bob")])
    (joined,) = stream.events()
    assert joined == {
        "event": "join",
        "data": {"type": "join", "channel": "room:1", "sub": "bob"},
        "id": stream.parser.last_event_id,
    }


async def test_keepalive_comment_only_on_a_quiet_stream(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1"], sse_keepalive_s=1.0)
    stream.events()
    now = time.monotonic()
    parts.registry.maintain(now)  # it wrote the head: not quiet
    parts.registry.maintain(now + 0.9)
    assert stream.parser.comments == [] and not stream.events()
    parts.registry.maintain(now + 1.0)
    stream.events()
    assert stream.parser.comments == ["ka"]
    parts.publish("room:1")
    parts.registry.maintain(now + 2.1)  # wrote since the last tick: not quiet
    stream.events()
    assert stream.parser.comments == ["ka"]


def close_event(stream: Stream) -> dict[str, Any]:
    events = stream.events()
    assert events and events[-1]["event"] == "close", events
    assert stream.transport.closed and not stream.session.open
    data: dict[str, Any] = events[-1]["data"]
    return data


async def test_token_expiry_ends_the_stream_with_1008(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1"], ttl_s=0.3)
    await eventually(lambda: not stream.session.open)
    assert close_event(stream)["code"] == CloseCode.TOKEN_EXPIRED
    assert parts.hub.session_count("room:1") == 0


async def test_send_budget_at_a_delivery_and_at_two_ticks(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1"])
    stream.transport.unsent = BUDGET + 1
    parts.publish("room:1")
    assert close_event(stream)["code"] == CloseCode.TRY_AGAIN_LATER
    stalled = open_stream(parts, ["room:1"])
    stalled.transport.unsent = BUDGET + 1
    parts.registry.maintain(time.monotonic())
    assert stalled.session.open
    parts.registry.maintain(time.monotonic())
    assert close_event(stalled)["code"] == CloseCode.TRY_AGAIN_LATER
    assert parts.metrics.slow_consumer_closes._value.get() == 2
    assert stalled.parser.retry_ms is not None and stalled.parser.retry_ms >= 5000


async def test_maximum_age_and_drain_end_with_1012(parts: Parts) -> None:
    old = open_stream(parts, ["room:1"], max_connection_age_s=0.001)
    parts.registry.maintain(time.monotonic() + 1)
    assert close_event(old)["code"] == CloseCode.RESTART
    stream = open_stream(parts, ["room:1"])
    stream.transport.closed = False
    for session in parts.registry.snapshot():
        session.close(CloseCode.RESTART, "server restarting")
    assert close_event(stream) == {"type": "close", "code": 1012, "reason": "server restarting"}
    assert stream.parser.retry_ms is not None and stream.parser.retry_ms <= 1000


async def test_client_bytes_are_ignored_then_cut(parts: Parts) -> None:
    stream = open_stream(parts, ["room:1"])
    stream.session.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert stream.session.open and not stream.transport.aborted
    stream.session.feed(b"x" * 70000)
    assert stream.transport.aborted and not stream.session.open
    stream.session.connection_lost()
    assert stream.session not in parts.registry


# -- the endpoint's parsing -----------------------------------------------------------------------
class Refused(Exception):
    pass


class FakeConnection:
    on_lost = None

    def __init__(self) -> None:
        self.refused: bytes | None = None
        self.head: bytes | None = None
        self.transport = FakeTransport()
        self.session: Any = None

    def refuse(self, payload: bytes) -> None:
        self.refused = payload

    def stream(self, head: bytes, factory: Any) -> None:
        self.head = head
        self.session = factory(self.transport)


def request(target: str, **headers: str) -> Any:
    lines = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return parse_head(f"GET {target} HTTP/1.1\r\nHost: pod\r\n{lines}\r\n".encode())


def status_of(payload: bytes | None) -> int:
    assert payload is not None
    return int(payload.split(b" ", 2)[1])


@pytest.mark.parametrize(
    ("target", "status"),
    [
        ("/sse?channels=room:1", 401),  # no token
        ("/sse?channels=room:1&token=nope", 401),
        (f"/sse?token={token()}", 400),  # no channels
        (f"/sse?channels=room:1,bad%20name&token={token()}", 400),
        (f"/sse?channels=room:1,room:2,room:3&token={token()}", 400),  # over the limit of 2
        (f"/sse?channels=other:1&token={token()}", 403),
        (f"/sse?channels=room:1&presence=room:2&token={token()}", 400),
        (f"/sse?channels=room:1&rewind_count=0&token={token()}", 400),
        (f"/sse?channels=room:1&rewind_count=x&token={token()}", 400),
        (f"/sse?channels=room:1&rewind_count=101&token={token()}", 400),  # REWIND_MAX_COUNT
        (f"/sse?channels=room:1&rewind_seconds=999999&token={token()}", 400),
        (f"/sse?channels=room:1&rewind_channels=room:1&token={token()}", 400),
        (f"/sse?channels=room:1&rewind_count=5&rewind_channels=room:9&token={token()}", 400),
    ],
)
async def test_bad_requests_are_refused_before_the_stream(
    parts: Parts, target: str, status: int
) -> None:
    endpoint = SseEndpoint(sse_parts(parts))
    connection = FakeConnection()
    assert endpoint.handle(connection, request(target)) is None  # type: ignore[arg-type]
    assert status_of(connection.refused) == status and connection.head is None


async def test_token_from_authorization_and_last_event_id_header_wins(parts: Parts) -> None:
    parts.publish("room:1")
    parts.publish("room:1")
    endpoint = SseEndpoint(sse_parts(parts))
    connection = FakeConnection()
    target = "/sse?channels=room:1&last_event_id=room:1=nowhere"
    endpoint.handle(
        connection,  # type: ignore[arg-type]
        request(target, Authorization=f"Bearer {token()}", Last_Event_ID="room:1=m000001"),
    )
    assert connection.head is not None and b"text/event-stream" in connection.head
    await eventually(lambda: parts.hub.session_count("room:1") == 1)
    events = Stream(connection.session, connection.transport).events()
    assert [e["event"] for e in events] == ["pod", "subscribed", "message"]
    assert events[1]["data"]["recovered"] is True and events[2]["data"]["id"] == "m000002"


def test_the_pod_serves_sse_unless_turned_off() -> None:
    from services.core.broker.memory import MemoryBroker
    from services.socket.pod import Pod
    from services.socket.settings import SocketSettings

    on = Pod(SocketSettings(broker="memory"), MemoryBroker())
    assert isinstance(on.gateway.endpoints[0], SseEndpoint)  # before socket.io's path prefix
    off = Pod(SocketSettings(broker="memory", sse_enabled=False), MemoryBroker())
    assert not any(isinstance(e, SseEndpoint) for e in off.gateway.endpoints)
