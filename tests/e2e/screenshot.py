"""Saves a screenshot of the demo chat (docs/demo.png): two people on two socket pods talking.

    .venv/bin/python -m tests.e2e.screenshot [output.png]

Starts what `make run` starts (on free ports), opens two browser contexts through the load
balancer in Debian's Chromium, lets them chat, and captures one page at 1280x800 with the
conversation, presence and connection events visible.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import expect

from devtools.cluster import ROOT
from tests.e2e.support import (
    PRESENCE_MS,
    DemoPage,
    Publisher,
    chromium,
    open_on_two_pods,
)
from tests.support import make_run_cluster

OUTPUT = ROOT / "docs" / "demo.png"


def conversation(ada_pod: str, grace_pod: str) -> list[tuple[str, str]]:
    return [
        ("Grace", "Morning Ada! Are you on the new socket pods yet?"),
        ("Ada", f"Yes, {ada_pod} serves my tab. You?"),
        ("Grace", f"{grace_pod}. And still I see every message of yours, in order."),
        ("Ada", "Every pod gets every message from Pub/Sub, so it does not matter where we land."),
        ("Grace", "If my pod restarts, I reconnect with since and nothing is missed."),
    ]


def main(output: Path = OUTPUT) -> None:
    with make_run_cluster() as cluster, chromium() as browser:
        assert cluster.lb is not None
        opened: list[DemoPage] = []

        def open_page() -> DemoPage:
            opened.append(DemoPage.open(browser, cluster.lb.url))
            return opened[-1]

        ada, grace = open_on_two_pods(open_page)
        ada.join("Ada", "lobby")
        grace.join("Grace", "lobby")
        pages = {"Ada": ada, "Grace": grace}
        texts = []
        for name, text in conversation(ada.pod(), grace.pod()):
            pages[name].send(text)
            texts.append(text)
            ada.expect_texts(texts)
        publisher = Publisher(cluster.lb.url)
        texts.append("Deploy finished: both socket pods are on the new version.")
        publisher.publish(ada.channel, texts[-1])
        publisher.close()
        for page in (ada, grace):
            page.expect_texts(texts)
            expect(page.page.locator("#presence-count")).to_have_text("2", timeout=PRESENCE_MS)
            expect(page.page.locator("#presence-members li")).to_have_count(2)
        # A presence snapshot can currently log a spurious "Grace left" (a server bug): say so.
        if ada.event("leave").count():
            print("warning: the event log shows a leave; run again for a clean picture")
        ada.page.locator("#message-input").fill("See you at the standup")
        output.parent.mkdir(parents=True, exist_ok=True)
        ada.page.screenshot(path=str(output))
        for page in opened:
            page.close()
    print(f"saved {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)
