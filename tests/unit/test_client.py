"""The Python client (services.client) against a small in-test fake of a socket pod.

The fake speaks the contract's frames (subscribed with recovery from a tiny history, message,
pong with the pod name, refreshed, presence, errors) and closes with any code; the publish API is
an httpx MockTransport. No Pub/Sub, no real services: every test runs in well under a second.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import websockets
from websockets.asyncio.server import ServerConnection, serve

from services.client import (
    PublishError,
    PubsockClient,
    PubsockError,
    decode_jwt_payload,
    full_jitter,
    token_expiry,
)
from tests.support import eventually

FAST = {"backoff_base_s": 0.02, "backoff_max_s": 0.2, "first_connect_timeout_s": 3.0}


def make_token(sub: str = "ada", ttl_s: float = 3600, **claims: Any) -> str:
    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    payload = {"sub": sub, "exp": time.time() + ttl_s, **claims}
    return f"{b64({'alg': 'HS256', 'typ': 'JWT'})}.{b64(payload)}.sig"


class FakeConnection:
    def __init__(self, ws: ServerConnection, token: str | None) -> None:
        self.ws = ws
        self.token = token
        self.sub = (decode_jwt_payload(token) or {}).get("sub")
        self.frames: list[dict[str, Any]] = []
        self.channels: set[str] = set()

    def sent(self, kind: str) -> list[dict[str, Any]]:
        return [frame for frame in self.frames if frame["type"] == kind]


class FakePod:
    """A socket pod's wire behaviour, in miniature."""

    def __init__(self, pod: str = "fake-pod") -> None:
        self.pod = pod
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.connections: list[FakeConnection] = []
        self.handshake_tokens: list[str | None] = []
        self.refuse_status: int | None = None
        self.forgotten: set[str] = set()  # positions answered with recovered: false
        self.forbidden: set[str] = set()  # channels answered with a forbidden error
        self.cut_after_subscribed = False  # close with 1012 right after a rewind's answer
        self.warmups = 0
        self._counter = 0

    async def __aenter__(self) -> FakePod:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._process_request
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def live(self) -> list[FakeConnection]:
        return [c for c in self.connections if c.ws.state is websockets.protocol.State.OPEN]

    def _process_request(self, connection: ServerConnection, request: Any) -> Any:
        parts = urlsplit(request.path)
        if parts.path == "/config.json":
            self.warmups += 1
            response = connection.respond(200, json.dumps({"api_base": "", "pod": self.pod}))
            response.headers["X-Pubsock-Pod"] = self.pod
            response.headers["Set-Cookie"] = f"lb={self.pod}; Path=/"
            return response
        token = parse_qs(parts.query).get("token", [None])[0]
        self.handshake_tokens.append(token)
        if self.refuse_status is not None:
            return connection.respond(self.refuse_status, "refused\n")
        exp = token_expiry(token)
        if exp is not None and exp < time.time():
            return connection.respond(401, "token expired\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        token = parse_qs(urlsplit(ws.request.path).query).get("token", [None])[0]
        conn = FakeConnection(ws, token)
        conn.cookie = ws.request.headers.get("Cookie")  # type: ignore[attr-defined]
        self.connections.append(conn)
        try:
            async for raw in ws:
                frame = json.loads(raw)
                conn.frames.append(frame)
                await self._answer(conn, frame)
        except websockets.ConnectionClosed:
            pass

    async def _answer(self, conn: FakeConnection, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        channel = frame.get("channel")
        if kind == "subscribe":
            if channel in self.forbidden:
                await self.send(
                    conn,
                    {"type": "error", "code": "forbidden", "message": "no", "channel": channel},
                )
                return
            entries = self.history.get(channel, [])
            position = entries[-1]["id"] if entries else f"@{int(time.time() * 1000)}"
            answer: dict[str, Any] = {
                "type": "subscribed",
                "channel": channel,
                "position": position,
            }
            replay: list[dict[str, Any]] = []
            since = frame.get("since")
            if since is not None:
                ids = [e["id"] for e in entries]
                if since in self.forgotten or (since not in ids and not since.startswith("@")):
                    answer["recovered"] = False
                else:
                    answer["recovered"] = True
                    replay = entries[ids.index(since) + 1 :] if since in ids else list(entries)
            rewind = frame.get("rewind")
            if rewind and answer.get("recovered") is not True and channel not in conn.channels:
                replay = entries[-rewind["count"] :]
                answer["rewound"] = {"count": len(replay), "complete": True}
            conn.channels.add(channel)
            await self.send(conn, answer)
            if "rewound" in answer and self.cut_after_subscribed:
                self.cut_after_subscribed = False
                await conn.ws.close(1012)
                return
            for entry in replay:
                await self.send(conn, entry)
        elif kind == "unsubscribe":
            conn.channels.discard(channel)
            await self.send(conn, {"type": "unsubscribed", "channel": channel})
        elif kind == "ping":
            await self.send(conn, {"type": "pong", "pod": self.pod})
        elif kind == "refresh":
            claims = decode_jwt_payload(frame["token"]) or {}
            if claims.get("sub") != conn.sub:
                await self.send(
                    conn, {"type": "error", "code": "forbidden", "message": "another sub"}
                )
            else:
                conn.token = frame["token"]
                await self.send(conn, {"type": "refreshed", "expires_at": int(claims["exp"])})
        elif kind == "presence":
            here = [c for c in self.live if channel in c.channels]
            members = sorted({c.sub or "anonymous" for c in here})
            await self.send(
                conn,
                {
                    "type": "presence",
                    "channel": channel,
                    "count": len(here),
                    "members": [{"sub": s} for s in members],
                },
            )

    async def send(self, conn: FakeConnection, frame: dict[str, Any]) -> None:
        await conn.ws.send(json.dumps(frame))

    async def publish(
        self, channel: str, data: Any = None, id: str | None = None
    ) -> dict[str, Any]:
        self._counter += 1
        message = {
            "type": "message",
            "channel": channel,
            "id": id or f"m{self._counter:04d}",
            "data": data,
            "ts": int(time.time() * 1000),
            "sub": "publisher",
        }
        self.history.setdefault(channel, []).append(message)
        for conn in self.live:
            if channel in conn.channels:
                await self.send(conn, message)
        return message

    async def close_all(self, code: int, reason: str = "") -> None:
        for conn in self.live:
            await conn.ws.close(code, reason)

    async def wait_connections(self, count: int) -> FakeConnection:
        await eventually(
            lambda: len(self.connections) >= count and self.connections[count - 1].frames
        )
        return self.connections[count - 1]


class Recorder:
    """Records messages and every event of a client."""

    def __init__(self, client: PubsockClient) -> None:
        self.messages: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        for name in sorted(client._listeners):
            client.on(name, lambda detail, name=name: self.events.append((name, detail)))

    def handler(self, frame: dict[str, Any]) -> None:
        self.messages.append(frame)

    def ids(self) -> list[str]:
        return [m["id"] for m in self.messages]

    def of(self, name: str) -> list[dict[str, Any]]:
        return [detail for event, detail in self.events if event == name]


@pytest.fixture
async def pod():
    async with FakePod() as fake:
        yield fake


# -- pure functions -------------------------------------------------------------------------------


def test_full_jitter_is_uniform_below_a_doubling_cap():
    caps = [0.5, 1, 2, 4, 8, 16, 30, 30]
    for attempt, cap in enumerate(caps):
        assert full_jitter(attempt, 0.5, 30, lambda: 0.0) == 0
        assert full_jitter(attempt, 0.5, 30, lambda: 0.5) == pytest.approx(cap / 2)
        assert full_jitter(attempt, 0.5, 30, lambda: 0.9999) < cap
    assert full_jitter(10_000, 0.5, 30, lambda: 0.5) == 15


def test_token_payload_and_expiry():
    token = make_token("Zoë", ttl_s=100)
    assert decode_jwt_payload(token)["sub"] == "Zoë"
    assert token_expiry(token) == pytest.approx(time.time() + 100, abs=2)
    assert decode_jwt_payload("nope") is None and token_expiry(None) is None


# -- connection, subscribe, delivery --------------------------------------------------------------


async def test_subscribe_delivers_and_names_the_pod(pod):
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        subscribed = await client.subscribe("room:1", rec.handler)
        assert subscribed["type"] == "subscribed" and subscribed["position"].startswith("@")
        await pod.publish("room:1", {"text": "hi"})
        await eventually(lambda: rec.messages)
        assert rec.messages[0]["data"] == {"text": "hi"} and rec.messages[0]["sub"] == "publisher"
        await eventually(lambda: len(rec.of("pod")) == 2)
    assert rec.of("pod") == [{"pod": "fake-pod", "via": "http"}, {"pod": "fake-pod", "via": "ws"}]
    assert pod.warmups == 1
    assert pod.connections[0].cookie == "lb=fake-pod"  # the warm-up's affinity cookie is sent
    assert [e["state"] for e in rec.of("state")] == ["connecting", "open", "closed"]


async def test_1012_reconnects_at_once_and_resumes_without_gap_or_duplicate(pod):
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler, presence=True)
        await pod.publish("room:1", 1)
        await eventually(lambda: len(rec.messages) == 1)
        await pod.close_all(1012, "draining")
        await pod.publish("room:1", 2)  # while away: history only
        second = await pod.wait_connections(2)
        await eventually(lambda: len(rec.messages) == 2)
        await pod.publish("room:1", 3)
        await eventually(lambda: len(rec.messages) == 3)
    assert rec.ids() == ["m0001", "m0002", "m0003"]
    assert second.sent("subscribe") == [
        {"type": "subscribe", "channel": "room:1", "since": "m0001", "presence": True}
    ]
    assert rec.of("reconnecting")[0] == {
        "code": 1012,
        "reason": "draining",
        "delay": 0.0,
        "attempt": 0,
    }
    assert rec.of("recovered") == [{"channel": "room:1", "since": "m0001", "position": "m0002"}]
    assert rec.of("gap") == []


async def test_1013_backs_off_with_full_jitter_growing(pod):
    client = PubsockClient(pod.url, random=lambda: 0.75, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler)
        for n in range(2, 5):
            await pod.close_all(1013, "overloaded")
            await pod.wait_connections(n)
    delays = [e["delay"] for e in rec.of("reconnecting")]
    assert [e["code"] for e in rec.of("reconnecting")] == [1013, 1013, 1013]
    assert delays == pytest.approx([0.015, 0.03, 0.06])  # 0.75 x 0.02, 0.04, 0.08


async def test_a_second_1012_before_the_connection_is_stable_backs_off(pod):
    client = PubsockClient(pod.url, random=lambda: 0.5, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler)
        await pod.close_all(1012)
        await pod.wait_connections(2)
        await pod.close_all(1012)
        await pod.wait_connections(3)
    assert [e["delay"] for e in rec.of("reconnecting")] == pytest.approx([0.0, 0.01])


async def test_resubscribes_with_the_subscribed_position_when_no_message_came(pod):
    client = PubsockClient(pod.url, **FAST)
    async with client:
        first = await client.subscribe("room:1", lambda m: None)
        await pod.close_all(1012)
        second = await pod.wait_connections(2)
    assert second.sent("subscribe")[0]["since"] == first["position"]


async def test_recovered_false_is_a_gap_and_resumes_from_the_new_position(pod):
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler)
        await pod.publish("room:1", 1)
        await eventually(lambda: rec.messages)
        pod.forgotten.add("m0001")
        await pod.close_all(1013)
        await pod.wait_connections(2)
        await eventually(lambda: rec.of("gap"))
        await pod.publish("room:1", 2)
        await eventually(lambda: len(rec.messages) == 2)
    assert rec.of("gap") == [{"channel": "room:1", "since": "m0001", "position": "m0001"}]
    assert rec.ids() == ["m0001", "m0002"]


async def test_rewind_hands_the_last_messages_then_live_ones(pod):
    for n in range(3):
        await pod.publish("room:1", n)
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        subscribed = await client.subscribe("room:1", rec.handler, rewind={"count": 2})
        assert subscribed["rewound"] == {"count": 2, "complete": True}
        await eventually(lambda: len(rec.messages) == 2)
        await pod.publish("room:1", 3)
        await eventually(lambda: len(rec.messages) == 3)
        assert client.position("room:1") == "m0004"
    assert rec.ids() == ["m0002", "m0003", "m0004"]
    assert pod.connections[0].sent("subscribe") == [
        {"type": "subscribe", "channel": "room:1", "rewind": {"count": 2}}
    ]


async def test_rewind_is_asked_again_on_every_resubscribe_and_served_only_after_a_gap(pod):
    """Recovered: the replay alone. Not recovered: the rewind again, and the handler gets only
    what it had not seen (ids are remembered)."""
    for n in range(2):
        await pod.publish("room:1", n)
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler, rewind={"count": 5})
        await eventually(lambda: len(rec.messages) == 2)
        await pod.close_all(1012)
        await pod.publish("room:1", 2)  # while away
        second = await pod.wait_connections(2)
        await eventually(lambda: len(rec.messages) == 3)
        pod.forgotten.add("m0003")
        await pod.close_all(1013)
        await pod.publish("room:1", 3)  # while away, and this pod cannot resume after m0003
        third = await pod.wait_connections(3)
        await eventually(lambda: len(rec.messages) == 4)
        await eventually(lambda: client.position("room:1") == "m0004")
    assert rec.ids() == ["m0001", "m0002", "m0003", "m0004"]
    assert second.sent("subscribe")[0] == {
        "type": "subscribe", "channel": "room:1", "since": "m0002", "rewind": {"count": 5}
    }  # fmt: skip
    assert third.sent("subscribe")[0]["since"] == "m0003"
    assert [e["channel"] for e in rec.of("gap")] == ["room:1"]
    rewound = [e.get("rewound") for e in rec.of("subscribed")]
    assert rewound == [{"count": 2, "complete": True}, None, {"count": 4, "complete": True}]


async def test_a_connection_lost_before_the_rewind_arrived_asks_for_it_again(pod):
    """The `subscribed` frame's position is not adopted until the rewind is in: the next
    subscribe has no `since` (it would skip the rewind) and asks for the rewind again."""
    for n in range(3):
        await pod.publish("room:1", n)
    pod.cut_after_subscribed = True
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler, rewind={"count": 3})
        second = await pod.wait_connections(2)
        await eventually(lambda: len(rec.messages) == 3)
    assert second.sent("subscribe")[0] == {
        "type": "subscribe", "channel": "room:1", "rewind": {"count": 3}
    }  # fmt: skip
    assert rec.ids() == ["m0001", "m0002", "m0003"]


async def test_duplicates_are_dropped_and_order_kept(pod):
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", rec.handler)
        first = await pod.publish("room:1", 1)
        await pod.send(pod.live[0], first)  # a redelivery
        await pod.publish("room:1", 2)
        await eventually(lambda: len(rec.messages) == 2)
        # The next pod replays from an older position: the overlap is dropped.
        pod.history["room:1"].insert(0, {**first, "id": "m0000"})
        client._subs["room:1"].position = "m0000"
        await pod.close_all(1012)
        await pod.wait_connections(2)
        await pod.publish("room:1", 3)
        await eventually(lambda: len(rec.messages) == 3)
    assert rec.ids() == ["m0001", "m0002", "m0003"]


async def test_async_handlers_are_awaited_in_order_and_errors_reported(pod):
    seen: list[str] = []

    async def handler(frame):
        await asyncio.sleep(0.01 if frame["id"] == "m0001" else 0)
        seen.append(frame["id"])
        if frame["id"] == "m0002":
            raise RuntimeError("boom")

    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("room:1", handler)
        for n in range(3):
            await pod.publish("room:1", n)
        await eventually(lambda: len(seen) == 3)
    assert seen == ["m0001", "m0002", "m0003"]
    assert rec.of("error")[0]["code"] == "handler"


async def test_a_refused_subscribe_raises_and_is_dropped(pod):
    pod.forbidden.add("secret:1")
    async with PubsockClient(pod.url, **FAST) as client:
        with pytest.raises(PubsockError) as info:
            await client.subscribe("secret:1", lambda m: None)
        assert info.value.code == "forbidden" and client.channels == []


# -- tokens -------------------------------------------------------------------------------------


async def test_1008_fetches_a_new_token_before_reconnecting(pod):
    issued: list[str] = []

    def provider() -> str:
        issued.append(make_token("ada", n=len(issued)))
        return issued[-1]

    client = PubsockClient(pod.url, token_provider=provider, **FAST)
    async with client:
        await client.subscribe("room:1", lambda m: None)
        await pod.close_all(1008, "token expired")
        await pod.wait_connections(2)
        await pod.close_all(1013)  # a token that is still good is kept
        await pod.wait_connections(3)
    assert len(issued) == 2
    assert pod.handshake_tokens == [issued[0], issued[1], issued[1]]


async def test_a_refused_handshake_fetches_a_new_token(pod):
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            pod.refuse_status = None
        return make_token("ada", n=calls)

    pod.refuse_status = 401
    client = PubsockClient(pod.url, token_provider=provider, **FAST)
    rec = Recorder(client)
    async with client:
        assert client.state == "open"
    assert calls == 2
    assert rec.of("reconnecting")[0]["reason"] == "handshake refused: HTTP 401"


async def test_a_refresh_is_sent_before_expiry_and_refreshed_is_handled(pod):
    tokens = [make_token("ada", ttl_s=0.6), make_token("ada", ttl_s=3600)]
    client = PubsockClient(
        pod.url,
        token=tokens[0],
        token_provider=lambda: tokens[1],
        refresh_margin_s=0.2,  # 0.6 s left: kept at connect, refreshed 0.2 s before expiry
        min_refresh_interval_s=0.05,
        **FAST,
    )
    rec = Recorder(client)
    async with client:
        assert client.token == tokens[0]
        await eventually(lambda: rec.of("refreshed"))
        assert client.token == tokens[1]
        assert pod.connections[0].sent("refresh") == [{"type": "refresh", "token": tokens[1]}]
    assert rec.of("refreshed")[0]["expires_at"] == int(token_expiry(tokens[1]))
    assert len(pod.connections) == 1


async def test_a_refused_refresh_keeps_the_old_token(pod):
    mine, other = make_token("ada", ttl_s=0.6), make_token("eve", ttl_s=3600)
    client = PubsockClient(
        pod.url,
        token=mine,
        token_provider=lambda: other,
        refresh_margin_s=0.2,
        min_refresh_interval_s=0.05,
        **FAST,
    )
    rec = Recorder(client)
    async with client:
        await eventually(lambda: rec.of("error"))
        assert client.token == mine
    assert rec.of("error")[0]["code"] == "forbidden" and rec.of("refreshed") == []


# -- presence -----------------------------------------------------------------------------------


async def test_presence_query_and_join_leave_events(pod):
    client = PubsockClient(pod.url, token=make_token("ada"), **FAST)
    rec = Recorder(client)
    async with client:
        await client.subscribe("demo:lobby", rec.handler, presence=True)
        answer = await client.presence("demo:lobby")
        assert answer == {
            "type": "presence",
            "channel": "demo:lobby",
            "count": 1,
            "members": [{"sub": "ada"}],
        }
        conn = pod.live[0]
        await pod.send(conn, {"type": "join", "channel": "demo:lobby", "sub": "bob"})
        await pod.send(conn, {"type": "leave", "channel": "demo:lobby", "sub": "bob"})
        await pod.send(conn, {"type": "join", "channel": "demo:other", "sub": "eve"})
        await eventually(lambda: rec.of("leave"))
    assert rec.of("join") == [{"type": "join", "channel": "demo:lobby", "sub": "bob"}]
    assert rec.of("leave") == [{"type": "leave", "channel": "demo:lobby", "sub": "bob"}]
    assert rec.of("presence") == [answer]


# -- lifecycle ----------------------------------------------------------------------------------


async def test_close_stops_reconnecting(pod):
    client = PubsockClient(pod.url, **FAST)
    rec = Recorder(client)
    await client.connect()
    await client.close()
    await asyncio.sleep(0.1)  # a quiet moment: a reconnect that must not come cannot be awaited
    assert len(pod.connections) == 1 and rec.of("reconnecting") == []
    assert client.state == "closed"


async def test_first_connect_times_out_when_nothing_listens():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = PubsockClient(f"ws://127.0.0.1:{port}/ws", **{**FAST, "first_connect_timeout_s": 0.3})
    with pytest.raises(TimeoutError):
        await client.connect()
    assert client.state == "closed"


# -- publishing ---------------------------------------------------------------------------------


def api(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


async def test_publish_retries_503_with_the_same_id():
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        body = json.loads(request.content)
        if len(requests) < 3:
            return httpx.Response(
                503, json={"detail": "broker", "id": body["id"]}, headers={"Retry-After": "0"}
            )
        return httpx.Response(202, json={"id": body["id"], "channel": "room:1"})

    token = make_token("ada")
    client = PubsockClient("ws://api.test/ws", token=token, http_client=api(handler), **FAST)
    result = await client.publish("room:1", {"text": "hi"})
    bodies = [json.loads(r.content) for r in requests]
    assert len({b["id"] for b in bodies}) == 1 and result["id"] == bodies[0]["id"]
    assert bodies[0]["data"] == {"text": "hi"}
    assert str(requests[0].url) == "http://api.test/v1/channels/room:1/messages"
    assert requests[0].headers["Authorization"] == f"Bearer {token}"


async def test_publish_network_errors_are_retried_with_the_same_id():
    ids: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ids.append(json.loads(request.content)["id"])
        if len(ids) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(202, json={"id": ids[-1]})

    client = PubsockClient("ws://api.test/ws", http_client=api(handler), **FAST)
    assert (await client.publish("room:1", 1, id="fixed-1")) == {
        "id": "fixed-1",
        "channel": "room:1",
    }
    assert ids == ["fixed-1", "fixed-1"]


async def test_publish_4xx_raises_without_retry():
    for status in (403, 413, 422, 429):
        calls = 0

        def handler(request: httpx.Request, status=status) -> httpx.Response:
            nonlocal calls
            calls += 1
            return httpx.Response(status, json={"detail": "no"}, headers={"Retry-After": "3"})

        client = PubsockClient("ws://api.test/ws", http_client=api(handler), api_key="k", **FAST)
        with pytest.raises(PublishError) as info:
            await client.publish("room:1", 1, id="x1")
        assert (info.value.status, info.value.detail, info.value.id) == (status, "no", "x1")
        assert info.value.retry_after_s == 3 and calls == 1


async def test_publish_503_that_persists_raises_after_the_retries():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "broker", "id": "m-1"})

    client = PubsockClient("ws://api.test/ws", http_client=api(handler), publish_retries=2, **FAST)
    with pytest.raises(PublishError) as info:
        await client.publish("room:1", 1, id="m-1")
    assert info.value.status == 503 and info.value.id == "m-1"


async def test_publish_401_fetches_a_new_token_once():
    fresh = make_token("ada", n=2)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.headers["Authorization"] == f"Bearer {fresh}":
            return httpx.Response(202, json={"id": "m-1"})
        return httpx.Response(401, json={"detail": "expired"})

    client = PubsockClient(
        "ws://api.test/ws",
        token=make_token("ada"),
        token_provider=lambda: fresh,
        http_client=api(handler),
        **FAST,
    )
    assert (await client.publish("room:1", 1))["id"] == "m-1"
    assert client.token == fresh


async def test_publish_batch_retries_with_the_ids_of_the_503():
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        bodies.append(body)
        ids = [m["id"] for m in body["messages"]]
        if len(bodies) == 1:
            return httpx.Response(503, json={"detail": "broker", "ids": ids})
        return httpx.Response(202, json={"ids": ids})

    client = PubsockClient("ws://api.test/ws", http_client=api(handler), api_key="key", **FAST)
    ids = await client.publish_batch(
        [{"channel": "room:1", "data": 1}, {"channel": "room:2", "data": 2, "id": "mine"}]
    )
    assert ids[1] == "mine" and len(set(ids)) == 2
    assert bodies[0] == bodies[1]
    assert str(bodies[0]["messages"][0]["id"]) == ids[0]


async def test_close_while_connecting_ends_closed():
    """close() cancels an attempt still in its handshake: the client says closed, not
    connecting (the first-connect timeout above hit this under load)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()  # accepts the TCP connection, never answers the handshake
    try:
        port = listener.getsockname()[1]
        client = PubsockClient(f"ws://127.0.0.1:{port}/ws", **FAST)
        states: list[str] = []
        client.on("state", lambda detail: states.append(detail["state"]))
        connecting = asyncio.create_task(client.connect(timeout_s=30))
        await eventually(lambda: client.state, 5, until=lambda state: state == "connecting")
        await client.close()
        connecting.cancel()
        assert client.state == "closed"
        assert states[-1] == "closed"
    finally:
        listener.close()
