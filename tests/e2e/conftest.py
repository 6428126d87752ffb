"""Browser-test fixtures: what `make run` starts, driven by Debian's Chromium through Playwright.

One cluster for the whole package (emulator, api, two socket pods, HAProxy with the GCLB-like
affinity cookie, make run's demo credentials); every page goes through the load balancer's URL.
Tests that kill or drain a pod leave it down; the `pods_up` fixture brings it back on the same
port before the next test. Playwright lives only as long as this package's tests: its sync API
marks its own event loop as running, which the async tests elsewhere must never see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Browser

from devtools.cluster import LocalCluster
from tests.e2e.support import CHROMIUM, DemoPage, Publisher, chromium
from tests.support import emulator_missing, ensure_pods_up, make_run_cluster, require, unique_name

pytestmark = pytest.mark.integration

require(
    f"{CHROMIUM} is missing (scripts/system-deps.sh installs Debian's chromium)"
    if not CHROMIUM.exists()
    else emulator_missing(),
    "the browser tests",
)


@pytest.fixture(scope="package")
def e2e_cluster() -> Iterator[LocalCluster]:
    with make_run_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    with chromium() as running:
        yield running


@pytest.fixture
def lb_url(e2e_cluster: LocalCluster) -> str:
    assert e2e_cluster.lb is not None
    return e2e_cluster.lb.url


@pytest.fixture
def pods_up(e2e_cluster: LocalCluster, lb_url: str) -> list:
    """Both socket pods running and routed to by the load balancer (restarted if a test before
    killed or drained one)."""
    ensure_pods_up(lb_url, e2e_cluster.sockets)
    return e2e_cluster.sockets


@pytest.fixture
def publisher(lb_url: str) -> Iterator[Publisher]:
    client = Publisher(lb_url)
    yield client
    client.close()


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    """A room of the demo page (its channel is demo:<room>) no other test uses."""
    return unique_name(request.node.name)


@pytest.fixture
def open_page(browser: Browser, lb_url: str) -> Iterator[Callable[..., DemoPage]]:
    """Opens the demo page through the load balancer in a fresh browser context; every page is
    closed after the test, which fails if any page threw an uncaught error."""
    pages: list[DemoPage] = []

    def opener(base_url: str | None = None) -> DemoPage:
        page = DemoPage.open(browser, base_url or lb_url)
        pages.append(page)
        return page

    yield opener
    errors = {p.name or f"page {i}": p.errors for i, p in enumerate(pages) if p.errors}
    for page in pages:
        page.close()
    assert not errors, f"uncaught errors in the demo page: {errors}"
