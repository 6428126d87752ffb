"""Server-Sent Events against real pods (httpx streaming): events, resume with Last-Event-ID on
the other pod exactly once per channel, gaps, the load balancer, refusals, the connection limit,
token expiry, presence, keep-alive, the drain, a SIGKILL under steady publishing and a slow
consumer."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from devtools.cluster import LocalCluster, Service, free_port
from services.socket.sse_id import decode_positions
from tests.support import (
    Publisher,
    SseClient,
    SseParser,
    WsClient,
    eventually,
    metric,
    publish,
    wait_metric,
)


async def opened(stream: SseClient, channels: int) -> dict[str, dict[str, Any]]:
    """The `pod` event, then a `subscribed` event per channel (no `since`: all at once)."""
    assert (await stream.next("pod"))["pod"] == stream.pod
    frames = [await stream.next("subscribed") for _ in range(channels)]
    return {frame["channel"]: frame for frame in frames}


async def resumed(
    stream: SseClient, channels: list[str], messages: int
) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """After a resume: a `subscribed` per channel and `messages` messages, in any interleaving
    of channels (each recovers on its own); per channel, subscribed comes first."""
    assert (await stream.next("pod"))["pod"] == stream.pod
    subscribed: dict[str, dict[str, Any]] = {}
    ids: dict[str, list[str]] = {channel: [] for channel in channels}
    while len(subscribed) < len(channels) or sum(map(len, ids.values())) < messages:
        data = await stream.next()
        if data["type"] == "subscribed":
            subscribed[data["channel"]] = data
        else:
            assert data["type"] == "message" and data["channel"] in subscribed, data
            ids[data["channel"]].append(data["id"])
    return subscribed, ids


async def test_a_stream_carries_every_channel_and_resumes_on_the_other_pod_once(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    a, b, c = f"{channel}-a", f"{channel}-b", f"{channel}-c"
    first, second = cluster.sockets
    stream = await SseClient.open(f"{first.url}/sse?channels={a},{b}")
    assert stream.pod == first.env["POD_NAME"]
    assert stream.response.headers["content-type"].startswith("text/event-stream")
    await opened(stream, 2)
    sent = {a: [await publish(api, a, n) for n in range(3)], b: [await publish(api, b, 9)]}
    got = await stream.messages(4)
    assert [m["id"] for m in got if m["channel"] == a] == sent[a]
    assert [m["id"] for m in got if m["channel"] == b] == sent[b]
    last = stream.last_event_id
    assert decode_positions(last, 10) == {a: sent[a][-1], b: sent[b][-1]}
    await stream.close()

    missed = {a: [await publish(api, a, n) for n in range(2)], b: [await publish(api, b, 7)]}
    stream = await SseClient.open(
        f"{second.url}/sse?channels={a},{b},{c}", headers={"Last-Event-ID": last}
    )
    assert stream.pod == second.env["POD_NAME"]
    subscribed, ids = await resumed(stream, [a, b, c], 3)
    assert subscribed[a]["recovered"] is True and subscribed[b]["recovered"] is True
    assert "recovered" not in subscribed[c]  # not in the id: new to the stream, live from now
    assert ids == {**missed, c: []}  # exactly what was missed, once, in order
    live = await publish(api, b, "live")
    assert (await stream.next("message"))["id"] == live
    await stream.assert_quiet(0.3)
    await stream.close()


async def test_unknown_or_unreadable_positions_are_gaps(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    a, b = f"{channel}-a", f"{channel}-b"
    pod = cluster.sockets[0]
    watcher = await SseClient.open(f"{pod.url}/sse?channels={a}")
    await opened(watcher, 1)
    newest = await publish(api, a, 1)
    assert (await watcher.next("message"))["id"] == newest  # the pod holds it now
    await watcher.close()
    url = f"{pod.url}/sse?channels={a},{b}"
    stream = await SseClient.open(url, headers={"Last-Event-ID": f"{a}=not-a-known-id"})
    subscribed, _ = await resumed(stream, [a, b], 0)
    assert subscribed[a]["recovered"] is False and "recovered" not in subscribed[b]
    assert subscribed[a]["position"] == newest  # starts over from where the channel stands
    assert decode_positions(stream.last_event_id, 10)[a] == newest
    await stream.close()
    for headers, query in (
        ({"Last-Event-ID": "garbage without pairs"}, ""),
        ({}, "&last_event_id=x"),
    ):
        stream = await SseClient.open(url + query, headers=headers)
        subscribed, _ = await resumed(stream, [a, b], 0)
        assert [subscribed[ch]["recovered"] for ch in (a, b)] == [False, False]
        await stream.close()
    # The header wins over the query (a browser's reconnect repeats the URL it was opened with).
    stream = await SseClient.open(
        url + "&last_event_id=garbage", headers={"Last-Event-ID": f"{a}={newest}"}
    )
    subscribed, _ = await resumed(stream, [a, b], 0)
    assert subscribed[a]["recovered"] is True
    await stream.close()


async def test_a_rewind_serves_recent_messages_first_then_live(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    pod = cluster.sockets[1]
    watcher = await SseClient.open(f"{pod.url}/sse?channels={channel}")
    await opened(watcher, 1)
    sent = [await publish(api, channel, n) for n in range(3)]
    assert [m["id"] for m in await watcher.messages(3)] == sent  # the pod holds them now
    await watcher.close()
    stream = await SseClient.open(f"{pod.url}/sse?channels={channel}&rewind_count=2")
    assert (await stream.next("pod"))["pod"] == stream.pod
    subscribed = await stream.next("subscribed")
    assert subscribed["rewound"]["count"] == 2
    assert [m["id"] for m in await stream.messages(2)] == sent[1:]
    assert decode_positions(stream.last_event_id, 10) == {channel: sent[-1]}
    live = await publish(api, channel, "live")
    assert (await stream.next("message"))["id"] == live
    await stream.close()


async def test_the_load_balancer_routes_streams_without_buffering(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    """Through HAProxy, no affinity cookie needed; each event arrives as it is published."""
    assert cluster.lb is not None
    stream = await SseClient.open(f"{cluster.lb.url}/sse?channels={channel}")
    assert stream.pod in {pod.env["POD_NAME"] for pod in cluster.sockets}
    await opened(stream, 1)
    for n in range(3):
        sent = await publish(api, channel, n)
        assert (await stream.next("message"))["id"] == sent
    await stream.close()


# -- admission ---------------------------------------------------------------------------------
async def test_refusals_are_json_with_their_status(secure) -> None:
    base = f"{secure.socket.url}/sse"
    token = secure.token()
    cases = [
        ("GET", "?channels=room:1", {}, 401),
        ("GET", "?channels=room:1&token=garbage", {}, 401),
        ("GET", f"?channels=room:1&token={secure.token(ttl_s=-10)}", {}, 401),
        ("GET", "?channels=room:1", {"Authorization": "Basic abc"}, 401),
        ("GET", f"?channels=room:1&token={token}", {"Origin": "https://evil.example"}, 403),
        ("GET", f"?token={token}", {}, 400),
        ("GET", f"?channels=room:1,bad%20name&token={token}", {}, 400),
        ("GET", f"?channels=room:1,room:2,room:3,room:4&token={token}", {}, 400),
        ("GET", f"?channels=room:1&presence=maybe&token={token}", {}, 400),
        ("GET", f"?channels=other:1&token={token}", {}, 403),
        ("POST", f"?channels=room:1&token={token}", {}, 405),
    ]
    async with httpx.AsyncClient(timeout=10) as http:
        for method, query, headers, status in cases:
            response = await http.request(method, base + query, headers=headers)
            assert response.status_code == status, (query, headers, response.text)
            assert isinstance(response.json()["detail"], str)
        preflight = await http.options(
            base,
            headers={
                "Origin": "https://good.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            },
        )
        assert preflight.status_code == 204
        assert "Last-Event-ID" in preflight.headers["access-control-allow-headers"]
        assert preflight.headers["access-control-allow-origin"] == "https://good.example"
    rejections = 'pubsock_handshake_rejections_total{reason="forbidden"}'
    assert await metric(secure.socket.url, rejections) >= 1
    stream = await SseClient.open(
        f"{base}?channels=room:1",
        headers={"Authorization": f"Bearer {token}", "Origin": "https://good.example"},
    )
    assert stream.response.headers["access-control-allow-origin"] == "https://good.example"
    await opened(stream, 1)
    await stream.close()


async def test_max_connections_counts_streams_and_websockets_together(secure) -> None:
    """MAX_CONNECTIONS=12 on this pod: 6 websockets and 6 streams fill it; then 503."""
    token = secure.token()
    url = f"{secure.socket.url}/sse?channels=room:1&token={token}"
    sockets = [await WsClient.connect(secure.ws_url(token)) for _ in range(6)]
    streams = [await SseClient.open(url) for _ in range(6)]
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.get(url)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert await metric(secure.socket.url, "pubsock_sse_sessions") == 6
    finally:
        for stream in streams:
            await stream.close()
        for client in sockets:
            await client.close()


async def test_token_expiry_ends_the_stream_with_1008(secure) -> None:
    stream = await SseClient.open(
        f"{secure.socket.url}/sse?channels=room:1&token={secure.token(ttl_s=2)}"
    )
    await opened(stream, 1)
    closing = await stream.next("close", timeout=10)
    assert closing == {"type": "close", "code": 1008, "reason": "token expired"}
    await stream.wait_ended()


async def test_presence_events_and_the_presence_query(secure) -> None:
    channel = "room:presence"
    stream = await SseClient.open(
        f"{secure.socket.url}/sse?channels={channel}&presence=1&token={secure.token('ann')}"
    )
    await opened(stream, 1)
    bob = await WsClient.connect(secure.ws_url(secure.token("bob")))
    await bob.subscribe(channel)
    assert await stream.next("join") == {"type": "join", "channel": channel, "sub": "bob"}
    async with httpx.AsyncClient(timeout=10) as http:
        query = f"{secure.socket.url}/sse/presence?channel={channel}"
        answer = await http.get(query, headers={"Authorization": f"Bearer {secure.token()}"})
        assert answer.status_code == 200
        assert answer.json() == {
            "type": "presence",
            "channel": channel,
            "count": 2,
            "members": [{"sub": "ann"}, {"sub": "bob"}],
        }
        assert (await http.get(query)).status_code == 401
        forbidden = await http.get(
            f"{secure.socket.url}/sse/presence?channel=other:1&token={secure.token()}"
        )
        assert forbidden.status_code == 403
    await bob.close()
    assert await stream.next("leave") == {"type": "leave", "channel": channel, "sub": "bob"}
    await stream.close()


# -- a pod of its own: keep-alive, drain, SIGKILL ------------------------------------------------
@pytest.fixture
def own_pod(cluster: LocalCluster):
    pod = cluster.new_socket(f"sse-{free_port()}", free_port(), SSE_KEEPALIVE_S="1")
    pod.start()
    yield pod
    pod.process.stop()


async def test_keepalive_drain_and_resume_elsewhere(
    own_pod: Service, cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    stream = await SseClient.open(f"{own_pod.url}/sse?channels={channel}")
    await opened(stream, 1)
    assert await metric(own_pod.url, "pubsock_sse_sessions") == 1
    assert await metric(own_pod.url, "pubsock_connections") == 1
    # a quiet stream gets a comment every SSE_KEEPALIVE_S
    await eventually(lambda: "ka" in stream.parser.comments, 10, "a keep-alive comment")
    sent = [await publish(api, channel, n) for n in range(2)]
    assert [m["id"] for m in await stream.messages(2)] == sent
    own_pod.process.signal(15)
    closing = await stream.next("close", timeout=20)
    assert closing["code"] == 1012
    assert stream.parser.retry_ms is not None and stream.parser.retry_ms <= 1000
    await stream.wait_ended()
    assert await asyncio.to_thread(own_pod.process.wait, 20) == 0
    missed = [await publish(api, channel, n) for n in range(3)]
    other = await SseClient.open(
        f"{cluster.sockets[0].url}/sse?channels={channel}",
        headers={"Last-Event-ID": stream.last_event_id},
    )
    subscribed, ids = await resumed(other, [channel], 3)
    assert subscribed[channel]["recovered"] is True and ids[channel] == missed
    await other.close()
    await stream.close()


async def test_sigkill_under_steady_publishing_resumes_once_on_the_other_pod(
    own_pod: Service, cluster: LocalCluster, channel: str
) -> None:
    """Publishing goes on while the stream's pod is SIGKILLed; the stream resumes on another
    pod with its last Last-Event-ID: every accepted id once, in order."""
    publisher = Publisher(cluster.api.url, channel, rate_per_s=30)
    stream = await SseClient.open(f"{own_pod.url}/sse?channels={channel}")
    await opened(stream, 1)
    publisher.start()
    ids: list[str] = []
    async with asyncio.timeout(20):
        while len(ids) < 20:
            ids.append((await stream.next("message"))["id"])
    own_pod.process.kill()
    with pytest.raises(ConnectionError):  # the rest of what arrived, then the end
        while True:
            ids.append((await stream.next("message"))["id"])
    other = await SseClient.open(
        f"{cluster.sockets[1].url}/sse?channels={channel}",
        headers={"Last-Event-ID": stream.last_event_id},
    )
    assert (await other.next("pod"))["pod"] == other.pod
    assert (await other.next("subscribed"))["recovered"] is True
    await publisher.accepted_at_least(len(ids) + 30, 20)
    accepted = await publisher.stop()
    async with asyncio.timeout(30):
        while ids[-1:] != accepted[-1:]:
            ids.append((await other.next("message"))["id"])
    assert ids == accepted
    await other.close()
    await stream.close()


async def test_a_slow_stream_is_closed_and_never_slows_others(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    """A raw socket that stops reading is ended (`close` 1013) once its unsent data passes
    SEND_BUFFER_MAX_BYTES, while a fast stream on the same channel gets every message."""
    pod = cluster.sockets[0]
    fast = await SseClient.open(f"{pod.url}/sse?channels={channel}")
    await opened(fast, 1)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", pod.port))
    raw.sendall(f"GET /sse?channels={channel} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = bytearray(raw.recv(4096))
    assert data.startswith(b"HTTP/1.1 200")
    closes_before = await metric(pod.url, "pubsock_slow_consumer_closes_total")
    ids = []
    payload = "x" * 50_000
    for _ in range(12):
        response = await api.post(
            "/v1/messages", json={"messages": [{"channel": channel, "data": payload}] * 5}
        )
        assert response.status_code == 202
        ids.extend(response.json()["ids"])
    assert [m["id"] for m in await fast.messages(len(ids), timeout=60)] == ids
    await wait_metric(
        pod.url, "pubsock_slow_consumer_closes_total", lambda closes: closes > closes_before
    )
    raw.settimeout(10)
    reset = False
    while True:
        try:
            chunk = await asyncio.to_thread(raw.recv, 1 << 20)
        except ConnectionResetError:  # not drained within CLOSE_TIMEOUT_S: cut
            reset = True
            break
        if not chunk:
            break
        data += chunk
    raw.close()
    parser = SseParser()
    parser.feed(data.split(b"\r\n\r\n", 1)[1].decode(errors="replace"))
    if not reset:  # it drained: the stream ended with its `close` event
        assert parser.events[-1]["event"] == "close"
        assert parser.events[-1]["data"]["code"] == 1013
    await fast.close()


async def test_a_stream_too_long_to_resume_is_refused_and_one_that_fits_resumes(
    cluster: LocalCluster, api: httpx.AsyncClient, channel: str
) -> None:
    """A reconnect carries every channel's position twice: in the Last-Event-ID header that
    EventSource adds and in the URL's `last_event_id` that the browser client sets when it
    reopens. With long channel names and long message ids that request can outgrow what a
    proxy or the pod accepts, and the stream could then never resume. Such a stream is refused
    when it opens, saying how many of its channels fit; a stream of that many resumes through
    the load balancer with the longest ids (128 characters) in both places."""
    assert cluster.lb is not None
    names = [f"{channel}-{n:03d}-".ljust(120, "x") for n in range(100)]
    async with (
        httpx.AsyncClient(timeout=10) as http,
        http.stream(
            "GET", f"{cluster.lb.url}/sse", params={"channels": ",".join(names)}
        ) as refused,
    ):
        assert refused.status_code == 400, "a stream that could never resume was opened"
        detail = json.loads(await refused.aread())["detail"]
    assert "could not resume" in detail, detail
    fit = int(re.search(r"the first (\d+) of these channels", detail).group(1))  # type: ignore[union-attr]
    assert 0 < fit < len(names)

    names = names[:fit]
    url = f"{cluster.lb.url}/sse?" + urlencode({"channels": ",".join(names)})
    stream = await SseClient.open(url)
    await opened(stream, fit)
    # These ids carry no time, so a pod that has not received one yet answers `recovered: false`
    # at once (docs/protocol.md): the resume may land on either pod, so both must hold them.
    watchers = [await WsClient.connect(pod.ws_url) for pod in cluster.sockets]
    for watcher in watchers:
        for name in names:
            await watcher.subscribe(name)
    sent = [
        await publish(api, name, n, id=f"{n:03d}".ljust(128, "i")) for n, name in enumerate(names)
    ]
    assert [m["id"] for m in await stream.messages(fit)] == sent
    for watcher in watchers:
        assert sorted(m["id"] for m in await watcher.messages(fit)) == sorted(sent)
        await watcher.close()
    last = stream.last_event_id
    await stream.close()
    missed = await publish(api, names[0], "missed", id="m".ljust(128, "m"))
    stream = await SseClient.open(
        f"{url}&" + urlencode({"last_event_id": last}), headers={"Last-Event-ID": last}
    )
    subscribed, ids = await resumed(stream, names, 1)
    unrecovered = {
        name: frame for name, frame in subscribed.items() if frame["recovered"] is not True
    }
    assert not unrecovered, (stream.pod, unrecovered)
    assert ids[names[0]] == [missed]
    await stream.close()
