"""Browser-test helpers: Debian's Chromium under Playwright, the demo page, extra pods behind an
extra load balancer (the `make run` cluster itself and the waits are tests/support.py's).

Shared by conftest.py and screenshot.py. Playwright's sync API only: pytest-asyncio's session loop
must never see a Playwright instance alive (it marks its own loop as running between calls).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
from playwright.sync_api import Browser, BrowserContext, Page, WebSocket, expect, sync_playwright

from devtools.cluster import AFFINITY_COOKIE, LoadBalancer, LocalCluster, Service, free_port
from devtools.run import DEMO_ENV

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
PUBLISHER_KEY = DEMO_ENV["API_KEYS"].split(",")[0]

# Deadlines (ms for Playwright, s for Python waits). Generous: they bound a failure, they never
# pace a passing run.
JOIN_MS = 20_000
DELIVERY_MS = 15_000
PRESENCE_MS = 10_000
FAILOVER_MS = 25_000


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class ExtraLoadBalancer:
    """Socket pods with their own settings behind their own HAProxy, on a running cluster's
    emulator and api (e.g. pods that mint short-lived demo tokens)."""

    cluster: LocalCluster
    pods: list[Service]
    lb: LoadBalancer

    @classmethod
    def start(cls, cluster: LocalCluster, prefix: str, count: int = 2, **env: str):
        work_dir = cluster.work_dir / prefix
        work_dir.mkdir(exist_ok=True)
        pods = [
            cluster.new_socket(f"{prefix}-{i}", free_port(), **env) for i in range(1, count + 1)
        ]
        lb = LoadBalancer(free_port(), [cluster.api.port], [p.port for p in pods], work_dir)
        for pod in pods:
            pod.start(wait_ready=False)
        try:
            for pod in pods:
                pod.wait_ready()
            lb.start()
        except BaseException:
            for pod in pods:
                pod.process.stop()
            raise
        return cls(cluster, pods, lb)

    @property
    def url(self) -> str:
        return self.lb.url

    def stop(self) -> None:
        self.lb.stop()
        for pod in self.pods:  # drain them all at once, then wait for each
            pod.process.signal(signal.SIGTERM)
        for pod in self.pods:
            pod.process.stop()


# -- the publish API --------------------------------------------------------------------------


class Publisher:
    """Publishes through the load balancer (`/v1/` goes to the api) with make run's key."""

    def __init__(self, lb_url: str, key: str = PUBLISHER_KEY) -> None:
        self.client = httpx.Client(
            base_url=lb_url, headers={"Authorization": f"Bearer {key}"}, timeout=15
        )

    def publish(self, channel: str, text: str) -> str:
        response = self.client.post(
            f"/v1/channels/{channel}/messages", json={"data": {"text": text}}
        )
        assert response.status_code == 202, (response.status_code, response.text)
        return response.json()["id"]

    def close(self) -> None:
        self.client.close()


# -- the demo page ----------------------------------------------------------------------------


@dataclass
class DemoPage:
    """One browser context (its own cookies, so its own affinity) with the demo page open."""

    context: BrowserContext
    page: Page
    name: str | None = None
    room: str | None = None
    errors: list[str] = field(default_factory=list)
    websockets: list[WebSocket] = field(default_factory=list)
    frames_sent: list[str | bytes] = field(default_factory=list)
    frames_received: list[str | bytes] = field(default_factory=list)

    @classmethod
    def open(cls, browser: Browser, base_url: str, viewport: dict | None = None) -> DemoPage:
        context = browser.new_context(viewport=viewport or VIEWPORT, base_url=base_url)
        page = context.new_page()
        demo = cls(context, page)
        page.on("pageerror", lambda error: demo.errors.append(str(error)))
        page.on("websocket", demo._on_websocket)
        page.goto("/")
        expect(page.locator("#join-form")).to_be_visible()
        return demo

    def _on_websocket(self, ws: WebSocket) -> None:
        self.websockets.append(ws)
        ws.on("framesent", lambda payload: self.frames_sent.append(payload))
        ws.on("framereceived", lambda payload: self.frames_received.append(payload))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.context.close()

    @property
    def affinity(self) -> str | None:
        """The pod named by this context's load-balancer cookie."""
        for cookie in self.context.cookies():
            if cookie["name"] == AFFINITY_COOKIE:
                return cookie["value"]
        return None

    @property
    def channel(self) -> str:
        return f"demo:{self.room}"

    def join(self, name: str, room: str) -> None:
        page = self.page
        page.fill("#name", name)
        page.fill("#room", room)
        page.click("#join-button")
        expect(page.locator("#chat")).to_be_visible(timeout=JOIN_MS)
        expect(page.locator("#join-form")).to_be_hidden()
        expect(page.locator("#me")).to_have_text(name)
        expect(page.locator("#connection")).to_have_attribute("data-state", "open", timeout=JOIN_MS)
        expect(self.event("subscribed")).to_have_count(1, timeout=JOIN_MS)
        # The pod as the websocket's own pong names it (not only the load balancer's guess).
        expect(self.event("pod").filter(has_text="served by pod").first).to_be_attached(
            timeout=JOIN_MS
        )
        self.name, self.room = name, room

    def pod(self) -> str:
        return (self.page.text_content("#pod") or "").strip()

    def event(self, kind: str):
        return self.page.locator(f'#events li[data-event="{kind}"]')

    def event_texts(self, kind: str) -> list[str]:
        """The texts of the events of one kind, newest first, without their times."""
        return self.event(kind).evaluate_all(
            """items => items.map((li) => Array.from(li.childNodes)
                .filter((node) => node.nodeType === Node.TEXT_NODE)
                .map((node) => node.textContent).join('').trim())"""
        )

    @property
    def message_items(self):
        return self.page.locator('#messages li[data-testid="message"]')

    def message_ids(self) -> list[str]:
        return self.message_items.evaluate_all("items => items.map((li) => li.dataset.id)")

    def messages(self) -> list[dict]:
        return self.message_items.evaluate_all(
            """items => items.map((li) => ({
                id: li.dataset.id,
                sub: li.dataset.sub ?? null,
                status: li.dataset.status,
                who: li.querySelector('.who')?.textContent,
                text: li.querySelector('.text')?.textContent,
                datetime: li.querySelector('time')?.dateTime,
                time: li.querySelector('time')?.textContent,
            }))"""
        )

    def message(self, message_id: str):
        return self.page.locator(f'#messages li[data-testid="message"][data-id="{message_id}"]')

    def send(self, text: str) -> str:
        """Types and sends a message; returns its id once the API accepted it (delivered)."""
        self.page.fill("#message-input", text)
        self.page.click("#send-button")
        item = self.message_items.filter(has=self.page.locator(".text", has_text=text)).last
        expect(item).to_have_attribute("data-status", "delivered", timeout=DELIVERY_MS)
        expect(self.page.locator("#send-error")).to_be_hidden()
        return item.get_attribute("data-id") or ""

    def expect_texts(self, texts: list[str], timeout_ms: int = DELIVERY_MS) -> None:
        """Exactly these message texts, in this order (none missing, none twice)."""
        expect(self.message_items.locator(".text")).to_have_text(texts, timeout=timeout_ms)

    def token_exp(self) -> int:
        """`exp` of the client's current token."""
        return self.page.evaluate(
            """() => {
                const part = window.pubsockDemo.client.token.split('.')[1];
                const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
                return JSON.parse(atob(b64 + '='.repeat((4 - b64.length % 4) % 4))).exp;
            }"""
        )


def open_on_two_pods(
    open_page: Callable[[], DemoPage], attempts: int = 8
) -> tuple[DemoPage, DemoPage]:
    """Two pages whose affinity cookies name different pods. HAProxy balances new clients round
    robin, so the second context almost always lands elsewhere; open more until one does."""
    first = open_page()
    assert first.affinity, "the load balancer set no affinity cookie"
    for _ in range(attempts):
        other = open_page()
        if other.affinity != first.affinity:
            return first, other
        other.close()
    raise AssertionError(f"{attempts} new browser contexts all landed on {first.affinity}")


def assert_recent(iso: str, within_s: float = 120) -> None:
    """`iso` (a message's publish time) is a real time close to now."""
    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - when).total_seconds()) < within_s, iso
