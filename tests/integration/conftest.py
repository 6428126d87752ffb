"""Integration fixtures: the real Pub/Sub emulator, api and socket processes on free ports."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devtools.cluster import LocalCluster, Service, free_port
from tests.support import cluster_on_free_ports, emulator_missing, mint, require

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
