"""Single-process mode: the api and a socket pod on the memory broker, over real HTTP and
websockets (the memory broker never stands in for Pub/Sub in integration tests)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.core.broker.memory import MemoryBroker
from services.socket.pod import Pod
from services.socket.settings import SocketSettings
from tests.support import WsClient


@pytest.fixture
async def pod_and_api():
    broker = MemoryBroker()
    settings = SocketSettings(
        broker="memory",
        port=0,
        host="127.0.0.1",
        pod_name="solo",
        drain_close_window_s=0,  # the teardown's drain closes its clients at once
    )
    pod = Pod(settings, broker)
    await pod.start()
    app = create_app(ApiSettings(broker="memory"), broker)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
            yield pod, api, broker
    await pod.drain()


async def test_publish_reaches_a_websocket_client(pod_and_api):
    pod, api, _ = pod_and_api
    client = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    await client.subscribe("room:1")
    response = await api.post("/v1/channels/room:1/messages", json={"data": "hi"})
    assert response.status_code == 202
    frame = await client.next("message")
    assert frame["data"] == "hi" and frame["id"] == response.json()["id"]


async def test_a_resumed_stream_loses_nothing(pod_and_api):
    """The stream ends but the subscription lives: resume it, no break, recovery still exact."""
    pod, api, broker = pod_and_api
    client = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    await client.subscribe("c")
    before = (await api.post("/v1/channels/c/messages", json={"data": 1})).json()["id"]
    await client.next("message")
    pod.subscription.break_stream()  # type: ignore[attr-defined]
    during = (await api.post("/v1/channels/c/messages", json={"data": 2})).json()["id"]
    assert (await client.next("message"))["id"] == during
    assert pod.metrics.stream_breaks._value.get() == 1
    again = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    assert (await again.subscribe("c", since=before))["recovered"] is True


async def test_a_vanished_subscription_is_an_unprovable_break(pod_and_api):
    """The subscription is gone (expired, deleted): it is recreated, sessions are closed with
    1013, and an id from before the break no longer anchors a recovery."""
    pod, api, broker = pod_and_api
    client = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    await client.subscribe("c")
    before = (await api.post("/v1/channels/c/messages", json={"data": 1})).json()["id"]
    await client.next("message")
    broker._subscriptions.clear()  # what an expiry or a deletion does
    pod.subscription.break_stream()  # type: ignore[attr-defined]
    assert await client.wait_closed(5) == 1013
    again = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    assert (await again.subscribe("c", since=before))["recovered"] is False
    assert pod.metrics.unprovable_breaks._value.get() == 1


async def test_api_503_when_the_broker_is_unavailable(pod_and_api):
    _, api, broker = pod_and_api
    broker.available = False
    response = await api.post("/v1/channels/c/messages", json={"data": 1, "id": "again"})
    assert response.status_code == 503 and response.json()["id"] == "again"
    assert response.headers["retry-after"]


async def test_a_client_connecting_as_the_pod_drains_is_answered_or_refused():
    """Not stranded: Python 3.11's selector loop attaches an accepted connection to the server
    one loop iteration after accepting it, and a server closed in between leaks that socket,
    open and never answered. Here the pod accepts in the iteration where its drain begins, and
    closes its listening socket in the next, before the attach (the drain's one yield)."""
    pod = Pod(
        SocketSettings(
            broker="memory",
            port=0,
            host="127.0.0.1",
            pod_name="solo",
            drain_close_window_s=0,
            close_timeout_s=1,
            shutdown_cleanup_s=1,
        ),
        MemoryBroker(),
    )
    await pod.start()
    client = socket.create_connection(("127.0.0.1", pod.port))  # in the kernel's backlog now
    client.setblocking(False)
    try:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: solo\r\n\r\n")
        await asyncio.sleep(0)  # the loop sees the listening socket ready: accepts after this
        await pod.drain()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(5):
                answer = await loop.sock_recv(client, 4096)
        except ConnectionResetError:
            answer = b""  # refused: the client reconnects elsewhere
        assert answer == b"" or answer.startswith(b"HTTP/1.1 ")
    finally:
        client.close()


def test_settings_fail_loudly(monkeypatch):
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    with pytest.raises(ValueError):
        SocketSettings(history_size=0)
    with pytest.raises(ValueError):
        ApiSettings(broker="pubsub", google_cloud_project="")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    assert ApiSettings().google_cloud_project == "local-project"


def test_the_rewind_window_defaults_to_the_history_window_and_never_exceeds_it():
    settings = SocketSettings(broker="memory", history_age_s=600)
    assert settings.rewind_max_s == 600 and settings.rewind_max_count == 100
    assert SocketSettings(broker="memory", history_age_s=600, rewind_max_s=60).rewind_max_s == 60
    with pytest.raises(ValueError, match="REWIND_MAX_S"):
        SocketSettings(broker="memory", history_age_s=600, rewind_max_s=601)
    with pytest.raises(ValueError):
        SocketSettings(broker="memory", rewind_max_count=0)
