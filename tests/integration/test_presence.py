"""Presence across pods: counts and members converge, join/leave events, vanished pods are
forgotten, and a reconnect storm does not flood the topic."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator

import pytest

from devtools.cluster import LocalCluster, Service, free_port
from tests.support import WsClient, eventually, metric, mint


class Pair:
    def __init__(self, pods: list[Service], secret: str) -> None:
        self.pods = pods
        self.token = functools.partial(mint, channels=["test:*"], secret=secret)

    def url(self, index: int, sub: str) -> str:
        return f"{self.pods[index].ws_url}?token={self.token(sub)}"


@pytest.fixture(scope="module")
def pair(cluster: LocalCluster, token_secret: str) -> Iterator[Pair]:
    pods = [
        cluster.new_socket(
            f"presence-{i}",
            free_port(),
            TOKEN_SECRET=token_secret,
            PRESENCE_TTL_S="4",
            PRESENCE_SNAPSHOT_S="2",
            PRESENCE_MEMBERS_MAX="3",
        )
        for i in (1, 2)
    ]
    for pod in pods:
        pod.start(wait_ready=False)
    for pod in pods:
        pod.wait_ready()
    try:
        yield Pair(pods, token_secret)
    finally:
        for pod in pods:
            pod.process.stop_async()
        for pod in pods:
            pod.process.stop()


async def presence_of(client: WsClient, channel: str) -> dict:
    await client.send({"type": "presence", "channel": channel})
    return await client.next("presence")


async def wait_presence(client: WsClient, channel: str, count: int, timeout_s: float = 15) -> dict:
    """Asks until the count converges (eventually consistent across pods), with a deadline."""
    return await eventually(
        lambda: presence_of(client, channel),
        timeout_s,
        f"a presence count of {count} in {channel}",
        interval_s=0.2,
        until=lambda frame: frame["count"] == count,
    )


async def test_presence_converges_across_pods_with_join_events(pair, channel):
    """ann on pod 1 and bob on pod 2: both pods report 2 connections and both names; ann, who
    asked for presence events, gets bob's join."""
    ann = await WsClient.connect(pair.url(0, "ann"))
    await ann.subscribe(channel, presence=True)
    bob = await WsClient.connect(pair.url(1, "bob"))
    await bob.subscribe(channel)
    join = await ann.next("join")
    assert join == {"type": "join", "channel": channel, "sub": "bob"}
    for client in (ann, bob):
        frame = await wait_presence(client, channel, 2)
        assert frame["members"] == [{"sub": "ann"}, {"sub": "bob"}]
    second_bob = await WsClient.connect(pair.url(0, "bob"))
    await second_bob.subscribe(channel)
    frame = await wait_presence(bob, channel, 3)
    assert [m["sub"] for m in frame["members"]] == ["ann", "bob"]  # distinct subjects
    await bob.close()
    await second_bob.close()
    leave = await ann.next("leave")  # bob's last connection went: one leave, not two
    assert leave["sub"] == "bob"
    assert (await wait_presence(ann, channel, 1))["members"] == [{"sub": "ann"}]


async def test_members_are_omitted_above_the_maximum(pair, channel):
    clients = []
    for n in range(4):
        client = await WsClient.connect(pair.url(n % 2, f"user-{n}"))
        await client.subscribe(channel)
        clients.append(client)
    frame = await wait_presence(clients[0], channel, 4)
    assert "members" not in frame  # 4 distinct subjects > PRESENCE_MEMBERS_MAX=3


async def test_presence_is_never_a_message_frame(pair, cluster, channel):
    """Announcements travel on the topic but never reach clients as `message` frames."""
    watcher = await WsClient.connect(pair.url(0, "watcher"))
    await watcher.subscribe(channel)
    other = await WsClient.connect(pair.url(1, "other"))
    await other.subscribe(channel)
    await wait_presence(watcher, channel, 2)
    await watcher.assert_quiet(0.3)


async def test_a_killed_pod_is_forgotten_after_the_ttl(cluster, channel, token_secret):
    """A pod that stops announcing (SIGKILL) leaves the aggregate after PRESENCE_TTL_S."""
    pods = [
        cluster.new_socket(f"ttl-{i}", free_port(), TOKEN_SECRET=token_secret, PRESENCE_TTL_S="3")
        for i in (1, 2)
    ]
    for pod in pods:
        pod.start()
    pair = Pair(pods, token_secret)
    try:
        ann = await WsClient.connect(pair.url(0, "ann"))
        await ann.subscribe(channel, presence=True)
        ghost = await WsClient.connect(pair.url(1, "ghost"))
        await ghost.subscribe(channel)
        assert (await ann.next("join"))["sub"] == "ghost"
        pods[1].process.kill()
        leave = await ann.next("leave", timeout=15)
        assert leave["sub"] == "ghost"
        assert (await presence_of(ann, channel))["count"] == 1
    finally:
        for pod in pods:
            pod.process.stop()


async def announcements(pod: Service) -> float:
    return await metric(pod.url, "pubsock_presence_announcements_total")


async def test_a_reconnect_storm_does_not_flood_the_topic(pair, channel):
    """1,000 connections arriving at once cause a handful of coalesced announcements, not 1,000."""
    pod = pair.pods[0]
    before = await announcements(pod)
    loop = asyncio.get_running_loop()
    started = loop.time()
    clients = await asyncio.gather(
        *(WsClient.connect(pair.url(0, f"storm-{n % 50}")) for n in range(1000))
    )
    await asyncio.gather(*(c.subscribe(channel) for c in clients))
    frame = await wait_presence(clients[0], channel, 1000, timeout_s=30)
    assert len(frame.get("members", [])) == 0  # 50 distinct > PRESENCE_MEMBERS_MAX
    elapsed_s = loop.time() - started
    sent = await announcements(pod) - before
    # One delta per PRESENCE_INTERVAL_S (1 s) plus a snapshot per PRESENCE_SNAPSHOT_S (2 s).
    assert sent <= elapsed_s * 1.5 + 4, (sent, elapsed_s)
    await asyncio.gather(*(c.close() for c in clients))
