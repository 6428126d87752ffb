"""Server-Sent Events in Chromium, behind a load balancer that refuses websocket upgrades (as some
proxies do): the demo page falls back to one event stream, and both it and a bare EventSource
survive a SIGKILL of their pod, resuming on the other pod with no loss and no duplicate."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from devtools.cluster import LoadBalancer, LocalCluster, free_port
from tests.e2e.support import FAILOVER_MS, DemoPage
from tests.support import ensure_pods_up

STREAM_MS = 15_000


@pytest.fixture(scope="module")
def no_websockets(e2e_cluster: LocalCluster) -> Iterator[LoadBalancer]:
    """A second HAProxy in front of the same api and pods that answers every websocket upgrade
    with 403."""
    lb = LoadBalancer(
        free_port(),
        [e2e_cluster.api.port],
        [pod.port for pod in e2e_cluster.sockets],
        e2e_cluster.work_dir,
        deny_websockets=True,
        name="haproxy-no-websockets",
    )
    lb.start()
    yield lb
    lb.stop()


@pytest.fixture
def blocked_lb(pods_up, no_websockets: LoadBalancer) -> str:
    """The websocket-refusing load balancer, routing to both (restarted) pods."""
    ensure_pods_up(no_websockets.url, pods_up)
    return no_websockets.url


def _pods(pods, serving: str):
    by_name = {pod.env["POD_NAME"]: pod for pod in pods}
    (survivor,) = (pod for name, pod in by_name.items() if name != serving)
    return by_name[serving], survivor


def test_page_falls_back_to_sse_and_resumes_after_sigkill_once_in_order(
    pods_up, blocked_lb, open_page, room, publisher
):
    """Websockets are refused: the page falls back to SSE (and gets the room's recent messages,
    its rewind); its pod is SIGKILLed while messages are published; it resumes on the other pod
    with every message once, in order."""
    earlier = publisher.publish(f"demo:{room}", "before Ada came")  # her rewind shows it
    ada: DemoPage = open_page(blocked_lb)
    ada.join("Ada", room)
    expect(ada.event("transport")).to_have_count(1)
    assert "using sse" in ada.event_texts("transport")[0]
    assert not ada.frames_received, "no websocket got through this load balancer"
    assert ada.page.evaluate("window.pubsockDemo.client.transport") == "sse"

    texts = ["before Ada came", "over SSE"]
    ids = [earlier, ada.send(texts[1])]  # published over HTTP, delivered on the stream
    ada.expect_texts(texts)
    victim, survivor = _pods(pods_up, ada.pod())
    survivor_name = survivor.env["POD_NAME"]

    victim.process.kill()
    for i in range(1, 4):
        texts.append(f"while Ada is away {i}")
        ids.append(publisher.publish(ada.channel, texts[-1]))
    expect(ada.page.locator("#pod")).to_have_text(survivor_name, timeout=FAILOVER_MS)
    for i in range(1, 3):
        texts.append(f"after the failover {i}")
        ids.append(publisher.publish(ada.channel, texts[-1]))
    texts.append("Ada again")
    ids.append(ada.send(texts[-1]))

    ada.expect_texts(texts, timeout_ms=FAILOVER_MS)
    assert ada.message_ids() == ids  # the same ids, in order, none twice
    expect(ada.page.locator("#connection")).to_have_attribute("data-state", "open")
    assert any("1006" in text for text in ada.event_texts("reconnecting"))
    expect(ada.event("recovered")).not_to_have_count(0)
    expect(ada.event("gap")).to_have_count(0)
    assert ada.page.evaluate("window.pubsockDemo.client.transport") == "sse"


def test_bare_eventsource_resumes_with_last_event_id_after_sigkill(
    pods_up, blocked_lb, open_page, room, publisher
):
    """A plain `EventSource` on two channels: the browser reconnects by itself with the last
    event id, through the load balancer, to the other pod; every channel resumes exactly once."""
    page: DemoPage = open_page(blocked_lb)
    a, b = f"demo:{room}-a", f"demo:{room}-b"
    page.page.evaluate(
        """async ([a, b]) => {
            const answer = await fetch('/demo/token', {
                method: 'POST', headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({name: 'bare'}),
            });
            const {token} = await answer.json();
            window.sse = {events: [], errors: 0};
            const source = new EventSource(`/sse?channels=${a},${b}&token=${token}`);
            const record = (event) => window.sse.events.push(
                {type: event.type, data: JSON.parse(event.data), id: event.lastEventId});
            source.onmessage = record;
            for (const type of ['pod', 'subscribed', 'close']) source.addEventListener(type, record);
            source.onerror = () => { window.sse.errors++; };
            window.sse.source = source;
        }""",
        [a, b],
    )

    def events(kind: str) -> list[dict]:
        return page.page.evaluate(
            "(kind) => window.sse.events.filter((e) => e.type === kind)", kind
        )

    def wait_for(condition: str, *args) -> None:
        page.page.wait_for_function(condition, arg=list(args), timeout=FAILOVER_MS)

    wait_for("() => window.sse.events.filter((e) => e.type === 'subscribed').length === 2")
    serving = events("pod")[0]["data"]["pod"]
    victim, survivor = _pods(pods_up, serving)
    sent = {a: [publisher.publish(a, "a1")], b: [publisher.publish(b, "b1")]}
    wait_for("(n) => window.sse.events.filter((e) => e.type === 'message').length === n[0]", 2)

    victim.process.kill()
    for channel, text in ((a, "a2"), (b, "b2"), (a, "a3")):
        sent[channel].append(publisher.publish(channel, text))
    wait_for(
        "(name) => window.sse.events.some((e) => e.type === 'pod' && e.data.pod === name[0])",
        survivor.env["POD_NAME"],
    )
    sent[b].append(publisher.publish(b, "b3"))
    wait_for("(n) => window.sse.events.filter((e) => e.type === 'message').length === n[0]", 6)

    messages = events("message")
    for channel in (a, b):
        assert [m["data"]["id"] for m in messages if m["data"]["channel"] == channel] == sent[
            channel
        ]
    resumed = [s["data"] for s in events("subscribed")[2:]]
    assert sorted((s["channel"], s["recovered"]) for s in resumed) == [(a, True), (b, True)]
    assert page.page.evaluate("window.sse.errors") >= 1  # the browser saw the stream end
    page.page.evaluate("window.sse.source.close()")


def test_a_stream_too_long_to_resume_is_refused_with_the_servers_reason(
    pods_up, blocked_lb, open_page, room
):
    """The page's one stream grows past what its reconnect could carry (60 more channels of 120
    characters): the pod refuses it with 400. EventSource cannot see that, so the client asks
    again over fetch and reports the server's reason: the subscribes that overflowed reject
    with it, and the page shows it as an error event."""
    ada: DemoPage = open_page(blocked_lb)
    ada.join("Ada", room)
    expect(ada.event("transport")).to_have_count(1)
    outcome = ada.page.evaluate(
        """async (prefix) => {
            const client = window.pubsockDemo.client;
            const names = Array.from({ length: 60 }, (_, i) =>
                `${prefix}-${String(i).padStart(3, "0")}-`.padEnd(120, "x"));
            try {
                await Promise.all(names.map((name) => client.subscribe(name, () => {})));
                return { code: "opened" };
            } catch (error) {
                return { code: error.code, message: error.message };
            }
        }""",
        f"demo:{room}",
    )
    assert outcome["code"] == "refused", outcome
    assert "could not resume" in outcome["message"] and "the first" in outcome["message"]
    expect(ada.event("error")).to_have_count(1)
