"""What the test suites share: waits with deadlines, unique channel and room names, client
tokens, metrics, clusters on free ports, and a websocket client that records frames.

The fixtures built on these are in tests/conftest.py. The waits themselves are devtools/waiting.py
(the dev tooling waits with them too); tests import them from here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from devtools.cluster import (
    AFFINITY_COOKIE,
    ClusterConfig,
    LocalCluster,
    Service,
    emulator_available,
    free_port,
)
from devtools.demo import DEMO_ENV
from devtools.waiting import DEFAULT_TIMEOUT_S, WaitTimeout, eventually, wait_until
from services.core.auth import mint_token

Mint = Callable[..., str]  # tokens as `mint` makes them: (sub, channels, publish, ttl_s)

__all__ = [
    "CLOSED",
    "DEFAULT_TIMEOUT_S",
    "TOKEN_SECRET",
    "Mint",
    "WaitTimeout",
    "WsClient",
    "cluster_on_free_ports",
    "emulator_missing",
    "ensure_pods_up",
    "eventually",
    "lb_routes_cookie_to",
    "make_run_cluster",
    "metric",
    "mint",
    "require",
    "unique_channel",
    "unique_name",
    "wait_metric",
    "wait_until",
]

CLOSED = "_closed"  # queued after the last frame when the connection ends
TOKEN_SECRET = "test-secret-please-change-0123456789abcdef"


# -- names and tokens ------------------------------------------------------------------------
_serial = itertools.count(1)
_NOT_IN_A_NAME = re.compile(r"[^A-Za-z0-9_.@-]")  # a channel's characters, a demo room's too


def unique_name(label: str = "") -> str:
    """`label` (a test's name, say) made a name no other call in any run gets, and one a channel
    name or a demo room may contain."""
    return f"{_NOT_IN_A_NAME.sub('_', label[:40])}-{next(_serial)}-{os.getpid()}"


def unique_channel(namespace: str, label: str = "") -> str:
    """`<namespace>:<unique name>`: a channel (a socket.io room) no other test uses."""
    return f"{namespace}:{unique_name(label)}"


def mint(
    sub: str = "ann",
    channels: Iterable[str] = ("room:*",),
    publish: Iterable[str] = (),
    ttl_s: int = 600,
    *,
    secret: str = TOKEN_SECRET,
) -> str:
    """A client token, signed as the publish API signs them (services.core.auth)."""
    return mint_token(secret, sub, list(channels), list(publish), ttl_s)[0]


# -- what a suite needs ----------------------------------------------------------------------
def emulator_missing() -> str | None:
    return None if emulator_available() else "the Pub/Sub emulator is not installed"


def require(missing: str | None, suite: str) -> None:
    """Skips `suite` when something it needs is `missing`; in CI, fails instead."""
    if missing is None:
        return
    if os.environ.get("CI"):
        raise RuntimeError(f"{suite} cannot run in CI: {missing}")
    pytest.skip(missing, allow_module_level=True)


def cluster_on_free_ports(**config: Any) -> LocalCluster:
    """A LocalCluster (not started) whose api, two socket pods, load balancer and emulator each
    get a free port; `config` is the rest of its ClusterConfig."""
    return LocalCluster(
        ClusterConfig(
            api_port=free_port(),
            socket_ports=(free_port(), free_port()),
            lb_port=free_port(),
            emulator_port=free_port(),
            **config,
        )
    )


def make_run_cluster(**socket_env: str) -> LocalCluster:
    """What `make run` starts (emulator, topic with retention, api, two socket pods, HAProxy with
    the affinity cookie) with make run's demo credentials, on free ports."""
    return cluster_on_free_ports(extra_env=dict(DEMO_ENV), socket_env=dict(socket_env))


def lb_routes_cookie_to(lb_url: str, pod: str) -> bool:
    """True when the load balancer sends a client with the affinity cookie `pod` to that pod
    (it is up in HAProxy's health checks, not only ready on its own port)."""
    try:
        response = httpx.get(
            f"{lb_url}/config.json", headers={"Cookie": f"{AFFINITY_COOKIE}={pod}"}, timeout=2
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.headers.get("x-pubsock-pod") == pod


def ensure_pods_up(lb_url: str, pods: list[Service], timeout_s: float = 60) -> None:
    """Restarts (same port, same name) every pod a test killed or drained, and waits until the
    load balancer routes to each of them again."""
    for pod in pods:
        if not pod.process.running:
            pod.process.wait(20)
            pod.start(wait_ready=False)
    for pod in pods:
        pod.wait_ready(timeout_s)
        name = pod.env["POD_NAME"]
        wait_until(
            lambda name=name: lb_routes_cookie_to(lb_url, name),
            timeout_s,
            f"the load balancer to route to {name}",
        )


async def metric(url: str, name: str, *, unreachable: float | None = None) -> float:
    """The sum of the series of a metric at `url`/metrics (0 while it has none). `unreachable`,
    when given, is the answer while nothing answers at `url`."""
    try:
        async with httpx.AsyncClient() as client:
            text = (await client.get(f"{url}/metrics")).text
    except httpx.HTTPError:
        if unreachable is None:
            raise
        return unreachable
    series = [line for line in text.splitlines() if line.startswith((f"{name} ", f"{name}{{"))]
    return sum((float(line.rsplit(" ", 1)[1]) for line in series), 0.0)


async def wait_metric(
    url: str,
    name: str,
    until: Callable[[float], object],
    timeout_s: float = 30,
    *,
    unreachable: float | None = None,
) -> float:
    """Polls a metric (as `metric` reads it) until `until(value)`; returns the value."""
    return await eventually(
        lambda: metric(url, name, unreachable=unreachable),
        timeout_s,
        f"{name} at {url}",
        interval_s=0.2,
        until=until,
    )


# -- a websocket client ----------------------------------------------------------------------


class WsClient:
    """A real websocket client; frames are parsed and queued as they arrive."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WsClient:
        connection = await websockets.connect(url, open_timeout=10, **kwargs)
        return cls(connection)

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                self.frames.put_nowait(orjson.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.connection.close_code
            self.closed.set()
            self.frames.put_nowait({"type": CLOSED, "code": self.close_code})

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.connection.send(frame)

    async def next(
        self, kind: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """The next frame (of `kind`, skipping pongs when another kind is asked for)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if frame.get("type") == CLOSED and kind != CLOSED:
                    self.frames.put_nowait(frame)  # stays the last word
                    raise ConnectionError(f"closed with {frame['code']} while waiting for {kind}")
                if kind is None or frame.get("type") == kind:
                    return frame
                if frame.get("type") != "pong":
                    raise AssertionError(f"expected a {kind} frame, got {frame}")

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "channel": channel, **extra})
        return await self.next("subscribed")

    async def messages(
        self, count: int, timeout: float = DEFAULT_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        return [await self.next("message", timeout) for _ in range(count)]

    async def pod(self) -> str:
        await self.send({"type": "ping"})
        return (await self.next("pong"))["pod"]

    async def assert_quiet(self, within_s: float = 0.5) -> None:
        """No frame arrives for a moment (used only after everything expected has arrived)."""
        try:
            async with asyncio.timeout(within_s):
                frame = await self.frames.get()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame}")

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT_S) -> int | None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        return self.close_code

    async def close(self) -> None:
        await self.connection.close()
        await self._reader
