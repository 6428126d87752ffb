"""socket.io fixtures: what `make run` starts (emulator, api, two socket pods, HAProxy with the
affinity cookie, make run's credentials) on free ports, and real socket.io-client sockets in Node.

`npm ci` runs here when tests/socketio/node_modules is missing.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devtools.cluster import ClusterConfig, LocalCluster, emulator_available, free_port
from devtools.run import DEMO_ENV, DEMO_KEY
from services.core.auth import mint_token
from tests.socketio.support import SioDriver, install_node_modules

SECRET = DEMO_ENV["TOKEN_SECRET"]
SOCKET_ENV = {
    "DRAIN_CLOSE_WINDOW_S": "1",
    "CLOSE_TIMEOUT_S": "1",
    "POSITION_SLACK_MS": "500",
}

_rooms = itertools.count(1)


def _missing() -> str | None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "Node and npm are required"
    if not emulator_available():
        return "the Pub/Sub emulator is not installed"
    return None


@pytest.fixture(scope="package")
def sio_cluster() -> Iterator[LocalCluster]:
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            raise RuntimeError(f"tests/socketio cannot run in CI: {reason}")
        pytest.skip(reason)
    install_node_modules()
    config = ClusterConfig(
        api_port=free_port(),
        socket_ports=(free_port(), free_port()),
        lb_port=free_port(),
        emulator_port=free_port(),
        extra_env=dict(DEMO_ENV),
        socket_env=SOCKET_ENV,
    )
    with LocalCluster(config) as cluster:
        yield cluster


@pytest.fixture
async def driver() -> AsyncIterator[SioDriver]:
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


@pytest.fixture
def room(request: pytest.FixtureRequest) -> str:
    return f"room:{request.node.name[:40]}-{next(_rooms)}".replace("[", "_").replace("]", "_")


def token(sub: str = "ann", channels=("room:*",), publish=(), ttl_s: int = 600) -> str:
    return mint_token(SECRET, sub, list(channels), list(publish), ttl_s)[0]
