"""Integration fixtures: the real Pub/Sub emulator, api and socket processes on free ports."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devtools.cluster import LocalCluster, Service, free_port
from tests.support import cluster_on_free_ports, emulator_missing, metric, mint, require

pytestmark = pytest.mark.integration

require(emulator_missing(), "tests/integration")

TEST_SOCKET_ENV = {
    "SEND_BUFFER_MAX_BYTES": "65536",
    "DRAIN_CLOSE_WINDOW_S": "1",
    "POSITION_SLACK_MS": "500",
    "MAX_FRAME_BYTES": "8192",
    "CLOSE_TIMEOUT_S": "1",
}
TEST_API_ENV = {"PUBLISH_TIMEOUT_S": "5"}


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    with cluster_on_free_ports(socket_env=TEST_SOCKET_ENV, api_env=TEST_API_ENV) as running:
        yield running


# Marks a pod makes when it cannot prove its stream unbroken. Tests share the session cluster's
# pods and some assert that their history is whole (a rewind's `complete`), so a test that takes
# Pub/Sub away long enough to leave such a mark belongs on a cluster of its own (test_faults).
BREAK_MARKS = ("pubsock_deaf_total", "pubsock_unprovable_breaks_total")


@pytest.fixture(autouse=True)
async def shared_pods_stay_unbroken(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails a test on the session cluster after which one of its socket pods counts a new
    break mark, so that the test that takes Pub/Sub away is named rather than a later one that
    trips over the mark. A deaf mark comes up to DEAF_AFTER_S after its cause, so it may still
    land on the next test; the message says what to look for."""
    if "cluster" not in request.fixturenames:
        yield
        return
    cluster: LocalCluster = request.getfixturevalue("cluster")
    # A pod that does not answer counts as many marks as can be: it never looks like a new one.
    before = [await metric(pod.url, BREAK_MARKS, unreachable=math.inf) for pod in cluster.sockets]
    yield
    after = [await metric(pod.url, BREAK_MARKS, unreachable=math.inf) for pod in cluster.sockets]
    for pod, old, new in zip(cluster.sockets, before, after, strict=True):
        assert new <= old or new == math.inf, (
            f"{pod.name} of the shared cluster counts new break marks {BREAK_MARKS} "
            f"({old:g} -> {new:g}) after this test or the one before: a fault that breaks the "
            "shared pods' streams goes on a cluster of its own (test_faults)"
        )


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.api.url, timeout=15) as client:
        yield client


KEYS = ("key-main", "key-rate", "key-mint")
ORIGIN = "https://good.example"


class Secure:
    """An api and a socket pod with keys, tokens, demo tokens and small limits (same emulator)."""

    def __init__(self, api: Service, socket: Service, secret: str) -> None:
        self.api = api
        self.socket = socket
        self.token = functools.partial(mint, secret=secret)

    def ws_url(self, token: str | None) -> str:
        return self.socket.ws_url + (f"?token={token}" if token else "")


@pytest.fixture(scope="module")
def secure(cluster: LocalCluster, token_secret: str) -> Iterator[Secure]:
    common = {
        "API_KEYS": ",".join(KEYS),
        "TOKEN_SECRET": token_secret,
        "ALLOWED_ORIGINS": ORIGIN,
        "TOKEN_TTL_MAX_S": "3600",
    }
    api_port, socket_port = free_port(), free_port()
    api = cluster.new_api(
        "api-secure", api_port, **common, PUBLISH_RATE_PER_S="20", PUBLISH_BURST="40"
    )
    socket = cluster.new_socket(
        "socket-secure",
        socket_port,
        **common,
        DEMO_TOKENS="1",
        DEMO_TOKEN_TTL_S="60",
        MAX_CONNECTIONS="12",
        CLIENT_FRAMES_PER_S="5",
        CLIENT_FRAMES_BURST="10",
        MAX_SUBSCRIPTIONS_PER_CONNECTION="3",
    )
    api.start(wait_ready=False)
    socket.start()
    api.wait_ready()
    try:
        yield Secure(api, socket, token_secret)
    finally:
        api.process.stop()
        socket.process.stop()
