"""socket.io fixtures: what `make run` starts (emulator, api, two socket pods, HAProxy with the
affinity cookie, make run's credentials) on free ports, and real socket.io-client sockets in Node.

`npm ci` runs here when tests/socketio/node_modules is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devtools.cluster import LocalCluster
from devtools.run import DEMO_ENV, DEMO_KEY
from tests.socketio.support import SioDriver, install_node_modules
from tests.support import emulator_missing, make_run_cluster, require

SOCKET_ENV = {
    "DRAIN_CLOSE_WINDOW_S": "1",
    "CLOSE_TIMEOUT_S": "1",
    "POSITION_SLACK_MS": "500",
}


@pytest.fixture(scope="session")
def token_secret() -> str:
    """make run's: the cluster here runs with its demo credentials."""
    return DEMO_ENV["TOKEN_SECRET"]


@pytest.fixture(scope="package")
def node() -> None:
    """Node and the socket.io client (`npm ci` when node_modules is missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        require("Node and npm are required", "tests/socketio")
    install_node_modules()


@pytest.fixture(scope="package")
def sio_cluster(node: None) -> Iterator[LocalCluster]:
    require(emulator_missing(), "tests/socketio")
    with make_run_cluster(**SOCKET_ENV) as cluster:
        yield cluster


@pytest.fixture
async def driver(node: None) -> AsyncIterator[SioDriver]:
    running = await SioDriver.start()
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def api(sio_cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    """The publish API through the load balancer, with make run's publisher key."""
    assert sio_cluster.lb is not None
    async with httpx.AsyncClient(
        base_url=sio_cluster.lb.url,
        headers={"Authorization": f"Bearer {DEMO_KEY}"},
        timeout=15,
    ) as client:
        yield client
