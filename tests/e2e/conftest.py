"""Browser-test fixtures: what `make run` starts, driven by Debian's Chromium through Playwright.

One cluster for the whole package (emulator, api, two socket pods, HAProxy with the GCLB-like
affinity cookie, make run's demo credentials); every page goes through the load balancer's URL.
Tests that kill or drain a pod leave it down; the `pods_up` fixture brings it back on the same
port before the next test. Playwright lives only as long as this package's tests: its sync API
marks its own event loop as running, which the async tests elsewhere must never see.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from devtools.cluster import LocalCluster, emulator_available

pytestmark = pytest.mark.integration


def _missing() -> str | None:
    from tests.e2e.support import CHROMIUM

    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (scripts/system-deps.sh installs Debian's chromium)"
    if not emulator_available():
        return "the Pub/Sub emulator is not installed"
    return None


_reason = _missing()
if _reason:
    if os.environ.get("CI"):
        raise RuntimeError(f"the browser tests cannot run in CI: {_reason}")
    pytest.skip(_reason, allow_module_level=True)

from playwright.sync_api import Browser  # noqa: E402

from tests.e2e.support import (  # noqa: E402
    DemoPage,
    Publisher,
    chromium,
    ensure_pods_up,
    make_run_cluster,
)

_rooms = itertools.count(1)


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
    """A room (channel demo:<room>) no other test uses."""
    return f"{request.node.name[:40]}-{next(_rooms)}-{os.getpid()}"


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
