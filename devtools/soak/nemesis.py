"""The nemesis: faults at random moments drawn from the seed, several at once when the draw says
so, as production has them (a deploy drains pods while a node dies and the pull stream restarts).

Kinds: `kill_pod` (SIGKILL, its subscription swept as its expiry would, a new pod started in its
place: a warm start), `drain_pod` (SIGTERM, then a new pod), `close_streams`, `unavailable` (every
Pub/Sub call answers UNAVAILABLE for a few seconds), `stall` (one pod's pull delivers nothing until
the pod goes deaf and opens a new stream), `cut` (a share of the clients' TCP connections reset by
the proxy), `kill_api` (SIGKILL the api, start it again). The emulator is never restarted: that
loses accepted messages, which the real service never does.

Every fault is logged with its start and end (ms) and the pod it hit, for the checker and the
report.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from devtools.cluster import PROJECT, TOPIC, LocalCluster, Service, emulator_env

KINDS: dict[str, float] = {  # relative weights
    "kill_pod": 2,
    "drain_pod": 2,
    "close_streams": 2,
    "unavailable": 1.5,
    "stall": 1.5,
    "cut": 2,
    "kill_api": 1,
}
POD_KINDS = ("kill_pod", "drain_pod", "stall")
MAX_PODS_DOWN = 2  # of three: one always serves


def now_ms() -> float:
    return time.time() * 1000


@dataclass
class Slot:
    """One of the three pod places behind the load balancer (a fixed port); instances change."""

    index: int
    service: Service
    generation: int = 1
    busy: bool = False  # being replaced or stalled

    @property
    def pod(self) -> str:
        return self.service.env["POD_NAME"]


@dataclass
class Nemesis:
    cluster: LocalCluster
    seed: int
    mean_gap_s: float
    cut: Callable[[float], int]
    faults: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)  # every pod instance: name, log, pid
    slots: list[Slot] = field(default_factory=list)
    deaf_after_s: float = 5.0

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self.slots = [Slot(i, s) for i, s in enumerate(self.cluster.sockets)]
        for slot in self.slots:
            self._remember(slot.service)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    def _remember(self, service: Service) -> None:
        self.pods.append(
            {
                "pod": service.env["POD_NAME"],
                "log": str(service.process.log_path),
                "pid": service.process.popen.pid if service.process.popen else None,
                "port": service.port,
            }
        )

    def _record(self, kind: str, start: float, end: float, **detail: Any) -> None:
        self.faults.append({"kind": kind, "start_ms": start, "end_ms": end, **detail})

    # -- the schedule --------------------------------------------------------------------------
    async def run(self) -> None:
        kinds = list(KINDS)
        weights = [KINDS[k] for k in kinds]
        while not self._stop.is_set():
            gap = self.random.expovariate(1 / self.mean_gap_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), gap)
            if self._stop.is_set():
                break
            kind = self.random.choices(kinds, weights)[0]
            slot_choice = self.random.randrange(len(self.slots))
            detail = self.random.random()
            task = asyncio.ensure_future(self._inject(kind, slot_choice, detail))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """No new faults; wait for those under way (pods replaced, stalls ended)."""
        self._stop.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        strict = self.cluster.strict
        assert strict is not None
        await asyncio.to_thread(strict.control, "unstall")

    async def _inject(self, kind: str, choice: int, detail: float) -> None:
        if kind in POD_KINDS:
            free = [s for s in self.slots if not s.busy]
            down = len(self.slots) - len(free)
            if not free or (kind != "stall" and down >= MAX_PODS_DOWN):
                kind = "close_streams"  # no pod to spare: a stream fault instead
            else:
                slot = free[choice % len(free)]
                await {
                    "kill_pod": self._kill_pod,
                    "drain_pod": self._drain_pod,
                    "stall": self._stall,
                }[kind](slot)
                return
        start = now_ms()
        strict = self.cluster.strict
        assert strict is not None
        if kind == "close_streams":
            answer = await asyncio.to_thread(strict.control, "close-streams")
            self._record(kind, start, now_ms(), closed=answer.get("closed"))
        elif kind == "unavailable":
            seconds = round(2 + 6 * detail, 1)
            await asyncio.to_thread(strict.control, "unavailable", seconds=seconds)
            self._record(kind, start, start + seconds * 1000, seconds=seconds)
        elif kind == "cut":
            share = round(0.2 + 0.4 * detail, 2)
            count = await asyncio.to_thread(self.cut, share)
            self._record(kind, start, now_ms(), share=share, connections=count)
        elif kind == "kill_api":
            api = self.cluster.api
            api.process.kill()
            await asyncio.to_thread(api.start, True, 60.0)
            self._record(kind, start, now_ms())

    async def _kill_pod(self, slot: Slot) -> None:
        slot.busy = True
        start = now_ms()
        pod = slot.pod
        try:
            slot.service.process.kill()
            await asyncio.to_thread(self._sweep, pod)
            await self._replace(slot)
        finally:
            slot.busy = False
        self._record("kill_pod", start, now_ms(), pod=pod, new_pod=slot.pod)

    async def _drain_pod(self, slot: Slot) -> None:
        slot.busy = True
        start = now_ms()
        pod = slot.pod
        try:
            slot.service.process.signal(15)
            code = await asyncio.to_thread(slot.service.process.wait, 60)
            if code is None:  # a drain that hangs is a finding: the log says so
                slot.service.process.kill()
            await self._replace(slot)
        finally:
            slot.busy = False
        self._record("drain_pod", start, now_ms(), pod=pod, new_pod=slot.pod, exit_code=code)

    async def _stall(self, slot: Slot) -> None:
        slot.busy = True
        start = now_ms()
        strict = self.cluster.strict
        assert strict is not None
        try:
            answer = await asyncio.to_thread(
                strict.control, "stall", subscription=f"pubsock-{slot.pod}-"
            )
            # The pod goes deaf after DEAF_AFTER_S and opens a new stream; the stalled one is
            # released a while later (it may still hold unacknowledged messages).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.deaf_after_s * 3)
            await asyncio.to_thread(strict.control, "unstall")
        finally:
            slot.busy = False
        self._record("stall", start, now_ms(), pod=slot.pod, streams=answer.get("stalled"))

    async def _replace(self, slot: Slot) -> None:
        """A new pod in the slot's place (same port, new name): a warm start by seek."""
        slot.generation += 1
        name = f"socket-{slot.index + 1}g{slot.generation}"
        service = self.cluster.new_socket(name, slot.service.port)
        self.cluster.sockets[slot.index] = service
        slot.service = service
        await asyncio.to_thread(service.start, True, 90.0)
        self._remember(service)

    def _sweep(self, pod: str) -> None:
        """Deletes a killed pod's subscription, as its expiry (1 day unused) would."""
        from google.cloud import pubsub_v1

        with emulator_env(self.cluster.emulator.host):
            publisher = pubsub_v1.PublisherClient()
            subscriber = pubsub_v1.SubscriberClient()
            try:
                names = publisher.list_topic_subscriptions(
                    request={"topic": f"projects/{PROJECT}/topics/{TOPIC}"}
                )
                for name in names:
                    if name.rsplit("/", 1)[-1].startswith(f"pubsock-{pod}-"):
                        with contextlib.suppress(Exception):
                            subscriber.delete_subscription(request={"subscription": name})
            finally:
                subscriber.close()
                publisher.stop()
