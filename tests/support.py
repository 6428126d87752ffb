"""What the test suites share: waits with deadlines, unique channel and room names, client
tokens, metrics, clusters on free ports, a websocket client that records frames, and a
Server-Sent Events client (and an EventSource-faithful parser) that records events.

The fixtures built on these are in tests/conftest.py. The waits themselves are devtools/waiting.py
(the dev tooling waits with them too); tests import them from here.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
from devtools.metrics import metric
from devtools.waiting import DEFAULT_TIMEOUT_S, WaitTimeout, eventually, wait_until
from services.core.auth import mint_token

Mint = Callable[..., str]  # tokens as `mint` makes them: (sub, channels, publish, ttl_s)

__all__ = [
    "CLOSED",
    "DEFAULT_TIMEOUT_S",
    "TOKEN_SECRET",
    "Mint",
    "SseClient",
    "SseParser",
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


async def assert_nothing_in(queue: asyncio.Queue[Any], within_s: float, what: str) -> None:
    """Nothing comes out of `queue` for `within_s`: a quiet moment is what is tested."""
    try:
        async with asyncio.timeout(within_s):
            item = await queue.get()
    except TimeoutError:
        return
    raise AssertionError(f"unexpected {what}: {item!r}")


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
        await assert_nothing_in(self.frames, within_s, "frame")

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT_S) -> int | None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        return self.close_code

    async def close(self) -> None:
        await self.connection.close()
        await self._reader


# -- Server-Sent Events ---------------------------------------------------------------------------
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass
class SseParser:
    """An `EventSource`'s parser (WHATWG HTML, "Parsing an event stream"): fed text as it comes,
    it dispatches events with the `lastEventId` a browser would give them; comments and `retry`
    are recorded."""

    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    last_event_id: str = ""
    retry_ms: int | None = None
    _buffer: str = ""
    _data: list[str] = field(default_factory=list)
    _type: str = ""
    _id_buffer: str = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The events completed by `text`: {"event", "data" (parsed JSON), "id"}."""
        done_before = len(self.events)
        self._buffer += text
        *lines, self._buffer = _LINE_BREAK.split(self._buffer)
        for line in lines:
            self._line(line)
        return self.events[done_before:]

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id" and "\0" not in value:
            self._id_buffer = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)

    def _dispatch(self) -> None:
        self.last_event_id = self._id_buffer
        lines, kind = self._data, self._type or "message"
        self._data, self._type = [], ""
        if lines:  # no data: no event (an `id:` alone still moves lastEventId)
            data = orjson.loads("\n".join(lines))
            self.events.append({"event": kind, "data": data, "id": self.last_event_id})


class SseClient:
    """A real HTTP client on a `text/event-stream` response (httpx streaming): events are
    parsed (SseParser) and queued as they arrive; a `None` is queued when the stream ends."""

    def __init__(self, http: httpx.AsyncClient, response: httpx.Response) -> None:
        self.http = http
        self.response = response
        self.parser = SseParser()
        self.events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.ended = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, headers: dict[str, str] | None = None) -> SseClient:
        http = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        request = http.build_request("GET", url, headers=headers)
        response = await http.send(request, stream=True)
        if response.status_code != 200:
            body = await response.aread()
            await http.aclose()
            raise AssertionError(f"{response.status_code}: {body!r}")
        return cls(http, response)

    @property
    def pod(self) -> str | None:
        return self.response.headers.get("x-pubsock-pod")

    @property
    def last_event_id(self) -> str:
        return self.parser.last_event_id

    async def _read(self) -> None:
        try:
            async for text in self.response.aiter_text():
                for parsed in self.parser.feed(text):
                    self.events.put_nowait(parsed)
        except (httpx.HTTPError, OSError):
            pass
        finally:
            self.ended.set()
            self.events.put_nowait(None)

    async def next(self, kind: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        """The next event's data (of `kind`: another kind first is an error)."""
        async with asyncio.timeout(timeout):
            parsed = await self.events.get()
        if parsed is None:
            self.events.put_nowait(None)  # stays the last word
            raise ConnectionError(f"the stream ended while waiting for {kind}")
        if kind is not None and parsed["event"] != kind:
            raise AssertionError(f"expected a {kind} event, got {parsed}")
        return parsed["data"]

    async def messages(self, count: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
        return [await self.next("message", timeout) for _ in range(count)]

    async def wait_ended(self, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout):
            await self.ended.wait()

    async def assert_quiet(self, within_s: float = 0.5) -> None:
        """No event arrives for a moment (used only after everything expected has arrived)."""
        await assert_nothing_in(self.events, within_s, "event")

    async def close(self) -> None:
        await self.response.aclose()
        await self.http.aclose()
        await asyncio.gather(self._reader, return_exceptions=True)


# -- publishing over HTTP ----------------------------------------------------------------------
async def publish(api: httpx.AsyncClient, channel: str, data: object, **extra: object) -> str:
    response = await api.post(f"/v1/channels/{channel}/messages", json={"data": data, **extra})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["channel"] == channel
    return body["id"]


class Publisher:
    """Publishes to one channel at a steady rate until stopped; records every accepted id."""

    def __init__(self, api_url: str, channel: str, rate_per_s: float) -> None:
        self.api_url = api_url
        self.channel = channel
        self.interval_s = 1 / rate_per_s
        self.accepted: list[str] = []
        self.unavailable = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.api_url, timeout=10) as api:
            n = 0
            while not self._stop.is_set():
                response = await api.post(f"/v1/channels/{self.channel}/messages", json={"data": n})
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
                else:
                    assert response.status_code == 503, response.text
                    self.unavailable += 1
                n += 1
                await asyncio.sleep(self.interval_s)  # the pace of the load, not a wait

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def accepted_at_least(self, count: int, timeout_s: float = 10) -> None:
        await eventually(
            lambda: len(self.accepted),
            timeout_s,
            f"{count} accepted publishes",
            interval_s=0.05,
            until=lambda accepted: accepted >= count,
        )

    async def stop(self) -> list[str]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.accepted
