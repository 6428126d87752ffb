"""`python -m bench.pubsub_bare publisher|subscriber`: google-cloud-pubsub with nothing around it.

- `publisher`: a paced loop of `PublisherClient.publish` with ordering keys, awaiting every
  result; the baseline of the publish API, and the producer of the ingest scenario. Bodies are
  pubsock envelopes (`{"id", "channel", "data", "ts"}`, attribute `channel`, ordering key =
  channel), so a socket pod can read them too.
- `subscriber`: a streaming pull on its own subscription (ordering enabled, the pod's flow
  control). `--mode ack` only acks (the ingest baseline); `--mode check` also reads each
  message's seq and scheduled time (the baseline of the full path's latency).

Both need PUBSUB_EMULATOR_HOST. Commands: publisher `run {topic, rate, duration_s, channels,
batch_latency_s}`; subscriber `count`, `reset`, `snapshot`; both `exit`.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from array import array
from concurrent.futures import Future
from typing import Any

import orjson
from google.cloud import pubsub_v1

from bench import control
from bench.generator import message_data
from bench.stats import quantiles
from services.core.envelope import Envelope
from services.core.ids import new_message_id

# The api's own publisher settings (services/core/broker/pubsub.py), so the baseline matches.
API_BATCH_MAX_MESSAGES = 100
API_BATCH_MAX_BYTES = 1_000_000
FLOW_CONTROL_MAX_MESSAGES = 2000  # the pod's
FLOW_CONTROL_MAX_BYTES = 64 * 1024 * 1024
RESULT_TIMEOUT_S = 30.0


def publisher_main(project: str) -> None:
    clients: dict[float, pubsub_v1.PublisherClient] = {}

    def client_for(batch_latency_s: float) -> pubsub_v1.PublisherClient:
        if batch_latency_s not in clients:
            clients[batch_latency_s] = pubsub_v1.PublisherClient(
                batch_settings=pubsub_v1.types.BatchSettings(
                    max_messages=API_BATCH_MAX_MESSAGES,
                    max_bytes=API_BATCH_MAX_BYTES,
                    max_latency=batch_latency_s,
                ),
                publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
            )
        return clients[batch_latency_s]

    next_seq = 0

    def run(command: dict[str, Any]) -> dict[str, Any]:
        nonlocal next_seq
        client = client_for(float(command.get("batch_latency_s", 0.002)))
        topic = f"projects/{project}/topics/{command['topic']}"
        rate = float(command["rate"])
        total = max(1, round(rate * float(command["duration_s"])))
        channels = [f"{command.get('prefix', 'bench')}-{i}" for i in range(command["channels"])]
        latencies = array("d")
        failures = 0
        lock = threading.Lock()
        settled = threading.Semaphore(0)

        def done(future: Future[str], started: float) -> None:
            nonlocal failures
            elapsed = time.perf_counter() - started
            with lock:
                if future.exception() is None:
                    latencies.append(elapsed)
                else:
                    failures += 1
            settled.release()

        first = next_seq
        start = time.monotonic()
        wall_start = time.time()
        sent = 0
        worst_late_s = 0.0
        while sent < total:
            now = time.monotonic()
            due = min(total, int((now - start) * rate) + 1)
            if due > sent:
                worst_late_s = max(worst_late_s, now - (start + sent / rate))
            while sent < due:
                channel = channels[next_seq % len(channels)]
                envelope = Envelope(
                    new_message_id(),
                    channel,
                    message_data(next_seq, wall_start + sent / rate),
                    int(time.time() * 1000),
                )
                started = time.perf_counter()
                future = client.publish(
                    topic, envelope.encode(), ordering_key=channel, **envelope.attributes()
                )
                future.add_done_callback(lambda f, s=started: done(f, s))
                next_seq += 1
                sent += 1
            if sent < total:
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        for _ in range(total):
            if not settled.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        with lock:
            return {
                "sent": total,
                "ok_count": len(latencies),
                "failed": failures,
                "first_seq": first,
                "last_seq": next_seq - 1,
                "elapsed_s": elapsed,
                "worst_late_s": worst_late_s,
                "latency": quantiles(latencies),
            }

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        if command["cmd"] == "run":
            return run(command)
        raise ValueError(f"unknown command {command['cmd']!r}")

    try:
        control.serve_blocking(handle, {"role": "publisher"})
    finally:
        for client in clients.values():
            client.stop()


def subscriber_main(project: str, topic: str, name: str, mode: str) -> None:
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(project, name)
    subscriber.create_subscription(
        request={
            "name": path,
            "topic": f"projects/{project}/topics/{topic}",
            "enable_message_ordering": True,
            "ack_deadline_seconds": 60,
        }
    )
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def reset() -> None:
        with lock:
            state.update(received=0, latencies=array("d"), last={}, backwards=0, seen=set())
            state["duplicates"] = 0

    reset()
    check = mode == "check"

    def on_message(message: Any) -> None:
        if check:
            now = time.time()
            body = orjson.loads(message.data)
            seq = body["data"]["seq"]
            channel = body["channel"]
            with lock:
                state["latencies"].append(now - body["data"]["t"])
                if seq in state["seen"]:
                    state["duplicates"] += 1
                state["seen"].add(seq)
                if seq <= state["last"].get(channel, -1):
                    state["backwards"] += 1
                state["last"][channel] = seq
                state["received"] += 1
        else:
            with lock:
                state["received"] += 1
        message.ack()

    streaming = subscriber.subscribe(
        path,
        callback=on_message,
        flow_control=pubsub_v1.types.FlowControl(
            max_messages=FLOW_CONTROL_MAX_MESSAGES, max_bytes=FLOW_CONTROL_MAX_BYTES
        ),
    )

    def handle(command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "count":
            with lock:
                return {"received": state["received"]}
        if name == "reset":
            reset()
            return {}
        if name == "snapshot":
            with lock:
                return {
                    "received": state["received"],
                    "duplicates": state["duplicates"],
                    "backwards": state["backwards"],
                    "latency": quantiles(state["latencies"]),
                }
        raise ValueError(f"unknown command {name!r}")

    try:
        control.serve_blocking(handle, {"role": "subscriber", "subscription": path})
    finally:
        streaming.cancel()
        with contextlib.suppress(Exception):  # cancelled: the expected way out
            streaming.result(timeout=10)
        subscriber.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=("publisher", "subscriber"))
    parser.add_argument("--project", default="local-project")
    parser.add_argument("--topic", default="")
    parser.add_argument("--subscription", default="")
    parser.add_argument("--mode", choices=("ack", "check"), default="ack")
    args = parser.parse_args()
    if args.role == "publisher":
        publisher_main(args.project)
    else:
        subscriber_main(args.project, args.topic, args.subscription, args.mode)


if __name__ == "__main__":
    main()
