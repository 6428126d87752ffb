"""A page whose socket pod dies (SIGKILL) or drains (SIGTERM, 1012) moves to the other pod and
shows every message published meanwhile, in order, once."""

from __future__ import annotations

import signal
import time

from playwright.sync_api import expect

from tests.e2e.support import DELIVERY_MS, FAILOVER_MS, DemoPage, open_on_two_pods

DRAIN_PUBLISH_MAX = 150  # messages published while the drain and the reconnect go on (a bound)
DRAIN_DEADLINE_S = 30


def _serving(pods, page: DemoPage):
    """The socket pod serving `page` (by the name in #pod) and the other one."""
    by_name = {pod.env["POD_NAME"]: pod for pod in pods}
    victim = by_name[page.pod()]
    (survivor,) = (pod for name, pod in by_name.items() if name != page.pod())
    return victim, survivor


def _assert_resumed_without_gap(page: DemoPage, survivor_name: str) -> None:
    expect(page.page.locator("#pod")).to_have_text(survivor_name)
    expect(page.page.locator("#connection")).to_have_attribute("data-state", "open")
    assert page.event_texts("reconnecting"), "the page never noticed its connection was lost"
    expect(page.event("recovered")).not_to_have_count(0)
    expect(page.event("gap")).to_have_count(0)
    expect(page.page.locator('#messages li[data-testid="gap-note"]')).to_have_count(0)


def test_sigkilled_pod_page_resumes_on_other_pod_in_order_once(pods_up, open_page, room, publisher):
    """After SIGKILL of its pod a page reconnects to the other pod and shows every message once, in order."""
    ada, grace = open_on_two_pods(open_page)
    ada.join("Ada", room)
    grace.join("Grace", room)
    victim, survivor = _serving(pods_up, ada)
    survivor_name = survivor.env["POD_NAME"]
    assert grace.pod() == survivor_name

    texts = ["before the crash"]
    ids = [ada.send(texts[0])]
    ada.expect_texts(texts)

    victim.process.kill()  # SIGKILL to the process group: no close frame, no drain
    for i in range(1, 4):  # published while Ada's page has no connection (or a dead one)
        texts.append(f"while Ada is away {i}")
        ids.append(publisher.publish(ada.channel, texts[-1]))
    expect(ada.page.locator("#pod")).to_have_text(survivor_name, timeout=FAILOVER_MS)
    for i in range(1, 3):  # and after she is back, on the other pod
        texts.append(f"after the failover {i}")
        ids.append(publisher.publish(ada.channel, texts[-1]))
    texts.append("from Grace")
    ids.append(grace.send(texts[-1]))

    for page in (ada, grace):
        page.expect_texts(texts, timeout_ms=FAILOVER_MS)
        assert page.message_ids() == ids  # the same ids, in order, none twice
    _assert_resumed_without_gap(ada, survivor_name)
    assert any("1006" in text for text in ada.event_texts("reconnecting"))
    # Grace's pod was not touched: her connection never dropped.
    expect(grace.event("reconnecting")).to_have_count(0)


def test_drained_pod_page_reconnects_without_gap(pods_up, open_page, room, publisher):
    """A 1012 drain (SIGTERM) moves the page to the other pod; messages published meanwhile all appear once, in order."""
    ada, grace = open_on_two_pods(open_page)
    ada.join("Ada", room)
    grace.join("Grace", room)
    victim, survivor = _serving(pods_up, ada)
    survivor_name = survivor.env["POD_NAME"]

    texts = ["before the drain"]
    ids = [publisher.publish(ada.channel, texts[0])]
    ada.expect_texts(texts)

    victim.process.signal(signal.SIGTERM)
    # Publish without pause for as long as the drain and Ada's reconnect take (bounded).
    deadline = time.monotonic() + DRAIN_DEADLINE_S
    while len(texts) < DRAIN_PUBLISH_MAX and time.monotonic() < deadline:
        texts.append(f"during the drain {len(texts)}")
        ids.append(publisher.publish(ada.channel, texts[-1]))
        if not victim.process.running and ada.pod() == survivor_name:
            break
    assert not victim.process.running, "the drained pod did not exit"
    assert victim.process.wait(0) == 0, victim.process.log_tail()
    expect(ada.page.locator("#pod")).to_have_text(survivor_name, timeout=FAILOVER_MS)
    texts.append("after the drain")
    ids.append(publisher.publish(ada.channel, texts[-1]))

    for page in (ada, grace):
        page.expect_texts(texts, timeout_ms=FAILOVER_MS)
        assert page.message_ids() == ids
    _assert_resumed_without_gap(ada, survivor_name)
    reconnects = ada.event_texts("reconnecting")
    assert any("(1012)" in text for text in reconnects), reconnects
    assert len(texts) > 3, "the drain was over before anything was published during it"
    expect(grace.event("reconnecting")).to_have_count(0)
    expect(ada.message(ids[-1])).to_have_attribute("data-status", "delivered", timeout=DELIVERY_MS)
