"""Publisher keys, client tokens, the handshake, refresh, demo tokens and every limit."""

from __future__ import annotations

import asyncio
import time

import httpx
import jwt
import pytest
import websockets

from tests.integration.conftest import Secure
from tests.support import TOKEN_SECRET, WsClient

KEY = {"Authorization": "Bearer key-main"}


@pytest.fixture
async def sapi(secure: Secure):
    async with httpx.AsyncClient(base_url=secure.api.url, timeout=15) as client:
        yield client


async def handshake_status(url: str, **kwargs) -> int:
    try:
        async with websockets.connect(url, open_timeout=10, **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


# -- the publish API -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "key-main"},
     {"Authorization": "Basic a2V5LW1haW4="}, {"Authorization": "Bearer  x y"}],
)  # fmt: skip
async def test_publishing_needs_a_credential(sapi, headers):
    response = await sapi.post("/v1/channels/room:1/messages", json={"data": 1}, headers=headers)
    assert response.status_code == 401 and "detail" in response.json()
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_publisher_key_publishes_anywhere_and_frames_have_no_sub(secure, sapi):
    token = secure.token(channels=["room:*"])
    client = await WsClient.connect(secure.ws_url(token))
    await client.subscribe("room:key")
    response = await sapi.post("/v1/channels/room:key/messages", json={"data": 1}, headers=KEY)
    assert response.status_code == 202
    frame = await client.next("message")
    assert "sub" not in frame


async def test_a_token_publishes_only_to_its_publish_channels_and_carries_sub(secure, sapi):
    token = secure.token("bob", channels=["room:*"], publish=["room:1", "chat:*"])
    listener = await WsClient.connect(secure.ws_url(secure.token("ann")))
    await listener.subscribe("room:1")
    auth = {"Authorization": f"Bearer {token}"}
    ok = await sapi.post("/v1/channels/room:1/messages", json={"data": "hi"}, headers=auth)
    assert ok.status_code == 202
    frame = await listener.next("message")
    assert frame["sub"] == "bob" and frame["id"] == ok.json()["id"]
    denied = await sapi.post("/v1/channels/room:2/messages", json={"data": 1}, headers=auth)
    assert denied.status_code == 403
    batch = await sapi.post(
        "/v1/messages",
        json={"messages": [{"channel": "chat:x", "data": 1}, {"channel": "room:2", "data": 2}]},
        headers=auth,
    )
    assert batch.status_code == 403  # all or nothing


@pytest.mark.parametrize("kind", ["expired", "foreign", "no_exp", "garbage", "alg_none"])
async def test_bad_tokens_are_401_on_the_api(secure, sapi, kind):
    token = bad_token(kind)
    response = await sapi.post(
        "/v1/channels/room:1/messages",
        json={"data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401


def bad_token(kind: str) -> str:
    claims = {
        "sub": "eve",
        "channels": ["room:*"],
        "publish": ["room:*"],
        "exp": int(time.time()) + 600,
    }
    if kind == "expired":
        return jwt.encode({**claims, "exp": int(time.time()) - 5}, TOKEN_SECRET, algorithm="HS256")
    if kind == "foreign":
        return jwt.encode(claims, "another-secret-of-at-least-32-bytes!", algorithm="HS256")
    if kind == "no_exp":
        return jwt.encode(
            {k: v for k, v in claims.items() if k != "exp"}, TOKEN_SECRET, algorithm="HS256"
        )
    if kind == "alg_none":
        return jwt.encode(claims, None, algorithm="none")
    return "not.a.token"


async def test_minting_tokens(secure, sapi):
    body = {"sub": "user-1", "channels": ["room:1", "room:*"], "publish": ["room:1"], "ttl": 60}
    response = await sapi.post(
        "/v1/tokens", json=body, headers={"Authorization": "Bearer key-mint"}
    )
    assert response.status_code == 200
    minted = response.json()
    claims = jwt.decode(minted["token"], TOKEN_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "user-1" and claims["publish"] == ["room:1"]
    assert claims["exp"] == minted["expires_at"] and minted["expires_at"] - time.time() <= 61
    token_auth = {"Authorization": f"Bearer {minted['token']}"}
    assert (await sapi.post("/v1/tokens", json=body, headers=token_auth)).status_code == 403
    too_long = {**body, "ttl": 3601}
    assert (await sapi.post("/v1/tokens", json=too_long, headers=KEY)).status_code == 422
    bad_pattern = {**body, "channels": ["room*x"]}
    assert (await sapi.post("/v1/tokens", json=bad_pattern, headers=KEY)).status_code == 422
    assert (await sapi.post("/v1/tokens", json=body)).status_code == 401


async def test_minting_is_403_when_no_publisher_keys_exist(api):
    """The open test cluster has no API_KEYS: /v1/tokens is refused."""
    body = {"sub": "u", "channels": ["a"], "ttl": 5}
    assert (await api.post("/v1/tokens", json=body)).status_code == 403


async def test_publish_rate_limit_is_429_with_retry_after(secure, sapi):
    auth = {"Authorization": "Bearer key-rate"}
    items = [{"channel": "rate:1", "data": n} for n in range(40)]
    assert (
        await sapi.post("/v1/messages", json={"messages": items}, headers=auth)
    ).status_code == 202
    # The burst is spent; at 20/s a token comes back every 50 ms, so a single request on a slow
    # machine may find one. Ten at once cannot all.
    answers = await asyncio.gather(
        *(
            sapi.post("/v1/channels/rate:1/messages", json={"data": 1}, headers=auth)
            for _ in range(10)
        )
    )
    codes = [answer.status_code for answer in answers]
    assert set(codes) <= {202, 429} and 429 in codes, codes
    limited = next(answer for answer in answers if answer.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    other = await sapi.post("/v1/channels/rate:1/messages", json={"data": 1}, headers=KEY)
    assert other.status_code == 202  # per credential
    metrics = (await sapi.get("/metrics")).text
    assert f"pubsock_rate_limited_total {float(codes.count(429))}" in metrics


async def test_cors_for_allowed_origins_only(sapi):
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    good = await sapi.options(
        "/v1/messages", headers={"Origin": "https://good.example", **preflight}
    )
    assert good.headers.get("access-control-allow-origin") == "https://good.example"
    bad = await sapi.options(
        "/v1/messages", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in bad.headers


# -- the websocket handshake -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["missing", "expired", "foreign", "no_exp", "garbage", "alg_none"])
async def test_bad_or_missing_tokens_are_refused_with_401(secure, kind):
    token = None if kind == "missing" else bad_token(kind)
    assert await handshake_status(secure.ws_url(token)) == 401


async def test_origins_outside_allowed_origins_are_403(secure):
    url = secure.ws_url(secure.token())
    assert await handshake_status(url, origin="https://evil.example") == 403
    assert await handshake_status(url, origin="https://good.example") == 101
    assert await handshake_status(url) == 101  # no Origin: a backend, not a browser


async def test_subscribing_outside_the_token_is_forbidden_and_the_connection_lives(secure):
    client = await WsClient.connect(secure.ws_url(secure.token(channels=["room:*", "exact"])))
    for channel in ("other:1", "roomx", "exac"):
        await client.send({"type": "subscribe", "channel": channel})
        error = await client.next("error")
        assert error["code"] == "forbidden" and error["channel"] == channel
    await client.send({"type": "presence", "channel": "other:1"})
    assert (await client.next("error"))["code"] == "forbidden"
    assert (await client.subscribe("exact"))["channel"] == "exact"
    assert (await client.subscribe("room:9"))["channel"] == "room:9"


async def test_subscription_limit(secure):
    client = await WsClient.connect(secure.ws_url(secure.token()))
    for n in range(3):
        await client.subscribe(f"room:{n}")
    await client.send({"type": "subscribe", "channel": "room:3"})
    assert (await client.next("error"))["code"] == "limit"
    await client.subscribe("room:1")  # re-subscribing an existing channel is not a new one


async def test_connection_limit_refuses_with_503(secure):
    token = secure.token()
    clients = []
    status = 101
    for _ in range(13):
        try:
            clients.append(await WsClient.connect(secure.ws_url(token)))
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            break
    assert status == 503 and len(clients) <= 12
    for client in clients:
        await client.close()


async def test_flooding_gets_a_limit_error_then_1013(secure):
    client = await WsClient.connect(secure.ws_url(secure.token()))
    for _ in range(12):
        await client.send({"type": "ping"})
    frames = [await client.next() for _ in range(11)]
    assert [f["type"] for f in frames].count("pong") == 10
    assert any(f["type"] == "error" and f["code"] == "limit" for f in frames)
    for _ in range(30):
        try:
            await client.send({"type": "ping"})
        except websockets.ConnectionClosed:
            break
    assert await client.wait_closed() == 1013


async def test_token_expiry_closes_with_1008_at_the_expiry(secure):
    client = await WsClient.connect(secure.ws_url(secure.token(ttl_s=2)))
    await client.subscribe("room:1")
    started = time.monotonic()
    assert await client.wait_closed(10) == 1008
    assert time.monotonic() - started < 5  # at the expiry, without any message arriving


async def test_refresh_extends_and_narrows_the_connection(secure, sapi):
    client = await WsClient.connect(secure.ws_url(secure.token("ann", ttl_s=2)))
    await client.subscribe("room:1")
    await client.subscribe("room:2")
    fresh = secure.token("ann", channels=["room:1"], ttl_s=600)
    await client.send({"type": "refresh", "token": fresh})
    unsubscribed = await client.next("unsubscribed")
    assert unsubscribed["channel"] == "room:2"
    refreshed = await client.next("refreshed")
    assert refreshed["expires_at"] == jwt.decode(fresh, TOKEN_SECRET, algorithms=["HS256"])["exp"]
    for token in (secure.token("mallory"), bad_token("foreign")):
        await client.send({"type": "refresh", "token": token})
        assert (await client.next("error"))["code"] == "forbidden"
    with pytest.raises(TimeoutError):  # the old 2 s expiry no longer applies
        await client.wait_closed(3)
    response = await sapi.post("/v1/channels/room:1/messages", json={"data": "still"}, headers=KEY)
    assert (await client.next("message"))["id"] == response.json()["id"]


async def test_demo_tokens(secure):
    async with httpx.AsyncClient(base_url=secure.socket.url) as http:
        response = await http.post("/demo/token", json={"name": "Ada L"})
        assert response.status_code == 200
        token = response.json()["token"]
        claims = jwt.decode(token, TOKEN_SECRET, algorithms=["HS256"])
        assert claims["sub"] == "Ada L" and claims["channels"] == ["demo:*"]
        assert claims["publish"] == ["demo:*"] and claims["exp"] - time.time() <= 61
        for body in ({"name": ""}, {"name": "x" * 41}, {"name": "<script>"}, {}, [1]):
            assert (await http.post("/demo/token", json=body)).status_code == 422
        assert (await http.post("/demo/token", content=b"nope")).status_code == 422
        assert (await http.get("/demo/token")).status_code == 405
    client = await WsClient.connect(secure.ws_url(token))
    await client.subscribe("demo:lobby")
    await client.send({"type": "subscribe", "channel": "room:1"})
    assert (await client.next("error"))["code"] == "forbidden"


async def test_demo_tokens_are_off_by_default(cluster):
    async with httpx.AsyncClient(base_url=cluster.sockets[0].url) as http:
        assert (await http.post("/demo/token", json={"name": "a"})).status_code in (404, 405)


async def test_tokens_never_appear_in_logs(secure):
    token = secure.token("log-check")
    client = await WsClient.connect(secure.ws_url(token))
    await client.subscribe("room:1")
    await handshake_status(secure.ws_url(token + "x"))
    await client.close()
    signature = token.rsplit(".", 1)[1]  # unique to this token, unlike its header
    for service in (secure.socket, secure.api):
        assert signature not in service.process.log_path.read_text()
