"""Every bad input of the core path, on both services: a clear error, nothing else harmed."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from tests.support import WsClient


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/channels/room:1/messages", {}, 422),  # data missing
        ("/v1/channels/room:1/messages", {"data": 1, "extra": 2}, 422),
        ("/v1/channels/room:1/messages", {"data": 1, "id": "has space"}, 422),
        ("/v1/channels/room:1/messages", {"data": 1, "id": ""}, 422),
        ("/v1/channels/room:1/messages", {"data": 1, "id": "x" * 129}, 422),
        ("/v1/channels/room:1/messages", [1, 2], 422),
        ("/v1/channels/bad%20channel/messages", {"data": 1}, 422),
        ("/v1/channels/" + "c" * 129 + "/messages", {"data": 1}, 422),
        ("/v1/channels/room%2F1/messages", {"data": 1}, 404),
        ("/v1/messages", {"messages": []}, 422),
        ("/v1/messages", {"messages": [{"channel": "a b", "data": 1}]}, 422),
        ("/v1/messages", {"messages": [{"channel": "ok", "data": 1}, {"data": 2}]}, 422),
        ("/v1/messages", {}, 422),
    ],
)
async def test_api_rejects_malformed_requests(api, path, body, status):
    """Malformed bodies, ids and channel names get 4xx with a JSON `detail`."""
    response = await api.post(path, json=body)
    assert response.status_code == status, response.text
    assert "detail" in response.json()


async def test_api_rejects_non_json_and_wrong_types(api):
    for content, headers in [
        (b"{not json", {"Content-Type": "application/json"}),
        (b"data=1", {"Content-Type": "application/x-www-form-urlencoded"}),
        (b"", {"Content-Type": "application/json"}),
        (b'{"data": 1}', {"Content-Type": "text/plain"}),
    ]:
        response = await api.post("/v1/channels/room:1/messages", content=content, headers=headers)
        assert response.status_code == 422, (content, response.text)
        assert "detail" in response.json()


async def test_api_413_for_large_data_and_large_bodies(api):
    """`data` over MAX_MESSAGE_BYTES and bodies over MAX_REQUEST_BYTES are 413, not 5xx."""
    big = "x" * 70_000
    response = await api.post("/v1/channels/room:1/messages", json={"data": big})
    assert response.status_code == 413 and "detail" in response.json()
    batch = {"messages": [{"channel": "room:1", "data": "y" * 70_000}] * 2}  # one item too big
    response = await api.post("/v1/messages", json=batch)
    assert response.status_code == 413 and "detail" in response.json()
    # Bodies over MAX_REQUEST_BYTES, with a Content-Length (refused before reading) and chunked
    # (counted as they arrive). The answer may race the upload: read it from a raw socket.
    port = int(str(api.base_url).rsplit(":", 1)[1].rstrip("/"))
    for chunked in (False, True):
        status = await asyncio.to_thread(upload_status, port, 40 * 32_768, chunked)
        assert status == 413, chunked


def upload_status(port: int, size: int, chunked: bool) -> int:
    """POSTs a `size`-byte JSON body from a raw socket; the status the api answered."""
    body = b'{"data": "' + b"z" * size + b'"}'
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(
            b"POST /v1/channels/room:1/messages HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
        )
        try:
            for start in range(0, len(body), 32_768):
                chunk = body[start : start + 32_768]
                raw.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                raw.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading: its answer is already on the way
        return int(raw.recv(100).split(b" ")[1])


async def test_api_batch_over_max_batch_is_413(api):
    items = [{"channel": "room:1", "data": 1}] * 1001
    response = await api.post("/v1/messages", json={"messages": items})
    assert response.status_code == 413


async def test_api_openapi_lists_every_error(api):
    schema = (await api.get("/openapi.json")).json()
    single = schema["paths"]["/v1/channels/{channel}/messages"]["post"]["responses"]
    batch = schema["paths"]["/v1/messages"]["post"]["responses"]
    for responses in (single, batch):
        assert {"202", "413", "422", "503"} <= set(responses)
    assert (await api.get("/docs")).status_code == 200


async def test_api_cors_allows_a_browser_on_another_origin(api):
    response = await api.options(
        "/v1/channels/room:1/messages",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "https://app.example")


async def test_api_health_and_metrics(api):
    assert (await api.get("/healthz")).status_code == 200
    assert (await api.get("/readyz")).status_code == 200
    metrics = (await api.get("/metrics")).text
    assert "pubsock_broker_up 1.0" in metrics
    assert "pubsock_publishes_total" in metrics


async def test_socket_error_frames_keep_the_connection_open(cluster):
    """bad_request and bad_channel come back as error frames; the connection stays usable."""
    client = await WsClient.connect(cluster.sockets[0].ws_url)
    cases = [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ({"type": "dance"}, "bad_request"),
        ({"channel": "room:1"}, "bad_request"),
        ({"type": "subscribe"}, "bad_request"),
        ({"type": "subscribe", "channel": "bad channel"}, "bad_channel"),
        ({"type": "subscribe", "channel": "x" * 129}, "bad_channel"),
        ({"type": "subscribe", "channel": 42}, "bad_channel"),
        ({"type": "subscribe", "channel": "ok", "since": 5}, "bad_request"),
        ({"type": "subscribe", "channel": "ok", "presence": "yes"}, "bad_request"),
        ({"type": "unsubscribe", "channel": "a/b"}, "bad_channel"),
        (b"\x00\x01", "bad_request"),  # binary frame
    ]
    for frame, code in cases:
        await client.send(frame)
        error = await client.next("error")
        assert error["code"] == code, (frame, error)
        assert error["message"]
    assert await client.pod() == "socket-1"


async def test_socket_frame_too_large_closes_with_1009(cluster):
    client = await WsClient.connect(cluster.sockets[0].ws_url, max_size=None)
    await client.send({"type": "subscribe", "channel": "x", "pad": "p" * 10_000})
    assert await client.wait_closed() == 1009


async def test_socket_http_errors(cluster):
    """Unknown paths 404, bad methods 405, malformed requests 400, huge heads 431."""
    base = cluster.sockets[0].url
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/nope")).status_code == 404
        assert (await client.get("/../../etc/passwd")).status_code == 404
        assert (await client.post("/healthz")).status_code == 405
        assert (await client.get("/ws")).status_code == 404  # not an upgrade
        assert (await client.get("/", headers={"X-Big": "b" * 20_000})).status_code == 431
        page = await client.get("/")
        assert page.status_code == 200 and "pubsock" in page.text
        assert (
            (await client.get("/pubsock.js")).headers["content-type"].startswith("text/javascript")
        )
    with socket.create_connection(("127.0.0.1", cluster.sockets[0].port), timeout=5) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400")


async def test_socket_refuses_foreign_handshake_garbage(cluster):
    """A broken websocket handshake gets an HTTP error, not a session."""
    with socket.create_connection(("127.0.0.1", cluster.sockets[0].port), timeout=5) as raw:
        raw.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        assert raw.recv(100).startswith(b"HTTP/1.1 400")


async def test_socket_health_and_metrics(cluster, api, channel):
    client = await WsClient.connect(cluster.sockets[0].ws_url)
    await client.subscribe(channel)
    await api.post(f"/v1/channels/{channel}/messages", json={"data": 1})
    await client.next("message")
    async with httpx.AsyncClient(base_url=cluster.sockets[0].url) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = (await client.get("/metrics")).text
    for name in (
        "pubsock_broker_up 1.0",
        "pubsock_connections",
        "pubsock_subscriptions",
        "pubsock_frames_sent_total",
        "pubsock_duplicates_dropped_total",
        "pubsock_slow_consumer_closes_total",
        "pubsock_recoveries_total",
        "pubsock_history_messages",
        'pubsock_messages_received_total{namespace="other"}',
    ):
        assert name in metrics, name
    assert "test:" not in metrics  # never a raw channel name in a label


async def test_many_bad_clients_do_not_disturb_a_good_one(cluster, api, channel):
    """Floods of garbage on other connections do not delay or break delivery to a good one."""
    good = await WsClient.connect(cluster.sockets[0].ws_url)
    await good.subscribe(channel)
    bad = [await WsClient.connect(cluster.sockets[0].ws_url) for _ in range(5)]
    await asyncio.gather(*(b.send("garbage" * 100) for b in bad for _ in range(20)))
    response = await api.post(f"/v1/channels/{channel}/messages", json={"data": "ok"})
    assert (await good.next("message"))["id"] == response.json()["id"]
