"""socket.io v4 clients (the real socket.io-client, in Node) against what `make run` starts,
through its load balancer: rooms across both pods, order with native clients, auth, long-polling
and its upgrade, the affinity cookie, and connection state recovery after a pod is SIGKILLed.

The SIGKILL test is last in this file and restarts the pod it killed.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from devtools.cluster import AFFINITY_COOKIE, LocalCluster
from tests.socketio.support import SioDriver
from tests.support import Mint, WsClient, ensure_pods_up

pytestmark = pytest.mark.integration

FAST_RECONNECT = {"reconnectionDelay": 100, "reconnectionDelayMax": 300, "randomizationFactor": 0}


def lb(cluster: LocalCluster) -> str:
    assert cluster.lb is not None
    return cluster.lb.url


async def connect_on_each_pod(
    driver: SioDriver, url: str, prefix: str, pods: int, **opts: Any
) -> dict[str, str]:
    """Connects clients through the load balancer (round robin without a cookie) until every
    pod serves one; returns {pod: client name}. Extra clients are closed."""
    placed: dict[str, str] = {}
    for index in range(pods * 4):
        name = f"{prefix}{index}"
        record = await driver.connect(name, url, **opts)
        assert record["ev"] == "connect", record
        if record["pod"] in placed:
            await driver.close(name)
        else:
            placed[record["pod"]] = name
        if len(placed) == pods:
            return placed
    raise AssertionError(f"the load balancer never spread clients over {pods} pods: {placed}")


async def publish_http(api: httpx.AsyncClient, room: str, data: Any) -> str:
    response = await api.post(f"/v1/channels/{room}/messages", json={"data": data})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def test_rooms_span_pods_and_everyone_gets_one_order(
    sio_cluster: LocalCluster, driver: SioDriver, api: httpx.AsyncClient, room: str, token: Mint
) -> None:
    """Clients on both pods (websocket, and long-polling upgraded to websocket) and a native
    websocket client on the same channel get HTTP publishes and client publishes in one order."""
    url = lb(sio_cluster)
    auth = {"token": token("ann", publish=["room:*"])}
    placed = await connect_on_each_pod(
        driver, url, "ws", 2, transports=["websocket"], auth=auth, **FAST_RECONNECT
    )
    # Default transports: long-polling first, then the upgrade (the `upgrade` event below).
    upgraded = await driver.connect("up", url, auth=auth, withCredentials=True)
    assert upgraded["ev"] == "connect"
    clients = [*placed.values(), "up"]
    for name in clients:
        ack = await driver.emit(name, "join", room)
        assert ack["ok"] and ack["room"] == room, ack
    native = await WsClient.connect(
        url.replace("http", "ws") + f"/ws?token={token('nat', channels=[room])}"
    )
    try:
        await native.subscribe(room)
        sender = placed[sorted(placed)[0]]
        ids: list[str] = []
        for n in range(6):
            if n % 2 == 0:
                ids.append(await publish_http(api, room, {"n": n, "via": "http"}))
            else:
                ack = await driver.emit(sender, "publish", room, {"n": n, "via": "socket.io"})
                assert ack["ok"] and ack["room"] == room, ack
                ids.append(ack["id"])
        for name in clients:
            assert await driver.wait_messages(name, room, 6) == ids, name
        assert [m["id"] for m in await native.messages(6)] == ids
        # The event's args: data, meta (id, channel, ts, sub of a client publish), offset.
        received = driver.messages(placed[sorted(placed)[1]], room)
        first, second = received[0], received[1]
        assert first[0] == {"n": 0, "via": "http"}
        assert set(first[1]) == {"id", "channel", "ts"} and first[1]["channel"] == room
        assert second[0] == {"n": 1, "via": "socket.io"} and second[1]["sub"] == "ann"
        # The offset: room/id, and the signed room set of a client that joined after connecting
        # (`room/<join position>` while it was joined moments ago).
        assert first[2].startswith(f"{room}/{ids[0]}~{room}")
        upgrade = await driver.wait_for(
            lambda r: r["ev"] == "upgrade" and r["name"] == "up", "the upgrade to websocket"
        )
        assert upgrade["transport"] == "websocket"
        assert not any(driver.of(name, "disconnect") for name in clients)
    finally:
        await native.close()


async def test_long_polling_stays_on_its_pod_through_the_cookie(
    sio_cluster: LocalCluster, driver: SioDriver, api: httpx.AsyncClient, room: str, token: Mint
) -> None:
    """A polling-only client (with the affinity cookie, as a browser sends it) keeps its session
    over many requests through the round-robin load balancer: receives, publishes, acks."""
    url = lb(sio_cluster)
    auth = {"token": token("pol", publish=[room]), "rooms": [room]}
    record = await driver.connect(
        "poll", url, transports=["polling"], withCredentials=True, auth=auth
    )
    assert record["ev"] == "connect" and record["transport"] == "polling"
    joined = await driver.wait_for(
        lambda r: r["ev"] == "event" and r["event"] == "pubsock:joined", "pubsock:joined"
    )
    assert joined["args"][0]["room"] == room
    ids = []
    for n in range(5):
        ids.append(await publish_http(api, room, n))
        ack = await driver.emit("poll", "publish", room, {"echo": n})
        assert ack["ok"], ack
        ids.append(ack["id"])
    assert await driver.wait_messages("poll", room, 10) == ids
    assert not driver.of("poll", "disconnect")
    assert all(r["pod"] == record["pod"] for r in driver.of("poll", "event"))


async def test_unknown_sid_on_the_other_pod(sio_cluster: LocalCluster) -> None:
    """A long-polling sid is known only to its pod: another pod answers 400 "Session ID unknown"
    (the client reconnects and recovers); with the load balancer's cookie it stays put."""
    first, second = sio_cluster.sockets
    async with httpx.AsyncClient(timeout=10) as client:
        opened = await client.get(
            f"{first.url}/socket.io/", params={"EIO": 4, "transport": "polling"}
        )
        assert opened.status_code == 200 and opened.text.startswith("0{")
        assert opened.headers["x-pubsock-pod"] == first.env["POD_NAME"]  # not in the open packet
        sid = orjson.loads(opened.content[1:])["sid"]
        other = await client.get(
            f"{second.url}/socket.io/", params={"EIO": 4, "transport": "polling", "sid": sid}
        )
        assert other.status_code == 400
        assert other.json() == {"code": 1, "message": "Session ID unknown"}
        bad = await client.get(f"{first.url}/socket.io/", params={"EIO": 3, "transport": "polling"})
        assert bad.status_code == 400 and bad.json()["code"] == 5
    async with httpx.AsyncClient(base_url=lb(sio_cluster), timeout=10) as client:
        opened = await client.get("/socket.io/", params={"EIO": 4, "transport": "polling"})
        sid = orjson.loads(opened.content[1:])["sid"]
        assert AFFINITY_COOKIE in client.cookies
        query = {"EIO": 4, "transport": "polling", "sid": sid}
        for _ in range(4):  # round robin would alternate pods; the cookie holds
            posted = await client.post("/socket.io/", params=query, content=b"40")
            assert posted.status_code == 200 and posted.text == "ok", posted.text
            polled = await client.get("/socket.io/", params=query)
            assert polled.status_code == 200
            assert polled.text.startswith("44{"), polled.text  # no token: CONNECT_ERROR


async def test_auth_and_refusals(sio_cluster: LocalCluster, driver: SioDriver, token: Mint) -> None:
    url = lb(sio_cluster)
    ws = {"transports": ["websocket"], "reconnection": False}
    none = await driver.connect("none", url, **ws)
    assert none["ev"] == "connect_error" and none["data"]["code"] == "unauthorized"
    bad = await driver.connect("bad", url, auth={"token": "not-a-jwt"}, **ws)
    assert bad["ev"] == "connect_error" and bad["message"] == "invalid or expired token"
    forbidden = await driver.connect(
        "forbidden", url, auth={"token": token(channels=["room:1"]), "rooms": ["secret:1"]}, **ws
    )
    assert forbidden["ev"] == "connect_error"
    assert forbidden["data"] == {"code": "forbidden", "room": "secret:1"}
    admin = await driver.connect("admin", url + "/admin", auth={"token": token()}, **ws)
    assert admin["ev"] == "connect_error" and admin["message"] == "Invalid namespace"
    ok = await driver.connect("ok", url, auth={"token": token(channels=["room:*"])}, **ws)
    assert ok["ev"] == "connect"
    denied = await driver.emit("ok", "join", "secret:1")
    assert denied == {
        "ok": False,
        "code": "forbidden",
        "message": "the token does not allow this room",
        "room": "secret:1",
    }
    assert (await driver.emit("ok", "join", "bad channel"))["code"] == "bad_channel"
    no_claim = await driver.emit("ok", "publish", "room:1", "hi")
    assert no_claim["ok"] is False and no_claim["code"] == "forbidden"
    assert (await driver.emit("ok", "nope"))["code"] == "bad_request"
    presence = await driver.emit("ok", "presence", "room:1")
    assert presence["ok"] and presence["count"] >= 0


async def test_join_with_a_rewind_on_every_pod(
    sio_cluster: LocalCluster, driver: SioDriver, api: httpx.AsyncClient, room: str, token: Mint
) -> None:
    """A client joining a room on either pod gets its last messages (from that pod's history,
    warm-started: complete), in the order native clients see, then live ones."""
    url = lb(sio_cluster)
    ws = {"transports": ["websocket"], "auth": {"token": token()}, "reconnection": False}
    watchers = await connect_on_each_pod(driver, url, "watch", 2, **ws)
    for name in watchers.values():
        assert (await driver.emit(name, "join", room))["ok"]
    ids = [await publish_http(api, room, n) for n in range(5)]
    for name in watchers.values():  # both pods hold them now
        assert await driver.wait_messages(name, room, 5) == ids
    joiners = await connect_on_each_pod(driver, url, "join", 2, **ws)
    for name in joiners.values():
        ack = await driver.emit(name, "join", {"room": room, "rewind": {"count": 3}})
        assert ack["rewound"] == {"count": 3, "complete": True}, ack
        assert await driver.wait_messages(name, room, 3) == ids[2:]
    live = await publish_http(api, room, "live")
    for name in joiners.values():
        assert await driver.wait_messages(name, room, 4) == [*ids[2:], live]


async def test_recovery_after_sigkill(
    sio_cluster: LocalCluster, driver: SioDriver, api: httpx.AsyncClient, room: str, token: Mint
) -> None:
    """Clients (websocket and long-polling) that received an event on a pod that is then
    SIGKILLed reconnect through the load balancer to the other pod: `socket.recovered` is true,
    every event they missed arrives once, in order, then live ones; in both rooms they joined
    after connecting, though the last event before the kill came from one of them."""
    url = lb(sio_cluster)
    auth = {"token": token("kim")}
    websocket = await connect_on_each_pod(
        driver, url, "w", 2, transports=["websocket"], auth=auth, **FAST_RECONNECT
    )
    polling = await connect_on_each_pod(
        driver,
        url,
        "p",
        2,
        transports=["polling"],
        withCredentials=True,
        auth=auth,
        **FAST_RECONNECT,
    )
    doomed_pod = sorted(websocket)[0]
    survivor_pod = sorted(websocket)[1]
    victims = [websocket[doomed_pod], polling[doomed_pod]]
    witness = websocket[survivor_pod]
    side = f"{room}-side"
    for name in [*victims, witness]:
        assert (await driver.emit(name, "join", side))["ok"]
        assert (await driver.emit(name, "join", room))["ok"]
    ids = [await publish_http(api, room, {"n": 0})]
    for name in [*victims, witness]:
        await driver.wait_messages(name, room, 1)
    pod = next(s for s in sio_cluster.sockets if s.env["POD_NAME"] == doomed_pod)
    pod.process.kill()  # SIGKILL: no drain, no goodbye
    try:
        side_ids = []
        for n in range(1, 6):  # while the victims are away or reconnecting
            ids.append(await publish_http(api, room, {"n": n}))
            side_ids.append(await publish_http(api, side, {"n": n}))
        for name in victims:
            reconnected = await driver.wait_for(
                lambda r, name=name: (
                    r["ev"] == "connect" and r["name"] == name and r["pod"] != doomed_pod
                ),
                f"{name} to reconnect to the other pod",
                timeout=20,
            )
            assert reconnected["recovered"] is True, reconnected
            assert reconnected["pod"] == survivor_pod
        ids.append(await publish_http(api, room, {"n": 6}))
        for name in [*victims, witness]:
            assert await driver.wait_messages(name, room, 7) == ids, name
            assert await driver.wait_messages(name, side, 5) == side_ids, name
        # Nothing twice: a duplicate would have come before a last, live message.
        ids.append(await publish_http(api, room, {"n": 7}))
        side_ids.append(await publish_http(api, side, {"n": 6}))
        for name in victims:
            assert await driver.wait_messages(name, room, 8) == ids, name
            assert await driver.wait_messages(name, side, 6) == side_ids, name
            assert [a[0]["n"] for a in driver.messages(name, room)] == list(range(8))
    finally:
        ensure_pods_up(url, [pod])
