"""HTTP publish -> real Pub/Sub emulator -> every socket pod -> websocket clients."""

from __future__ import annotations

import asyncio
import time

import orjson

from devtools.cluster import PROJECT, TOPIC, LocalCluster, emulator_env
from services.core.ids import new_message_id
from tests.integration.conftest import TEST_SOCKET_ENV
from tests.support import WsClient, publish


async def connect_all(cluster: LocalCluster, channel: str) -> list[WsClient]:
    clients = [await WsClient.connect(pod.ws_url) for pod in cluster.sockets]
    for client in clients:
        frame = await client.subscribe(channel)
        assert frame["channel"] == channel and frame["position"]
        assert "recovered" not in frame
    return clients


async def test_fan_out_reaches_clients_on_every_pod(cluster, api, channel):
    """One publish reaches every subscribed connection on both pods, with the contract's fields."""
    clients = await connect_all(cluster, channel)
    extra = await WsClient.connect(cluster.sockets[0].ws_url)
    await extra.subscribe(channel)
    before = int(time.time() * 1000)
    message_id = await publish(api, channel, {"text": "hello", "n": [1, 2.5, None]})
    for client in (*clients, extra):
        frame = await client.next("message")
        assert frame["id"] == message_id
        assert frame["channel"] == channel
        assert frame["data"] == {"text": "hello", "n": [1, 2.5, None]}
        assert before - 1000 <= frame["ts"] <= int(time.time() * 1000)
        assert "sub" not in frame
    assert {await c.pod() for c in clients} == {"socket-1", "socket-2"}


async def test_other_channels_are_not_delivered(cluster, api, channel):
    """A connection receives only the channels it subscribed to, and nothing after unsubscribe."""
    (client, _) = await connect_all(cluster, channel)
    await publish(api, f"{channel}-other", "not for you")
    marker = await publish(api, channel, "for you")
    assert (await client.next("message"))["id"] == marker
    await client.send({"type": "unsubscribe", "channel": channel})
    assert (await client.next("unsubscribed"))["channel"] == channel
    await publish(api, channel, "after unsubscribe")
    await client.send({"type": "ping"})
    assert (await client.next())["type"] == "pong"  # the pong came, the message did not


async def test_order_is_the_same_on_every_pod_under_concurrent_publishes(cluster, api, channel):
    """Concurrent publishers: every pod sees one order; each publisher's sequence is kept."""
    clients = await connect_all(cluster, channel)
    publishers, per_publisher = 4, 25

    async def run(publisher: int) -> list[str]:
        ids = []
        for n in range(per_publisher):
            ids.append(await publish(api, channel, {"p": publisher, "n": n}))
        return ids

    sent = await asyncio.gather(*(run(p) for p in range(publishers)))
    total = publishers * per_publisher
    streams = [[f["id"] for f in await c.messages(total)] for c in clients]
    assert streams[0] == streams[1]
    assert sorted(streams[0]) == sorted(i for ids in sent for i in ids)
    for ids in sent:  # sequential 202s: A's 202 before B was sent => A first
        positions = [streams[0].index(i) for i in ids]
        assert positions == sorted(positions)


async def test_batch_is_delivered_in_request_order(cluster, api, channel):
    """A batch publishes every item; ids come back in request order and arrive in that order."""
    (client, _) = await connect_all(cluster, channel)
    other = f"{channel}-b"
    await client.subscribe(other)
    items = [{"channel": channel if n % 3 else other, "data": n} for n in range(30)]
    items[5]["id"] = "client-chosen-id-5"
    response = await api.post("/v1/messages", json={"messages": items})
    assert response.status_code == 202, response.text
    ids = response.json()["ids"]
    assert len(ids) == 30 and ids[5] == "client-chosen-id-5"
    frames = await client.messages(30)
    for name in (channel, other):
        expected = [i for i, item in zip(ids, items, strict=True) if item["channel"] == name]
        assert [f["id"] for f in frames if f["channel"] == name] == expected


async def test_publish_retry_with_same_id_is_delivered_once(cluster, api, channel):
    """Idempotency: a retried publish with the same id reaches each connection once."""
    clients = await connect_all(cluster, channel)
    await publish(api, channel, "first", id="dup-1")
    await publish(api, channel, "retry", id="dup-1")
    marker = await publish(api, channel, "marker")
    for client in clients:
        frames = await client.messages(2)
        assert [f["id"] for f in frames] == ["dup-1", marker]
        assert frames[0]["data"] == "first"


async def test_direct_producer_on_the_topic_is_delivered(cluster, channel):
    """Another producer publishing straight to the topic (the binding mapping) is delivered,
    with the Pub/Sub message id and publish time when the body has no id or ts, and its own
    duplicates dropped; unreadable messages are dropped without harming the stream."""
    clients = await connect_all(cluster, channel)
    with emulator_env(cluster.emulator.host):
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        )
        topic = f"projects/{PROJECT}/topics/{TOPIC}"

        def send(body: bytes, **attributes: str) -> str:
            return publisher.publish(topic, body, ordering_key=channel, **attributes).result(30)

        full = {"id": "foreign-1", "channel": channel, "data": {"a": 1}, "ts": 1700000000000}
        send(orjson.dumps(full), channel=channel)
        send(orjson.dumps(full), channel=channel)  # a duplicate from the producer
        send(b"not json", channel=channel)
        send(orjson.dumps({"channel": channel, "data": None, "sub": 5}), channel=channel)
        send(orjson.dumps({"kind": "x"}), kind="presence")
        bare_id = send(orjson.dumps({"data": "bare"}), channel=channel)  # channel from attribute
        publisher.stop()
    for client in clients:
        first, second = await client.messages(2)
        assert first == {
            "type": "message", "channel": channel, "id": "foreign-1", "data": {"a": 1},
            "ts": 1700000000000,
        }  # fmt: skip
        assert second["id"] == bare_id and second["data"] == "bare"
        assert abs(second["ts"] - time.time() * 1000) < 60_000
        await client.assert_quiet(0.3)


async def test_recovery_on_the_other_pod_from_a_message_id(cluster, api, channel):
    """A client that saw message k on pod 1 resumes on pod 2 with every later message, once."""
    first = await WsClient.connect(cluster.sockets[0].ws_url)
    await first.subscribe(channel)
    ids = [await publish(api, channel, n) for n in range(3)]
    seen = await first.messages(3)
    await first.close()
    missed = [await publish(api, channel, n) for n in range(3, 8)]
    second = await WsClient.connect(cluster.sockets[1].ws_url)
    frame = await second.subscribe(channel, since=seen[-1]["id"])
    assert frame["recovered"] is True
    replay = await second.messages(5)
    assert [f["id"] for f in replay] == missed
    live = await publish(api, channel, "live")
    assert (await second.next("message"))["id"] == live
    assert ids == [f["id"] for f in seen]


async def test_recovery_from_a_subscribed_position_without_messages(cluster, api, channel):
    """The `position` of a `subscribed` frame resumes on another pod even if nothing came."""
    first = await WsClient.connect(cluster.sockets[0].ws_url)
    position = (await first.subscribe(channel))["position"]
    await first.close()
    missed = [await publish(api, channel, n) for n in range(4)]
    second = await WsClient.connect(cluster.sockets[1].ws_url)
    frame = await second.subscribe(channel, since=position)
    assert frame["recovered"] is True
    assert [f["id"] for f in await second.messages(4)] == missed
    await second.assert_quiet(0.3)


async def test_recovery_with_an_unknown_id_says_not_recovered(cluster, api, channel):
    """An id no pod knows gets `recovered: false` (never a silent gap), then live messages."""
    client = await WsClient.connect(cluster.sockets[0].ws_url)
    await client.subscribe(channel)
    await publish(api, channel, "old")
    await client.next("message")  # the pod has the channel's history now
    for since in ("never-published", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "@12345"):
        frame = await client.subscribe(channel, since=since)
        assert frame["recovered"] is False, since
        assert frame["position"]
    live = await publish(api, channel, "live")
    assert (await client.next("message"))["id"] == live


async def test_recovery_waits_for_an_id_this_pod_has_not_seen_yet(cluster, api, channel):
    """A fresh time-ordered id that the pod has not received yet is waited for, then resumed."""
    client = await WsClient.connect(cluster.sockets[1].ws_url)
    future_id = new_message_id()
    # The subscribe reaches the pod over loopback long before the message makes its way
    # through the api and Pub/Sub: the pod must wait for it rather than answer false.
    await client.send({"type": "subscribe", "channel": channel, "since": future_id})
    subscribe = asyncio.create_task(client.next("subscribed"))
    await publish(api, channel, "the awaited one", id=future_id)
    after = await publish(api, channel, "after")
    frame = await subscribe
    assert frame["recovered"] is True
    assert (await client.next("message"))["id"] == after


async def test_a_position_from_a_pod_behind_its_stream_loses_nothing_elsewhere(
    cluster, api, channel
):
    """A pod whose stream is stalled hands out positions no newer than what it has processed:
    resumed on another pod, the message it never got is delivered (found by make soak: an empty
    channel's `@<ms>` position, and socket.io's offsets, were stamped with the wall clock, so a
    client resumed past messages its pod had not received yet, `recovered: true`)."""
    behind, other = cluster.sockets
    assert cluster.strict is not None
    witness = await WsClient.connect(other.ws_url)
    await witness.subscribe(channel)
    stalled = cluster.strict.control("stall", subscription=f"pubsock-{behind.env['POD_NAME']}-")
    assert stalled["stalled"] >= 1, stalled
    try:
        missed = await publish(api, channel, "the stalled pod never gets this")
        assert (await witness.next("message"))["id"] == missed
        # A position is "after <ms> minus POSITION_SLACK_MS": let the slack pass, so that a
        # position stamped with the wall clock would lie after the missed message.
        slack_s = int(TEST_SOCKET_ENV["POSITION_SLACK_MS"]) / 1000
        await asyncio.sleep(slack_s + 0.3)
        client = await WsClient.connect(behind.ws_url)
        position = (await client.subscribe(channel))["position"]
    finally:
        cluster.strict.control("unstall")
    moved = await WsClient.connect(other.ws_url)
    # The other pod has held the channel all along: it recovers, and the missed message comes.
    answer = await moved.subscribe(channel, since=position)
    assert answer["recovered"] is True
    assert (await moved.next("message"))["id"] == missed
