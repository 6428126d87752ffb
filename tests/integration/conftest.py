"""Integration fixtures: the real Pub/Sub emulator, api and socket processes on free ports."""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from devtools.cluster import ClusterConfig, LocalCluster, emulator_available, free_port

pytestmark = pytest.mark.integration

if not emulator_available():
    if os.environ.get("CI"):
        raise RuntimeError("the Pub/Sub emulator is required in CI (gcloud pubsub-emulator)")
    pytest.skip("the Pub/Sub emulator is not installed", allow_module_level=True)

TEST_SOCKET_ENV = {
    "SEND_BUFFER_MAX_BYTES": "65536",
    "DRAIN_CLOSE_WINDOW_S": "1",
    "POSITION_SLACK_MS": "500",
    "MAX_FRAME_BYTES": "8192",
}
TEST_API_ENV = {"PUBLISH_TIMEOUT_S": "5"}

_channels = itertools.count(1)


@pytest.fixture
def channel(request: pytest.FixtureRequest) -> str:
    """A channel name no other test uses."""
    return f"test:{request.node.name[:60]}-{next(_channels)}".replace("[", "_").replace("]", "_")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    config = ClusterConfig(
        api_port=free_port(),
        socket_ports=(free_port(), free_port()),
        lb_port=free_port(),
        emulator_port=free_port(),
        socket_env=TEST_SOCKET_ENV,
        api_env=TEST_API_ENV,
    )
    with LocalCluster(config) as running:
        yield running


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=cluster.api.url, timeout=15) as client:
        yield client
