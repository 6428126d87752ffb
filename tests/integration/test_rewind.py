"""Rewind: a subscribe asks for a channel's last N messages (or those of the last T seconds)
from the pod's history; real pods on the strict Pub/Sub stand-in, real websocket clients.

The rewound messages come right after `subscribed`, before any live one, in order, once; the
`rewound.complete` flag says whether the pod's history covers the whole window (a pod started
without a warm start does not).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from devtools.cluster import LocalCluster, Service, free_port
from services.client import PubsockClient
from tests.support import WsClient, metric, publish


async def published_and_held(
    api: httpx.AsyncClient, pods: list[Service], channel: str, count: int
) -> list[str]:
    """Publishes `count` messages one after the other and returns their ids once every pod in
    `pods` has delivered them all (so they are in its history)."""
    watchers = [await WsClient.connect(pod.ws_url) for pod in pods]
    for watcher in watchers:
        await watcher.subscribe(channel)
    ids = [await publish(api, channel, {"n": n}) for n in range(count)]
    for watcher in watchers:
        assert [f["id"] for f in await watcher.messages(count)] == ids
        await watcher.close()
    return ids


async def test_rewind_count_sends_the_last_n_in_order_then_live(cluster, api, channel):
    pod = cluster.sockets[0]
    ids = await published_and_held(api, [pod], channel, 8)
    client = await WsClient.connect(pod.ws_url)
    frame = await client.subscribe(channel, rewind={"count": 5})
    assert frame["rewound"] == {"count": 5, "complete": True}
    assert frame["position"] == ids[-1] and "recovered" not in frame
    rewound = await client.messages(5)
    assert [f["id"] for f in rewound] == ids[3:]
    assert [f["data"] for f in rewound] == [{"n": n} for n in range(3, 8)]
    live = await publish(api, channel, "live")
    assert (await client.next("message"))["id"] == live
    await client.assert_quiet(0.3)
    everything = await WsClient.connect(pod.ws_url)
    frame = await everything.subscribe(channel, rewind={"count": 100})  # more than there are
    assert frame["rewound"] == {"count": 9, "complete": True}  # the warm pod holds the hour
    assert [f["id"] for f in await everything.messages(9)] == [*ids, live]
    assert await metric(pod.url, 'pubsock_rewinds_total{result="complete"}') >= 2


async def test_rewind_under_concurrent_publishing_has_no_gap_and_no_duplicate(cluster, channel):
    """Messages keep arriving while the subscribe is served: what the client gets is one
    unbroken run of the channel's order, the rewind first (no await between the history slice
    and joining the live stream), then live ones."""
    pod = cluster.sockets[1]
    watcher = await WsClient.connect(pod.ws_url)
    await watcher.subscribe(channel)
    published: list[str] = []
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=cluster.api.url, timeout=15) as api:

        async def publish_until_stopped() -> None:
            n = 0
            while not stop.is_set():
                published.append(await publish(api, channel, n))
                n += 1

        publisher = asyncio.create_task(publish_until_stopped())
        try:
            async with asyncio.timeout(30):
                for _ in range(10):  # the pod holds 10 of them: a rewind of 5 finds 5
                    await watcher.next("message")
            client = await WsClient.connect(pod.ws_url)
            frame = await client.subscribe(channel, rewind={"count": 5})
            got: list[str] = []
            async with asyncio.timeout(30):
                while len(got) < 5 + 10:  # the rewind, and 10 live ones
                    got.append((await client.next("message"))["id"])
        finally:
            stop.set()
            await publisher
        async with asyncio.timeout(30):
            while got[-1] != published[-1]:
                got.append((await client.next("message"))["id"])
    assert frame["rewound"] == {"count": 5, "complete": True}
    start = published.index(got[0])
    assert start >= 5
    assert got == published[start:]  # in order, no gap, no duplicate, through to the end


async def test_rewind_seconds_is_the_messages_of_the_last_t_seconds(cluster, api, channel):
    pod = cluster.sockets[0]
    await published_and_held(api, [pod], channel, 2)
    old_by = time.time()
    # The window is wall-clock time: let it pass beyond the old messages' publish times.
    await asyncio.sleep(old_by + 4.2 - time.time())
    recent = await published_and_held(api, [pod], channel, 3)
    client = await WsClient.connect(pod.ws_url)
    frame = await client.subscribe(channel, rewind={"seconds": 4})
    assert frame["rewound"] == {"count": 3, "complete": True}
    assert [f["id"] for f in await client.messages(3)] == recent
    both = await WsClient.connect(pod.ws_url)
    frame = await both.subscribe(channel, rewind={"seconds": 4, "count": 1})  # both bounds
    assert frame["rewound"] == {"count": 1, "complete": True}
    assert [f["id"] for f in await both.messages(1)] == recent[-1:]
    await both.assert_quiet(0.3)


async def test_since_that_recovers_serves_the_recovery_only(cluster, api, channel):
    ids = await published_and_held(api, cluster.sockets, channel, 6)
    client = await WsClient.connect(cluster.sockets[1].ws_url)
    frame = await client.subscribe(channel, since=ids[3], rewind={"count": 5})
    assert frame["recovered"] is True and "rewound" not in frame
    assert [f["id"] for f in await client.messages(2)] == ids[4:]
    await client.assert_quiet(0.3)


async def test_since_that_cannot_recover_serves_the_rewind(cluster, api, channel):
    ids = await published_and_held(api, cluster.sockets, channel, 6)
    client = await WsClient.connect(cluster.sockets[1].ws_url)
    frame = await client.subscribe(channel, since="forgotten-id", rewind={"count": 4})
    assert frame["recovered"] is False
    assert frame["rewound"] == {"count": 4, "complete": True}
    assert [f["id"] for f in await client.messages(4)] == ids[2:]
    live = await publish(api, channel, "live")
    assert (await client.next("message"))["id"] == live
    await client.assert_quiet(0.3)


async def test_a_repeated_subscribe_does_not_rewind_again(cluster, api, channel):
    """The connection already has the channel's messages: once on the wire."""
    pod = cluster.sockets[0]
    ids = await published_and_held(api, [pod], channel, 3)
    client = await WsClient.connect(pod.ws_url)
    await client.subscribe(channel, rewind={"count": 3})
    assert [f["id"] for f in await client.messages(3)] == ids
    again = await client.subscribe(channel, rewind={"count": 3})
    assert "rewound" not in again and again["position"] == ids[-1]
    await client.assert_quiet(0.3)


@pytest.mark.parametrize(
    "rewind",
    [{}, {"count": 0}, {"count": -2}, {"count": "5"}, {"seconds": 1.5}, {"count": 5, "from": 1}, 5],
)
async def test_bad_rewinds_are_bad_request_errors_and_subscribe_nothing(cluster, channel, rewind):
    client = await WsClient.connect(cluster.sockets[0].ws_url)
    await client.send({"type": "subscribe", "channel": channel, "rewind": rewind})
    error = await client.next("error")
    assert error["code"] == "bad_request" and error["channel"] == channel
    await client.send({"type": "unsubscribe", "channel": channel})
    await client.next("unsubscribed")
    frame = await client.subscribe(channel)  # the connection is fine
    assert "rewound" not in frame


async def test_rewinds_over_the_default_limits_are_limit_errors(cluster, api, channel):
    """REWIND_MAX_COUNT 100, REWIND_MAX_S = HISTORY_AGE_S (3600) by default."""
    client = await WsClient.connect(cluster.sockets[0].ws_url)
    for rewind in ({"count": 101}, {"seconds": 3601}, {"count": 1, "seconds": 3601}):
        await client.send({"type": "subscribe", "channel": channel, "rewind": rewind})
        error = await client.next("error")
        assert (error["code"], error["channel"]) == ("limit", channel), rewind
    frame = await client.subscribe(channel, rewind={"count": 100, "seconds": 3600})
    assert frame["rewound"]["count"] == 0


@pytest.fixture(scope="module")
def young_pods(cluster: LocalCluster) -> Iterator[tuple[Service, Service]]:
    """Two pods started now: one without a warm start (TOPIC_RETENTION_S=0: its history
    starts at its own start) with small rewind limits, and one that fills its history from the
    topic's retention."""
    cold = cluster.new_socket(
        "rewind-cold",
        free_port(),
        TOPIC_RETENTION_S="0",
        REWIND_MAX_COUNT="5",
        REWIND_MAX_S="30",
    )
    warm = cluster.new_socket("rewind-warm", free_port())
    yield cold, warm
    for pod in (cold, warm):
        if pod.process.running:
            pod.process.stop()


async def test_a_pod_whose_history_starts_inside_the_window_says_incomplete(
    cluster, api, channel, young_pods
):
    cold, warm = young_pods
    before = await published_and_held(api, [cluster.sockets[0]], channel, 3)
    for pod in (cold, warm):
        pod.start()
    started_at = time.time()
    after = await published_and_held(api, [cluster.sockets[0], cold, warm], channel, 2)

    young = await WsClient.connect(cold.ws_url)
    frame = await young.subscribe(channel, rewind={"count": 5})
    assert frame["rewound"] == {"count": 2, "complete": False}  # the 3 before are unknown here
    assert [f["id"] for f in await young.messages(2)] == after
    exact = await WsClient.connect(cold.ws_url)
    frame = await exact.subscribe(channel, rewind={"count": 2})  # 2 found on its own stream
    assert frame["rewound"] == {"count": 2, "complete": True}
    assert [f["id"] for f in await exact.messages(2)] == after
    window = await WsClient.connect(cold.ws_url)
    frame = await window.subscribe(channel, rewind={"seconds": 30})  # started moments ago
    assert frame["rewound"] == {"count": 2, "complete": False}
    assert [f["id"] for f in await window.messages(2)] == after
    await asyncio.sleep(max(0.0, started_at + 1.2 - time.time()))  # the pod is 1 s old now
    frame = await window.subscribe(f"{channel}-quiet", rewind={"seconds": 1})
    assert frame["rewound"] == {"count": 0, "complete": True}  # within its life: complete

    for rewind in ({"count": 6}, {"seconds": 31}):  # its own limits
        await young.send({"type": "subscribe", "channel": f"{channel}-x", "rewind": rewind})
        error = await young.next("error")
        assert error["code"] == "limit", rewind

    filled = await WsClient.connect(warm.ws_url)  # as young, but warm-started from retention
    frame = await filled.subscribe(channel, rewind={"count": 50})
    assert frame["rewound"] == {"count": 5, "complete": True}
    assert [f["id"] for f in await filled.messages(5)] == [*before, *after]

    more = await published_and_held(api, [cold], channel, 4)  # the cold pod holds 6 now
    capped = await WsClient.connect(cold.ws_url)
    frame = await capped.subscribe(channel, rewind={"seconds": 30})  # REWIND_MAX_COUNT=5 here
    assert frame["rewound"] == {"count": 5, "complete": True}  # the last 5 of the 30 s
    assert [f["id"] for f in await capped.messages(5)] == [*after[1:], *more]


async def test_the_python_client_hands_the_rewind_to_its_handler_before_live(cluster, api, channel):
    pod = cluster.sockets[1]
    ids = await published_and_held(api, [pod], channel, 4)
    got: list[str] = []
    arrived = asyncio.Event()

    def handler(frame: dict[str, object]) -> None:
        got.append(str(frame["id"]))
        if len(got) == 4:
            arrived.set()

    async with PubsockClient(pod.ws_url, warmup=False) as client:
        frame = await client.subscribe(channel, handler, rewind={"count": 3})
        assert frame["rewound"] == {"count": 3, "complete": True}
        live = await publish(api, channel, "live")
        async with asyncio.timeout(15):
            await arrived.wait()
        assert client.position(channel) == live
    assert got == [*ids[1:], live]
