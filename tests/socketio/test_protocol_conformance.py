"""socket.io protocol conformance of one socket pod, case by case.

The socket.io project publishes a compliance suite for server implementations (repository
socketio/socket.io-protocol, folder `test-suite/`). This file is our own equivalent of its
protocol cases, written in Python (httpx and websockets), not a copy: every Engine.IO case
(handshake, heartbeat, close, upgrade) and the three Socket.IO `connect` cases that need no
sample-app handlers. The rest of that suite exercises its sample app (an `auth` event, echo
handlers, binary attachments), which pubsock is not. Each test is named after the case it mirrors.

The pod is a real process (`python -m services.socket`, BROKER=memory) with the suite's reference
server configuration: pingInterval 300 ms, pingTimeout 200 ms, maxPayload 1000000 (the pod's
MAX_REQUEST_BYTES), connectTimeout 1000 ms.

Where an upstream case leaves an order to chance (a poll that must be pending before the close
packet is posted, an upgrade that must be complete before the next request), this suite makes it
certain with a round trip. A few cases are stricter than upstream (for instance, a refused
websocket handshake must be HTTP 400, and the heartbeat cases check their timing bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from devtools.cluster import Service, free_port

PING_INTERVAL_MS = 300
PING_TIMEOUT_MS = 200
MAX_PAYLOAD = 1_000_000
CONNECT_TIMEOUT_MS = 1000
REFERENCE_ENV = {
    "SOCKETIO_PING_INTERVAL_S": str(PING_INTERVAL_MS / 1000),
    "SOCKETIO_PING_TIMEOUT_S": str(PING_TIMEOUT_MS / 1000),
    "MAX_REQUEST_BYTES": str(MAX_PAYLOAD),
    "SOCKETIO_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_MS / 1000),
}
HANDSHAKE_KEYS = {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
DEADLINE_S = 5.0  # how long any awaited event may take (upstream mocha: 2 s, heartbeat 5 s)


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    port = free_port()
    env = {
        **os.environ,
        "BROKER": "memory",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "POD_NAME": "conformance",
        "TOKEN_SECRET": "",
        "API_KEYS": "",
        "ALLOWED_ORIGINS": "*",
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
        **REFERENCE_ENV,
    }
    log_dir: Path = tmp_path_factory.mktemp("conformance")
    service = Service("conformance-pod", "services.socket", port, env, log_dir)
    service.start(timeout_s=30)
    try:
        yield service
    finally:
        service.process.stop(10)


@pytest.fixture
async def http(pod: Service) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=pod.url, timeout=DEADLINE_S) as client:
        yield client


def eio(**query: str) -> str:
    """The Engine.IO path with a query, in the order the suite writes it."""
    return "/socket.io/?" + "&".join(f"{name}={value}" for name, value in query.items())


def ws_url(pod: Service, **query: str) -> str:
    return f"ws://127.0.0.1:{pod.port}" + eio(**query)


async def open_polling(http: httpx.AsyncClient) -> str:
    opened = await http.get(eio(EIO="4", transport="polling"))
    assert opened.status_code == 200, opened.text
    return orjson.loads(opened.text[1:])["sid"]


async def connect(url: str) -> ClientConnection:
    return await websockets.connect(url, open_timeout=DEADLINE_S, close_timeout=1)


async def receive(socket: ClientConnection) -> str | bytes:
    async with asyncio.timeout(DEADLINE_S):
        return await socket.recv()


async def closed(socket: ClientConnection) -> None:
    async with asyncio.timeout(DEADLINE_S):
        await socket.wait_closed()


async def upgrade(socket: ClientConnection) -> None:
    """Sends `2probe` and `5`, then a websocket ping: its pong means the pod has handled both."""
    await socket.send("2probe")
    await socket.send("5")
    pong = await socket.ping()
    async with asyncio.timeout(DEADLINE_S):
        await pong


class Http1:
    """One keep-alive HTTP/1.1 connection written and read by hand: unlike a client library's,
    a request sent on it is known to be on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int) -> Http1:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, method: str, target: str, body: bytes = b"") -> None:
        head = (
            f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        await self._writer.drain()

    async def response(self) -> tuple[int, bytes]:
        async with asyncio.timeout(DEADLINE_S):
            head = await self._reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


# -- Engine.IO protocol: handshake, HTTP long-polling ---------------------------------------------
async def test_engineio_handshake_polling_should_successfully_open_a_session(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get(eio(EIO="4", transport="polling"))
    assert response.status_code == 200
    assert response.text.startswith("0")
    value = orjson.loads(response.text[1:])
    assert set(value) == HANDSHAKE_KEYS
    assert isinstance(value["sid"], str)
    assert value["upgrades"] == ["websocket"]
    assert value["pingInterval"] == PING_INTERVAL_MS
    assert value["pingTimeout"] == PING_TIMEOUT_MS
    assert value["maxPayload"] == MAX_PAYLOAD


async def test_engineio_handshake_polling_should_fail_with_an_invalid_eio_query_parameter(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get(eio(transport="polling"))).status_code == 400
    assert (await http.get(eio(EIO="abc", transport="polling"))).status_code == 400


async def test_engineio_handshake_polling_should_fail_with_an_invalid_transport_query_parameter(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.get(eio(EIO="4"))).status_code == 400
    assert (await http.get(eio(EIO="4", transport="abc"))).status_code == 400


async def test_engineio_handshake_polling_should_fail_with_an_invalid_request_method(
    http: httpx.AsyncClient,
) -> None:
    assert (await http.post(eio(EIO="4", transport="polling"))).status_code == 400
    assert (await http.put(eio(EIO="4", transport="polling"))).status_code == 400


# -- Engine.IO protocol: handshake, WebSocket -----------------------------------------------------
async def test_engineio_handshake_websocket_should_successfully_open_a_session(
    pod: Service,
) -> None:
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    try:
        data = await receive(socket)
        assert isinstance(data, str) and data.startswith("0")
        value = orjson.loads(data[1:])
        assert set(value) == HANDSHAKE_KEYS
        assert isinstance(value["sid"], str)
        assert value["upgrades"] == []
        assert value["pingInterval"] == PING_INTERVAL_MS
        assert value["pingTimeout"] == PING_TIMEOUT_MS
        assert value["maxPayload"] == MAX_PAYLOAD
    finally:
        await socket.close()


async def assert_refused(url: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url)
    assert refused.value.response.status_code == 400


async def test_engineio_handshake_websocket_should_fail_with_an_invalid_eio_query_parameter(
    pod: Service,
) -> None:
    await assert_refused(ws_url(pod, transport="websocket"))
    await assert_refused(ws_url(pod, EIO="abc", transport="websocket"))


async def test_engineio_handshake_websocket_should_fail_with_an_invalid_transport_query_parameter(
    pod: Service,
) -> None:
    await assert_refused(ws_url(pod, EIO="4"))
    await assert_refused(ws_url(pod, EIO="4", transport="abc"))


# -- Engine.IO protocol: heartbeat -----------------------------------------------------------------
async def test_engineio_heartbeat_polling_should_send_ping_pong_packets(
    http: httpx.AsyncClient,
) -> None:
    """Three pings, each pingInterval after the handshake or the last pong; all three come before
    connectTimeout closes the session (no Socket.IO CONNECT is sent)."""
    started = time.monotonic()
    sid = await open_polling(http)
    for _ in range(3):
        poll = await http.get(eio(EIO="4", transport="polling", sid=sid))
        assert poll.status_code == 200
        assert poll.text == "2"
        assert time.monotonic() - started >= PING_INTERVAL_MS / 1000  # not early
        started = time.monotonic()
        push = await http.post(eio(EIO="4", transport="polling", sid=sid), content=b"3")
        assert push.status_code == 200


async def test_engineio_heartbeat_polling_should_close_the_session_upon_ping_timeout(
    http: httpx.AsyncClient,
) -> None:
    sid = await open_polling(http)
    # The passing of time is the case here: no pong within pingInterval + pingTimeout.
    await asyncio.sleep((PING_INTERVAL_MS + PING_TIMEOUT_MS) / 1000)
    poll = await http.get(eio(EIO="4", transport="polling", sid=sid))
    assert poll.status_code == 400


async def test_engineio_heartbeat_websocket_should_send_ping_pong_packets(pod: Service) -> None:
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    try:
        await receive(socket)  # handshake
        for _ in range(3):
            assert await receive(socket) == "2"
            await socket.send("3")
    finally:
        await socket.close()


async def test_engineio_heartbeat_websocket_should_close_the_session_upon_ping_timeout(
    pod: Service,
) -> None:
    """Closed once the first ping goes unanswered: after pingInterval + pingTimeout, and well
    before connectTimeout would close it."""
    started = time.monotonic()
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    await closed(socket)
    elapsed = time.monotonic() - started
    assert (PING_INTERVAL_MS + PING_TIMEOUT_MS) / 1000 <= elapsed < CONNECT_TIMEOUT_MS / 1000


# -- Engine.IO protocol: close ---------------------------------------------------------------------
async def test_engineio_close_polling_should_forcefully_close_the_session(
    pod: Service, http: httpx.AsyncClient
) -> None:
    """A close packet posted while a poll is pending: the poll ends with a noop, the session
    with it."""
    held = await Http1.open(pod.port)
    try:
        await held.send("GET", eio(EIO="4", transport="polling"))
        status, body = await held.response()
        assert status == 200
        sid = orjson.loads(body[1:])["sid"]
        await held.send("GET", eio(EIO="4", transport="polling", sid=sid))
        # A round trip on another connection: by its answer the pod has read the poll above.
        assert (await http.get("/healthz")).status_code == 200
        push = await http.post(eio(EIO="4", transport="polling", sid=sid), content=b"1")
        assert push.status_code == 200
        assert await held.response() == (200, b"6")
    finally:
        await held.close()
    poll = await http.get(eio(EIO="4", transport="polling", sid=sid))
    assert poll.status_code == 400


async def test_engineio_close_websocket_should_forcefully_close_the_session(pod: Service) -> None:
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    await receive(socket)  # handshake
    await socket.send("1")
    await closed(socket)


# -- Engine.IO protocol: upgrade -------------------------------------------------------------------
async def test_engineio_upgrade_should_successfully_upgrade_from_polling_to_websocket(
    pod: Service, http: httpx.AsyncClient
) -> None:
    sid = await open_polling(http)
    socket = await connect(ws_url(pod, EIO="4", transport="websocket", sid=sid))
    try:
        await socket.send("2probe")
        assert await receive(socket) == "3probe"
        await socket.send("5")
        assert await receive(socket) == "2"  # the session's heartbeat now runs on the websocket
    finally:
        await socket.close()


async def test_engineio_upgrade_should_ignore_http_requests_with_same_sid_after_upgrade(
    pod: Service, http: httpx.AsyncClient
) -> None:
    sid = await open_polling(http)
    socket = await connect(ws_url(pod, EIO="4", transport="websocket", sid=sid))
    try:
        await upgrade(socket)
        poll = await http.get(eio(EIO="4", transport="polling", sid=sid))
        assert poll.status_code == 400
    finally:
        await socket.close()


async def test_engineio_upgrade_should_ignore_websocket_connection_with_same_sid_after_upgrade(
    pod: Service, http: httpx.AsyncClient
) -> None:
    """The second websocket's handshake is accepted, then it is closed; the session lives on."""
    sid = await open_polling(http)
    socket = await connect(ws_url(pod, EIO="4", transport="websocket", sid=sid))
    try:
        await upgrade(socket)
        second = await connect(ws_url(pod, EIO="4", transport="websocket", sid=sid))
        await closed(second)
        messages = [await receive(socket) for _ in range(2)]
        assert messages[0] == "3probe" and messages[1] == "2"
    finally:
        await socket.close()


# -- Socket.IO protocol: connect -------------------------------------------------------------------
async def test_socketio_connect_should_disallow_connection_to_an_unknown_namespace(
    pod: Service,
) -> None:
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    try:
        await receive(socket)  # Engine.IO handshake
        await socket.send("40/random")
        assert await receive(socket) == '44/random,{"message":"Invalid namespace"}'
    finally:
        await socket.close()


async def test_socketio_connect_should_disallow_connection_with_an_invalid_handshake(
    pod: Service,
) -> None:
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    await receive(socket)  # Engine.IO handshake
    await socket.send("4abc")
    await closed(socket)


async def test_socketio_connect_should_close_the_connection_if_no_handshake_is_received(
    pod: Service,
) -> None:
    """Pings are answered here, so only connectTimeout can be what closes the connection."""
    started = time.monotonic()
    socket = await connect(ws_url(pod, EIO="4", transport="websocket"))
    await receive(socket)  # Engine.IO handshake
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(DEADLINE_S):
            async for message in socket:
                if message == "2":
                    await socket.send("3")
    await closed(socket)
    assert time.monotonic() - started >= CONNECT_TIMEOUT_MS / 1000
