"""Slow consumers, the load balancer moving clients, clean stop and an unreachable broker."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import httpx
import orjson
import websockets

from devtools.cluster import LoadBalancer, LocalCluster, Service, free_port, port_open
from tests.support import WsClient, metric, wait_metric


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Splits unmasked server frames: (opcode, payload) pairs."""
    frames, offset = [], 0
    while offset + 2 <= len(data):
        opcode, length = data[offset] & 0x0F, data[offset + 1] & 0x7F
        offset += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", data, offset)
            offset += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", data, offset)
            offset += 8
        if offset + length > len(data):
            break
        frames.append((opcode, data[offset : offset + length]))
        offset += length
    return frames


async def test_slow_consumer_is_closed_with_1013_and_never_slows_others(cluster, api, channel):
    """A raw socket that never reads is closed with 1013 once its unsent data passes the bound,
    while a fast client on the same channel receives every message."""
    pod = cluster.sockets[0]
    fast = await WsClient.connect(pod.ws_url)
    await fast.subscribe(channel)
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", pod.port))
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    raw.sendall(
        f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert raw.recv(4096).startswith(b"HTTP/1.1 101")
    subscribe = orjson.dumps({"type": "subscribe", "channel": channel})
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(subscribe))
    raw.sendall(bytes([0x81, 0x80 | len(subscribe)]) + mask + masked)
    closes_before = await metric(pod.url, "pubsock_slow_consumer_closes_total")
    ids = []
    payload = "x" * 50_000
    for _ in range(12):  # ~600 KB of batches, many times the 64 KiB bound plus kernel buffers
        response = await api.post(
            "/v1/messages", json={"messages": [{"channel": channel, "data": payload}] * 5}
        )
        assert response.status_code == 202
        ids.extend(response.json()["ids"])
    received = [f["id"] for f in await fast.messages(len(ids), timeout=60)]
    assert received == ids
    await wait_metric(pod.url, "pubsock_slow_consumer_closes_total", lambda n: n > closes_before)
    raw.settimeout(10)
    data = bytearray()
    while True:
        try:
            chunk = raw.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    raw.close()
    frames = read_frames(bytes(data))
    closes = [payload for opcode, payload in frames if opcode == 0x8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == 1013


async def test_load_balancer_keeps_affinity_and_moves_a_client_when_its_pod_is_gone(
    cluster: LocalCluster, api, channel
):
    """Through HAProxy with the affinity cookie: reconnects land on the same pod; after that pod
    is killed, the same cookie lands on the other pod and `since` recovers what was missed."""
    pods = [cluster.new_socket(f"lb-pod-{i}", free_port()) for i in (1, 2)]
    for pod in pods:
        pod.start(wait_ready=False)
    for pod in pods:
        pod.wait_ready()
    lb = LoadBalancer(free_port(), [cluster.api.port], [p.port for p in pods], cluster.work_dir)
    lb.start()
    try:
        async with httpx.AsyncClient(base_url=lb.url) as browser:
            page = await browser.get("/")
            assert page.status_code == 200
            cookie = browser.cookies.get("GCLB")
            assert cookie, page.headers
            first_pod = page.headers["x-pubsock-pod"]
            headers = {"Cookie": f"GCLB={cookie}"}
            ws_url = lb.url.replace("http", "ws") + "/ws"
            client = await WsClient.connect(ws_url, additional_headers=headers)
            assert await client.pod() == first_pod
            await client.subscribe(channel)
            seen = await api_publish_and_receive(api, client, channel, "before")
            await client.close()
            again = await WsClient.connect(ws_url, additional_headers=headers)
            assert await again.pod() == first_pod  # affinity holds while the pod lives
            await again.close()
            victim = next(p for p in pods if p.name == first_pod)
            victim.process.kill()
            missed = [
                (await api.post(f"/v1/channels/{channel}/messages", json={"data": n})).json()["id"]
                for n in range(5)
            ]
            moved = await WsClient.connect(ws_url, additional_headers=headers)
            assert await moved.pod() != first_pod
            frame = await moved.subscribe(channel, since=seen)
            assert frame["recovered"] is True
            assert [f["id"] for f in await moved.messages(5)] == missed
    finally:
        lb.stop()
        for pod in pods:
            pod.process.stop()


async def api_publish_and_receive(api, client: WsClient, channel: str, data: object) -> str:
    response = await api.post(f"/v1/channels/{channel}/messages", json={"data": data})
    message_id = response.json()["id"]
    assert (await client.next("message"))["id"] == message_id
    return message_id


async def test_sigterm_drains_with_1012_deletes_the_subscription_and_exits(cluster, channel):
    """Clean stop: readiness drops, sessions get 1012, the subscription is deleted, exit 0."""
    pod: Service = cluster.new_socket("drain-pod", free_port(), DRAIN_CLOSE_WINDOW_S="1")
    pod.start()
    clients = [await WsClient.connect(pod.ws_url) for _ in range(3)]
    for client in clients:
        await client.subscribe(channel)
    subscriptions_before = await list_subscriptions(cluster)
    mine = [s for s in subscriptions_before if "drain-pod" in s]
    assert len(mine) == 1
    pod.process.signal(15)
    codes = await asyncio.gather(*(c.wait_closed(20) for c in clients))
    assert codes == [1012, 1012, 1012]
    exit_code = await asyncio.to_thread(pod.process.wait, 30)
    assert exit_code == 0, pod.process.log_tail()
    assert mine[0] not in await list_subscriptions(cluster)
    assert not await asyncio.to_thread(port_open, pod.port)


async def list_subscriptions(cluster: LocalCluster) -> list[str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://{cluster.emulator.host}/v1/projects/local-project/subscriptions"
        )
    return [s["name"] for s in response.json().get("subscriptions", [])]


async def test_api_answers_503_with_retry_after_when_pubsub_is_unreachable(cluster):
    """No Pub/Sub: a bounded-time 503 with Retry-After and the id to retry with; never a hang."""
    dead, port = free_port(), free_port()
    api = cluster.new_api(
        "api-no-broker",
        port,
        PUBSUB_EMULATOR_HOST=f"127.0.0.1:{dead}",
        PUBLISH_TIMEOUT_S="2",
        BROKER_PROBE_INTERVAL_S="0.5",
    )
    api.start()
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
            response = await client.post(
                "/v1/channels/room:1/messages", json={"data": 1, "id": "retry-me"}
            )
            assert response.status_code == 503
            assert response.headers["retry-after"].isdigit()
            assert response.json()["id"] == "retry-me"
            batch = await client.post(
                "/v1/messages", json={"messages": [{"channel": "a", "data": 1}] * 3}
            )
            assert batch.status_code == 503 and len(batch.json()["ids"]) == 3
            assert (await client.get("/readyz")).status_code == 200  # a shared outage
            assert "pubsock_broker_up 0.0" in (await client.get("/metrics")).text
    finally:
        api.process.stop()


async def test_a_plain_websockets_client_works_on_every_pod(cluster):
    """A plain `websockets` client (no test helper) connects to every pod's /ws and gets a pong."""
    for pod in cluster.sockets:
        async with websockets.connect(pod.ws_url) as ws:
            await ws.send('{"type":"ping"}')
            assert orjson.loads(await ws.recv())["type"] == "pong"
