"""pubsock on the real service's rules (the strict stand-in): publishing one ordering key per
request, warm start by seek and what happens when it fails, readiness under steady traffic, and
credentials that are refused reported as the broker being down. (What takes Pub/Sub away from
every pod, an outage, is in test_faults: the pods here are shared.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from devtools.cluster import LocalCluster, Service, free_port
from tests.support import WsClient, eventually, wait_metric


async def publish_all(api: httpx.AsyncClient, channel: str, count: int) -> list[str]:
    ids = []
    for n in range(count):
        response = await api.post(f"/v1/channels/{channel}/messages", json={"data": n})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


def log_records(service: Service) -> list[dict]:
    records = []
    for line in service.process.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


async def wait_for_log(service: Service, predicate, timeout_s: float = 30) -> dict:
    """The first JSON log record of `service` that matches `predicate`."""
    return await eventually(
        lambda: next((r for r in log_records(service) if predicate(r)), None),
        timeout_s,
        f"a matching log record of {service.name}",
        interval_s=0.2,
    )


@pytest.fixture
def new_pod(cluster: LocalCluster) -> Iterator:
    started: list[Service] = []

    def start(name: str, **env: str) -> Service:
        pod = cluster.new_socket(f"{name}-{len(started)}", free_port(), **env)
        started.append(pod)
        pod.start()
        return pod

    yield start
    for pod in started:
        pod.process.stop()


async def test_batches_across_channels_and_concurrent_publishes_are_accepted(cluster, api, channel):
    """The real service refuses a Publish mixing ordering keys: none of these may reach it."""
    assert cluster.strict is not None
    refused_before = cluster.strict.state()["refused"].get("publish", 0)
    channels = [f"{channel}-{n}" for n in range(5)]
    batch = await api.post(
        "/v1/messages", json={"messages": [{"channel": c, "data": c} for c in channels * 2]}
    )
    assert batch.status_code == 202, batch.text
    answers = await asyncio.gather(
        *(
            api.post(f"/v1/channels/{channel}-c{n % 20}/messages", json={"data": n})
            for n in range(200)
        )
    )
    assert [a.status_code for a in answers] == [202] * 200
    assert cluster.strict.state()["refused"].get("publish", 0) == refused_before


async def test_a_new_pod_is_warm_by_seek(cluster, api, channel, new_pod):
    """The stand-in replays nothing to a new subscription: only the seek fills the history."""
    before_ms = int(time.time() * 1000) - 100
    ids = await publish_all(api, channel, 30)
    pod = new_pod("warm")
    live = await WsClient.connect(pod.ws_url)
    await live.subscribe(channel)
    by_id = await WsClient.connect(pod.ws_url)
    frame = await by_id.subscribe(channel, since=ids[4])
    assert frame["recovered"] is True
    assert [f["id"] for f in await by_id.messages(25)] == ids[5:]
    by_time = await WsClient.connect(pod.ws_url)
    frame = await by_time.subscribe(channel, since=f"@{before_ms}")
    assert frame["recovered"] is True
    assert [f["id"] for f in await by_time.messages(30)] == ids
    await live.assert_quiet(0.5)  # the replay is history, never live


async def test_a_new_pod_whose_seek_fails_says_recovered_false(cluster, api, channel, new_pod):
    """No seek, no history before the subscription: never `recovered: true` across the gap."""
    assert cluster.strict is not None
    before_ms = int(time.time() * 1000) - 100
    ids = await publish_all(api, channel, 30)
    cluster.strict.control("seek-fails", on=1)
    try:
        pod = new_pod("cold")
    finally:
        cluster.strict.control("seek-fails", on=0)
    for since in (ids[4], f"@{before_ms}"):
        client = await WsClient.connect(pod.ws_url)
        frame = await client.subscribe(channel, since=since)
        assert frame["recovered"] is False, since
        await client.close()
    client = await WsClient.connect(pod.ws_url)
    await client.subscribe(channel)
    after = await publish_all(api, channel, 1)
    assert [f["id"] for f in await client.messages(1)] == after


async def test_no_warm_start_from_a_topic_without_retention(cluster, new_pod):
    """A seek before what the topic retains succeeds and replays nothing: a pod must not take it
    as history, whatever TOPIC_RETENTION_S says."""
    topic = f"no-retention-{time.time_ns()}"
    await asyncio.to_thread(cluster.emulator.create_topic, topic, 0)
    before_ms = int(time.time() * 1000) - 100
    pod = new_pod("unretained", PUBSUB_TOPIC=topic, TOPIC_RETENTION_S="3600")
    await wait_for_log(pod, lambda r: "no warm start" in r.get("message", ""))
    client = await WsClient.connect(pod.ws_url)
    frame = await client.subscribe("room:unretained", since=f"@{before_ms}")
    assert frame["recovered"] is False


async def test_steady_traffic_does_not_hold_a_new_pod_back(cluster, api, channel, new_pod):
    """Live messages are not backlog: a pod started under 20 messages/s turns ready once the
    seek's backlog is quiet, not at WARM_START_TIMEOUT_S."""
    stop = asyncio.Event()

    async def steady() -> None:
        n = 0
        while not stop.is_set():
            await api.post(f"/v1/channels/{channel}/messages", json={"data": n})
            n += 1
            await asyncio.sleep(0.05)

    publisher = asyncio.create_task(steady())
    try:
        pod = await asyncio.to_thread(new_pod, "steady", WARM_START_TIMEOUT_S="120")
        record = await wait_for_log(pod, lambda r: r.get("message") == "warm start done")
        assert record["backlog_over"] is True
    finally:
        stop.set()
        await publisher
    assert pod.process.running


@pytest.fixture
def own_api(cluster: LocalCluster) -> Iterator:
    started: list[Service] = []

    def start(name: str, account: str = "default", wait: bool = True, **env: str) -> Service:
        assert cluster.strict is not None
        settings = {**cluster.strict.env(account), "BROKER_PROBE_INTERVAL_S": "0.5", **env}
        service = cluster.new_api(name, free_port(), **settings)
        started.append(service)
        service.start(wait_ready=wait)
        return service

    yield start
    for service in started:
        service.process.stop()


@pytest.mark.parametrize(
    ("account", "said"),
    [("nobody", "UNAUTHENTICATED"), ("publisher-only", "pubsub.topics.get")],
)
async def test_refused_credentials_show_the_broker_down_and_say_why(
    own_api, channel, account, said
):
    api = own_api(f"api-{account}", account=account)
    await wait_metric(api.url, "pubsock_broker_up", lambda up: up == 0, 20)
    record = await wait_for_log(api, lambda r: r.get("severity") == "ERROR")
    assert said in json.dumps(record)
    if account == "publisher-only":  # may publish; only the probe's GetTopic is refused
        async with httpx.AsyncClient(base_url=api.url, timeout=15) as client:
            answer = await client.post(f"/v1/channels/{channel}/messages", json={"data": 1})
        assert answer.status_code == 202


async def test_a_pod_refused_by_pubsub_backs_off_and_says_what_to_fix(cluster):
    assert cluster.strict is not None
    pod = cluster.new_socket("refused-pod", free_port(), **cluster.strict.env("denied"))
    pod.start(wait_ready=False)
    try:
        await wait_metric(pod.url, "pubsock_broker_refusals_total", lambda n: n >= 3, unreachable=0)
        record = await wait_for_log(pod, lambda r: r.get("severity") == "ERROR")
        assert (
            "PERMISSION_DENIED" in record["message"]
            and "pubsub.subscriptions.create" in record["message"]
        )
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{pod.url}/readyz")).status_code == 503
    finally:
        pod.process.stop()
