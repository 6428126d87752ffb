"""Single-process mode: the api and a socket pod on the memory broker, over real HTTP and
websockets (the memory broker never stands in for Pub/Sub in integration tests)."""

from __future__ import annotations

import asyncio

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
    pod = Pod(SocketSettings(broker="memory", port=0, host="127.0.0.1", pod_name="solo"), broker)
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


async def test_stream_break_makes_recovery_say_false(pod_and_api):
    """After the stream broke, an id from before the break cannot anchor a recovery."""
    pod, api, broker = pod_and_api
    client = await WsClient.connect(f"ws://127.0.0.1:{pod.port}/ws")
    await client.subscribe("c")
    before = (await api.post("/v1/channels/c/messages", json={"data": 1})).json()["id"]
    await client.next("message")
    breaks = pod.metrics.stream_breaks._value.get()
    pod.subscription.break_stream()  # type: ignore[attr-defined]
    async with asyncio.timeout(5):
        while pod.metrics.stream_breaks._value.get() == breaks or not pod.pump.healthy:
            await asyncio.sleep(0.01)
    frame = await client.subscribe("c", since=before)
    assert frame["recovered"] is False


async def test_api_503_when_the_broker_is_unavailable(pod_and_api):
    _, api, broker = pod_and_api
    broker.available = False
    response = await api.post("/v1/channels/c/messages", json={"data": 1, "id": "again"})
    assert response.status_code == 503 and response.json()["id"] == "again"
    assert response.headers["retry-after"]


def test_settings_fail_loudly(monkeypatch):
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    with pytest.raises(ValueError):
        SocketSettings(history_size=0)
    with pytest.raises(ValueError):
        ApiSettings(broker="pubsub", google_cloud_project="")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    assert ApiSettings().google_cloud_project == "local-project"
