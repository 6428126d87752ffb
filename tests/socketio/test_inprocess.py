"""socket.io recovery and lifecycle on one real pod in this process (memory broker), driven by
the real socket.io-client in Node: fast, and no emulator needed.

A "drop" cuts the Engine.IO connection as a network failure would; the client reconnects by
itself with its pid and offset, to the same pod (what another pod does with them is the same code,
and tests/socketio/test_socketio.py checks it across pods after a SIGKILL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.core.broker import OutgoingMessage
from services.core.broker.memory import MemoryBroker
from services.core.envelope import Envelope
from services.core.ids import new_message_id
from services.socket.pod import Pod
from services.socket.settings import SocketSettings
from tests.socketio.support import SioDriver
from tests.support import Mint, eventually, unique_channel

RECONNECT = {"reconnectionDelay": 300, "reconnectionDelayMax": 300, "randomizationFactor": 0}
TRANSPORTS = {"websocket": ["websocket"], "polling": ["polling"]}


async def _running_pod(token_secret: str, **settings: Any) -> AsyncIterator[Pod]:
    """A pod on the memory broker with quick timings and `settings`, drained afterwards."""
    running = Pod(
        SocketSettings(
            broker="memory",
            host="127.0.0.1",
            port=0,
            token_secret=token_secret,
            recovery_wait_s=0.5,
            warm_start_timeout_s=2,
            drain_close_window_s=0,
            close_timeout_s=1,
            shutdown_cleanup_s=1,
            log_level="WARNING",
            **settings,
        ),
        MemoryBroker(),
    )
    await running.start()
    try:
        yield running
    finally:
        await running.drain()


@pytest.fixture
async def pod(token_secret: str) -> AsyncIterator[Pod]:
    async for running in _running_pod(
        token_secret,
        pod_name="inproc",
        position_slack_ms=0,  # positions of other rooms resume exactly from the anchor's time
        socketio_connect_timeout_s=1,
        client_frames_per_s=5,
        client_frames_burst=10,
    ):
        yield running


@pytest.fixture
async def slack_pod(token_secret: str) -> AsyncIterator[Pod]:
    """A pod whose other rooms resume from the anchor's time minus 3 s (the default is 2 s)."""
    async for running in _running_pod(
        token_secret, pod_name="inproc-slack", position_slack_ms=3000
    ):
        yield running


@pytest.fixture
async def short_slack_pod(token_secret: str) -> AsyncIterator[Pod]:
    """POSITION_SLACK_MS 250: a room is "joined moments ago" for half a second."""
    async for running in _running_pod(token_secret, pod_name="inproc-slack", position_slack_ms=250):
        yield running


def url(pod: Pod) -> str:
    return f"http://127.0.0.1:{pod.port}"


async def publish(pod: Pod, channel: str, data: Any) -> str:
    """Publishes as the api does and waits until the pod has it and the clock has moved on (so
    publish times differ)."""
    envelope = Envelope(new_message_id(), channel, data, int(time.time() * 1000))
    await pod.broker.publish(OutgoingMessage(envelope.encode(), channel, envelope.attributes()))
    await eventually(lambda: pod.history.contains(channel, envelope.id), 5, "the pod to have it")
    await eventually(lambda: int(time.time() * 1000) > envelope.ts, 5, "the next millisecond")
    return envelope.id


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_a_joined_client_recovers_before_its_first_message(
    pod: Pod, driver: SioDriver, room: str, transport: str, token: Mint
) -> None:
    """`join` sends `pubsock:joined`, whose offset anchors recovery even with no message yet."""
    opts = {"transports": TRANSPORTS[transport], "auth": {"token": token()}, **RECONNECT}
    assert (await driver.connect("c", url(pod), **opts))["recovered"] is False
    assert (await driver.emit("c", "join", room))["ok"]
    since = len(driver.records)
    await driver.drop("c")
    ids = [await publish(pod, room, n) for n in range(3)]
    again = await driver.reconnected("c", since)
    assert again["ev"] == "connect" and again["recovered"] is True
    assert again["id"] == driver.of("c", "connect")[0]["id"]  # the same socket.id
    ids.append(await publish(pod, room, 3))
    assert await driver.wait_messages("c", room, 4) == ids


async def test_declared_rooms_recover_together(pod: Pod, driver: SioDriver, token: Mint) -> None:
    """Rooms of `auth.rooms` are in the pid: all come back; the anchor room exactly, the others
    from the anchor's time (POSITION_SLACK_MS is 0 here, so exactly too)."""
    a, b = unique_channel("room", "a"), unique_channel("room", "b")
    opts = {"transports": ["websocket"], "auth": {"token": token(), "rooms": [a, b]}, **RECONNECT}
    await driver.connect("c", url(pod), **opts)
    want = {a: [await publish(pod, a, "a1")], b: [await publish(pod, b, "b1")]}
    await driver.wait_messages("c", b, 1)
    since = len(driver.records)
    await driver.drop("c")
    for channel, data in ((a, "a2"), (b, "b2"), (a, "a3")):
        want[channel].append(await publish(pod, channel, data))
    again = await driver.reconnected("c", since)
    assert again["recovered"] is True
    assert await driver.wait_messages("c", a, 3) == want[a]
    assert await driver.wait_messages("c", b, 2) == want[b]


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_rooms_joined_and_left_after_connect_recover(
    pod: Pod, driver: SioDriver, transport: str, token: Mint
) -> None:
    """The pid holds only `auth.rooms`; a message event's offset names one room. Rooms joined
    (and left) since travel, signed, in the offsets this session is sent: every room comes back
    after a drop, none that was left, whichever room's event came last."""
    kept, a, b, left = (unique_channel("room", name) for name in ("kept", "a", "b", "left"))
    auth = {"token": token(), "rooms": [kept, left]}
    await driver.connect("c", url(pod), transports=TRANSPORTS[transport], auth=auth, **RECONNECT)
    for room in (a, b):
        assert (await driver.emit("c", "join", room))["ok"]
    assert (await driver.emit("c", "leave", left))["ok"]
    want = {room: [await publish(pod, room, f"{room} 1")] for room in (b, kept, a)}
    await driver.wait_messages("c", a, 1)  # the last event: a message of `a`, no join/leave
    since = len(driver.records)
    await driver.drop("c")
    for room in (b, kept, a, b):
        want[room].append(await publish(pod, room, f"{room} {len(want[room]) + 1}"))
    await publish(pod, left, "not for c")
    again = await driver.reconnected("c", since)
    assert again["recovered"] is True
    for room, ids in want.items():
        assert await driver.wait_messages("c", room, len(ids)) == ids, room
    # Recovered, the session still carries its room set: a second drop loses nothing either.
    since = len(driver.records)
    await driver.drop("c")
    want[b].append(await publish(pod, b, f"{b} late"))
    assert (await driver.reconnected("c", since))["recovered"] is True
    assert await driver.wait_messages("c", b, len(want[b])) == want[b]
    assert driver.message_ids("c", left) == []


async def test_a_forged_room_set_is_not_recovered(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    """An offset whose room set is not signed with the pod's key starts a new session."""
    await driver.connect(
        "c", url(pod), transports=["websocket"], auth={"token": token()}, **RECONNECT
    )
    assert (await driver.emit("c", "join", room))["ok"]
    await publish(pod, room, 1)
    await driver.wait_messages("c", room, 1)
    offset = driver.last_offset("c")
    # the room set, signed (the room with its join position, joined moments ago)
    assert offset.startswith(f"{room}/") and f"~{room}" in offset
    forged = offset.rsplit("~", 1)[0] + "~AAAAAAAAAAAAAAAAAAAAAA"
    await driver.set_offset("c", forged)
    since = len(driver.records)
    await driver.drop("c")
    assert (await driver.reconnected("c", since))["recovered"] is False


async def test_join_with_since_replays_and_leave_is_remembered(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    first = await publish(pod, room, 1)
    later = [await publish(pod, room, n) for n in (2, 3)]
    await driver.connect(
        "c", url(pod), transports=["websocket"], auth={"token": token()}, **RECONNECT
    )
    ack = await driver.emit("c", "join", {"room": room, "since": first})
    assert ack["ok"] and ack["recovered"] is True and ack["position"] == later[-1]
    assert await driver.wait_messages("c", room, 2) == later
    assert await driver.emit("c", "leave", room) == {"ok": True, "room": room}
    await publish(pod, room, 4)
    since = len(driver.records)
    await driver.drop("c")
    await publish(pod, room, 5)
    again = await driver.reconnected("c", since)
    assert again["recovered"] is True
    await publish(pod, room, 6)
    await asyncio.sleep(0.3)  # a quiet moment: what must not arrive cannot be waited for
    assert driver.message_ids("c", room) == later  # left, and still left after recovering


async def test_a_foreign_or_forged_pid_starts_a_new_session(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    assert pod.socketio is not None
    pid = pod.socketio.ctx.signer.sign("sid-of-ann", "ann", [room])
    offset = f"{room}/@{int(time.time() * 1000)}"
    ws = {"transports": ["websocket"], "reconnection": False}
    other_sub = await driver.connect(
        "bob", url(pod), auth={"token": token("bob"), "pid": pid, "offset": offset}, **ws
    )
    # The server resumes a session under its old socket.id; the client's own `recovered` needs
    # the pid it stored itself, so it is false for a hand-fed pid either way.
    assert other_sub["ev"] == "connect" and other_sub["id"] != "sid-of-ann"
    forged = await driver.connect(
        "eve", url(pod), auth={"token": token("ann"), "pid": pid + "x", "offset": offset}, **ws
    )
    assert forged["ev"] == "connect" and forged["id"] != "sid-of-ann"
    owner = await driver.connect(
        "ann", url(pod), auth={"token": token("ann"), "pid": pid, "offset": offset}, **ws
    )
    assert owner["ev"] == "connect" and owner["id"] == "sid-of-ann"


async def test_a_room_is_a_channel_of_the_one_hub_registry(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    """socket.io sessions subscribe to the hub as native ones do: one registry, one count."""
    assert pod.hub.session_count(room) == 0
    await driver.connect("c", url(pod), transports=["websocket"], auth={"token": token()})
    assert pod.hub.session_count(room) == 0
    await driver.emit("c", "join", room)
    assert pod.hub.session_count(room) == 1
    assert len(pod.sessions) == 1
    await driver.emit("c", "leave", room)
    assert pod.hub.session_count(room) == 0


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
async def test_drain_ends_sessions_so_clients_reconnect(
    pod: Pod, driver: SioDriver, room: str, transport: str, token: Mint
) -> None:
    opts = {"transports": TRANSPORTS[transport], "auth": {"token": token()}, **RECONNECT}
    await driver.connect("c", url(pod), **opts)
    await driver.emit("c", "join", room)
    started = time.monotonic()
    await pod.drain()
    record = await driver.wait_for(
        lambda r: r["ev"] == "disconnect" and r["name"] == "c", "the drain's disconnect", 5
    )
    # Not a ping timeout: the client reconnects at once. A websocket gets 1012; a poll gets the
    # close packet, or (its next request on a new connection, the pod no longer listening) an
    # error.
    assert record["reason"] in ("transport close", "transport error"), record
    assert time.monotonic() - started < 5


async def test_a_session_that_never_connects_is_dropped(pod: Pod) -> None:
    base = f"{url(pod)}/socket.io/"
    async with httpx.AsyncClient(timeout=5) as client:
        opened = await client.get(base, params={"EIO": 4, "transport": "polling"})
        sid = opened.text[opened.text.index('"sid":"') + 7 :].split('"')[0]
        assert pod.socketio is not None and sid in pod.socketio.sessions
        # SOCKETIO_CONNECT_TIMEOUT_S is 1 here
        await eventually(lambda: sid not in pod.socketio.sessions, 2.2, "the session's end")
        late = await client.post(base, params={"EIO": 4, "transport": "polling", "sid": sid})
        assert late.status_code == 400 and late.json()["message"] == "Session ID unknown"


async def test_too_many_events_get_limit_acks(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    await driver.connect("c", url(pod), transports=["websocket"], auth={"token": token()})
    acks = await asyncio.gather(*(driver.emit("c", "presence", room) for _ in range(18)))
    codes = [ack.get("code", "ok") for ack in acks]
    assert codes.count("limit") >= 3 and codes.count("ok") >= 9, codes
    assert not driver.of("c", "disconnect")  # limited, not yet a flood


async def test_a_room_joined_moments_ago_recovers_nothing_from_before_the_join(
    slack_pod: Pod, driver: SioDriver, token: Mint
) -> None:
    """Found by make soak: a room joined less than POSITION_SLACK_MS before the anchor (another
    room's last event) resumed from the anchor's time minus the slack, so a recovery handed the
    client that room's messages from before its join, behind ones it already had: out of order,
    and not a duplicate it could drop. It now resumes after its join position."""
    pod = slack_pod
    other, joined = unique_channel("room", "other"), unique_channel("room", "joined")
    await eventually(  # the pod's history reaches back past the slack
        lambda: pod.history.complete_from_ms <= time.time() * 1000 - 3500,
        10,
        "the history to reach back 3.5 s",
        interval_s=0.05,
    )
    opts = {"transports": ["websocket"], "auth": {"token": token()}, **RECONNECT}
    await driver.connect("c", url(pod), **opts)
    assert (await driver.emit("c", "join", other))["ok"]
    before = await publish(pod, joined, "published before c joined")
    ack = await driver.emit("c", "join", joined)
    assert ack["ok"] and ack["position"] == before
    after = [await publish(pod, joined, "j1")]
    await driver.wait_messages("c", joined, 1)
    await publish(pod, other, "o1")  # the anchor: within the slack of the join
    await driver.wait_messages("c", other, 1)
    since = len(driver.records)
    await driver.drop("c")
    after.append(await publish(pod, joined, "j2"))
    assert (await driver.reconnected("c", since))["recovered"] is True
    got = await driver.wait_messages("c", joined, 3)  # j1, then j1 again (slack) and j2
    assert before not in got
    assert [m for i, m in enumerate(got) if m not in got[:i]] == after
    # Another room's event anchors again, and a second drop comes at once: the recovered
    # session still knows where it joined.
    await publish(pod, other, "o2")
    await driver.wait_messages("c", other, 2)
    since = len(driver.records)
    await driver.drop("c")
    assert (await driver.reconnected("c", since))["recovered"] is True
    after.append(await publish(pod, joined, "j3"))
    got = await driver.wait_messages("c", joined, len(got) + 1)
    while got[-1] != after[-1]:  # the slack may bring j1 or j2 again first
        got = await driver.wait_messages("c", joined, len(got) + 1)
    assert before not in got
    assert [m for i, m in enumerate(got) if m not in got[:i]] == after


async def test_a_join_position_leaves_the_offsets_after_twice_the_slack(
    short_slack_pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    """The join position rides on the offsets only while the room was joined moments ago; then
    the session's room set is the plain one again (its own timer ends it, no message needed)."""
    pod = short_slack_pod
    opts = {"transports": ["websocket"], "auth": {"token": token()}, **RECONNECT}
    await driver.connect("c", url(pod), **opts)
    ack = await driver.emit("c", "join", room)
    assert ack["ok"]
    await publish(pod, room, 1)
    await driver.wait_messages("c", room, 1)
    assert f"~{room}/{ack['position']}~" in driver.last_offset("c")
    count = 1

    async def offset_after_another_event() -> str:
        nonlocal count
        count += 1
        await publish(pod, room, count)  # each event shows the offset as it stands
        await driver.wait_messages("c", room, count)
        return driver.last_offset("c")

    await eventually(
        offset_after_another_event,
        10,
        "the join position to leave the offsets",
        interval_s=0,
        until=lambda offset: f"~{room}~" in offset,
    )
    assert f"{room}/" not in driver.last_offset("c").split("~", 1)[1]


# -- join with a rewind ----------------------------------------------------------------------


async def test_join_with_a_rewind_sends_the_last_messages_before_live_ones(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    ids = [await publish(pod, room, n) for n in range(4)]
    await driver.connect("c", url(pod), transports=["websocket"], auth={"token": token()})
    ack = await driver.emit("c", "join", {"room": room, "rewind": {"count": 3}})
    assert ack == {
        "ok": True, "room": room, "position": ids[-1], "rewound": {"count": 3, "complete": True}
    }  # fmt: skip
    assert await driver.wait_messages("c", room, 3) == ids[1:]
    assert [args[0] for args in driver.messages("c", room)] == [1, 2, 3]
    live = await publish(pod, room, 4)
    assert await driver.wait_messages("c", room, 4) == [*ids[1:], live]
    # The rewound events came before the join's anchor event, and it before the live one.
    kinds = [
        r["event"] if r["event"] != "message" else r["args"][1]["id"]
        for r in driver.of("c", "event")
    ]
    assert kinds == [*ids[1:], "pubsock:joined", live]
    again = await driver.emit("c", "join", {"room": room, "rewind": {"count": 3}})
    assert "rewound" not in again  # in the room already: once
    seconds = await driver.emit("c", "join", {"room": f"{room}-b", "rewind": {"seconds": 60}})
    assert seconds["rewound"] == {"count": 0, "complete": False}  # the pod is seconds old
    marker = await publish(pod, room, "marker")  # behind anything the joins could have sent
    assert await driver.wait_messages("c", room, len(ids) + 1) == [*ids[1:], live, marker]


async def test_join_with_since_and_a_rewind(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    """`since` wins when it recovers; when it cannot, the rewind is served."""
    ids = [await publish(pod, room, n) for n in range(4)]
    await driver.connect("c", url(pod), transports=["websocket"], auth={"token": token()})
    ack = await driver.emit("c", "join", {"room": room, "since": ids[2], "rewind": {"count": 3}})
    assert ack["recovered"] is True and "rewound" not in ack
    assert await driver.wait_messages("c", room, 1) == ids[3:]
    await driver.connect("d", url(pod), transports=["websocket"], auth={"token": token()})
    ack = await driver.emit("d", "join", {"room": room, "since": "gone", "rewind": {"count": 2}})
    assert ack["recovered"] is False and ack["rewound"] == {"count": 2, "complete": True}
    assert await driver.wait_messages("d", room, 2) == ids[2:]
    marker = await publish(pod, room, "marker")  # behind anything d's join could have sent c
    assert await driver.wait_messages("c", room, 2) == [*ids[3:], marker]


async def test_bad_or_oversized_rewinds_are_refused_in_the_ack(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    await driver.connect("c", url(pod), transports=["websocket"], auth={"token": token()})
    for rewind, code in (
        ({"count": 0}, "bad_request"),
        ({"count": 2, "at": 1}, "bad_request"),
        ("50", "bad_request"),
        ({"count": 101}, "limit"),
        ({"seconds": 3601}, "limit"),
    ):
        ack = await driver.emit("c", "join", {"room": room, "rewind": rewind})
        assert (ack["ok"], ack["code"], ack["room"]) == (False, code, room), rewind
    assert (await driver.emit("c", "presence", room))["count"] == 0  # nothing was joined


async def test_a_client_dropped_after_a_rewind_recovers_without_duplicates(
    pod: Pod, driver: SioDriver, room: str, token: Mint
) -> None:
    """The rewound events carry offsets like any other: recovery resumes after them."""
    ids = [await publish(pod, room, n) for n in range(3)]
    await driver.connect(
        "c", url(pod), transports=["websocket"], auth={"token": token()}, **RECONNECT
    )
    await driver.emit("c", "join", {"room": room, "rewind": {"count": 5}})
    assert await driver.wait_messages("c", room, 3) == ids
    since = len(driver.records)
    await driver.drop("c")
    missed = await publish(pod, room, 3)
    assert (await driver.reconnected("c", since))["recovered"] is True
    live = await publish(pod, room, 4)
    assert await driver.wait_messages("c", room, 5) == [*ids, missed, live]
