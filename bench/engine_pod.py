"""`python -m bench.engine_pod`: one real socket pod (`services.socket.pod.Pod`) on the in-process
`MemoryBroker`, fed by the bench generator running inside the same process.

What it measures is the pod's own fan-out engine: envelope decode, history, framing once and the
writes to every session, with no Pub/Sub in the way. The generator publishes envelopes exactly
as the api does (Envelope.encode, ordering key = channel, attribute `channel`).

Commands (one JSON line each, see bench.control): `run {rate, duration_s}`, `burst {count,
channel?}` (another channel: its own sequence from 0, e.g. the history a rewind reads), `stats`,
`exit`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from bench import control
from bench.generator import BURST_RATE, LoopLagMonitor, PacedGenerator, message_data
from devtools.waiting import WaitTimeout, eventually
from services.core.broker import OutgoingMessage
from services.core.broker.memory import MemoryBroker
from services.core.envelope import Envelope
from services.core.ids import new_message_id
from services.socket.pod import Pod
from services.socket.settings import SocketSettings


async def main(args: argparse.Namespace) -> None:
    nofile = control.raise_nofile_limit()
    broker = MemoryBroker()
    settings = SocketSettings(
        broker="memory",
        host="127.0.0.1",
        port=0,
        pod_name="bench-engine",
        log_level="WARNING",
    )
    pod = Pod(settings, broker)
    await pod.start()
    channel = args.channel
    last_id = ""

    def emitter(target: str) -> Callable[[int, float], Awaitable[None]]:
        async def emit(seq: int, scheduled_s: float) -> None:
            nonlocal last_id
            envelope = Envelope(
                new_message_id(), target, message_data(seq, scheduled_s), int(time.time() * 1000)
            )
            last_id = envelope.id
            await broker.publish(OutgoingMessage(envelope.encode(), target, envelope.attributes()))

        return emit

    generator = PacedGenerator(emitter(channel))
    monitor = LoopLagMonitor()
    monitor.start()

    def stats() -> dict[str, Any]:
        registry = pod.metrics.registry
        return {
            "sessions": len(pod.sessions),
            "subscribers": pod.hub.session_count(channel),
            "frames_sent": registry.get_sample_value("pubsock_frames_sent_total") or 0,
            "slow_closes": registry.get_sample_value("pubsock_slow_consumer_closes_total") or 0,
            "history": pod.history.message_count,
            "delivery_lag_sum_s": registry.get_sample_value("pubsock_delivery_lag_seconds_sum"),
            "delivery_lag_count": registry.get_sample_value("pubsock_delivery_lag_seconds_count"),
        }

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "run":
            monitor.take()
            result = await generator.run(float(command["rate"]), float(command["duration_s"]))
            return {**result, **monitor.take()}
        if name == "burst":
            target = command.get("channel", channel)
            source = generator if target == channel else PacedGenerator(emitter(target))
            result = await source.run(BURST_RATE, int(command["count"]) / BURST_RATE)
            # the pump hands it to history on one of its next turns
            with contextlib.suppress(WaitTimeout):
                await eventually(
                    lambda: pod.history.contains(target, last_id), 10, "the burst in history"
                )
            return {
                **result,
                "last_id": last_id,
                "in_history": pod.history.contains(target, last_id),
            }
        if name == "stats":
            return stats()
        raise ValueError(f"unknown command {name!r}")

    await control.serve(handle, {"port": pod.port, "nofile": nofile, "server": "pubsock-pod"})
    # No drain: the bench closes its clients first; a drain would only wait for them.


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channel", default="bench")
    namespace = parser.parse_args()
    os.environ.setdefault("BROKER", "memory")
    uvloop.run(main(namespace))
