"""A short-lived demo token is refreshed over the open websocket: the page never reconnects."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from playwright.sync_api import expect

from tests.e2e.support import DemoPage, ExtraLoadBalancer, open_on_two_pods

TOKEN_TTL_S = 20  # DEMO_TOKEN_TTL_S of these pods (the server's floor is 10)
WAIT_MS = (TOKEN_TTL_S + 15) * 1000


@pytest.fixture(scope="module")
def short_tokens(e2e_cluster) -> Iterator[ExtraLoadBalancer]:
    """Two socket pods minting demo tokens that live TOKEN_TTL_S, behind their own HAProxy."""
    extra = ExtraLoadBalancer.start(e2e_cluster, "short-ttl", DEMO_TOKEN_TTL_S=str(TOKEN_TTL_S))
    yield extra
    extra.stop()


def _open_control_socket(page: DemoPage) -> None:
    """A bare websocket with the page's first token that never refreshes: it must be closed with
    1008 at that token's expiry, which proves the expiry is enforced in this setup."""
    page.page.evaluate(
        """() => {
            const token = encodeURIComponent(window.pubsockDemo.client.token);
            const ws = new WebSocket(`ws://${location.host}/ws?token=${token}&control=1`);
            window.controlSocket = { state: 'connecting', code: null };
            ws.onopen = () => { window.controlSocket.state = 'open'; };
            ws.onclose = (e) => { window.controlSocket = { state: 'closed', code: e.code }; };
        }"""
    )
    page.page.wait_for_function("() => window.controlSocket.state === 'open'", timeout=10_000)


def _publish_in_background(page: DemoPage, channel: str) -> None:
    """The page's client publishes ten times a second (to a channel it does not show), as a busy
    chat does: each publish near expiry fetches a fresh token for HTTP, which the connection's
    refresh must not mistake for its own."""
    page.page.evaluate(
        """(channel) => {
            const client = window.pubsockDemo.client;
            window.side = { ok: 0, failed: 0 };
            window.side.timer = setInterval(() => client.publish(channel, { text: 'busy' }).then(
                () => window.side.ok++, () => window.side.failed++), 100);
        }""",
        channel,
    )


def _stop_background(page: DemoPage) -> dict:
    return page.page.evaluate(
        "() => { clearInterval(window.side.timer); return { ok: window.side.ok, failed: window.side.failed }; }"
    )


def test_short_lived_token_is_refreshed_without_interruption(
    short_tokens, open_page, room, publisher
):
    """A token near expiry is refreshed over the open connection: no reconnect, messages keep flowing."""
    ada, grace = open_on_two_pods(lambda: open_page(short_tokens.url))
    ada.join("Ada", room)
    grace.join("Grace", room)
    pages = (ada, grace)
    pods = {page.name: page.pod() for page in pages}
    first_exp = {page.name: page.token_exp() for page in pages}
    for page in pages:
        assert first_exp[page.name] - time.time() <= TOKEN_TTL_S + 1
    _open_control_socket(ada)
    _publish_in_background(ada, f"{ada.channel}-side")

    texts: list[str] = []

    def exchange(phase: str) -> None:
        """Both pages type a message and the API publishes one; every page shows them all."""
        texts.append(f"Ada {phase}")
        ada.send(texts[-1])
        texts.append(f"Grace {phase}")
        grace.send(texts[-1])
        texts.append(f"API {phase}")
        publisher.publish(ada.channel, texts[-1])
        for page in pages:
            page.expect_texts(texts)

    exchange("with the first token")
    for page in pages:  # the client refreshes some time before expiry
        expect(page.event("refreshed")).to_have_count(1, timeout=WAIT_MS)
    exchange("after the first refresh")
    for page in pages:  # past the first token's expiry; by now a second refresh came
        page.page.wait_for_function(
            "exp => Date.now() > exp * 1000 + 1500",
            arg=first_exp[page.name],
            polling=250,
            timeout=WAIT_MS,
        )
        expect(page.event("refreshed")).to_have_count(2, timeout=WAIT_MS)
    exchange("after the first token expired")

    side = _stop_background(ada)
    assert side["failed"] == 0 and side["ok"] >= 2 * TOKEN_TTL_S, side
    # The control socket (same first token, no refresh) was closed at expiry with 1008.
    assert ada.page.evaluate("() => window.controlSocket") == {"state": "closed", "code": 1008}
    for page in pages:
        assert page.pod() == pods[page.name]
        expect(page.page.locator("#connection")).to_have_attribute("data-state", "open")
        expect(page.event("reconnecting")).to_have_count(0)
        expect(page.event("gap")).to_have_count(0)
        states = page.event_texts("state")
        assert states == ["connected", "connecting…"], states  # newest first: never disconnected
        # One websocket the whole time, still open; refreshes went over it.
        sockets = [ws for ws in page.websockets if "control=1" not in ws.url]
        assert len(sockets) == 1 and not sockets[0].is_closed()
        sent = [json.loads(f) for f in page.frames_sent if isinstance(f, str)]
        received = [json.loads(f) for f in page.frames_received if isinstance(f, str)]
        assert sum(f["type"] == "refresh" for f in sent) >= 2
        refreshed = [f["expires_at"] for f in received if f["type"] == "refreshed"]
        assert len(refreshed) >= 2 and refreshed == sorted(refreshed)
        assert refreshed[0] > first_exp[page.name]
        # The first refresh was confirmed before the first token expired (events: newest first).
        first_refresh = page.event("refreshed").last.locator("time").get_attribute("datetime")
        assert datetime.fromisoformat(first_refresh or "").timestamp() < first_exp[page.name]
        assert not [f for f in received if f["type"] == "error"]
