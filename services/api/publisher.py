"""Publishing as the API sees it: the broker plus the metrics and the liveness signal around it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from services.api.metrics import ApiMetrics
from services.core.broker import Broker, BrokerUnavailable, OutgoingMessage
from services.core.envelope import Envelope

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, broker: Broker, metrics: ApiMetrics, probe_interval_s: float) -> None:
        self._broker = broker
        self._metrics = metrics
        self._probe_interval_s = probe_interval_s
        self._probe_task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        await self._broker.start()
        self._metrics.broker_up.set(1)  # until a probe or a publish says otherwise
        self._probe_task = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        """Waits for publishes in flight (each bounded by the publish timeout), then stops."""
        await self._idle.wait()
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        await self._broker.close()

    async def _probe_forever(self) -> None:
        """Keeps `pubsock_broker_up` true while nobody publishes: an idle API still knows."""
        while True:
            up = await self._broker.probe()
            if not up:
                log.warning("Pub/Sub does not answer")
            self._metrics.broker_up.set(1 if up else 0)
            await asyncio.sleep(self._probe_interval_s)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publishes every envelope; returns once Pub/Sub confirmed all, else BrokerUnavailable."""
        self._in_flight += 1
        self._idle.clear()
        self._metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            messages = [
                OutgoingMessage(env.encode(), env.channel, env.attributes()) for env in envelopes
            ]
            results: list[BaseException | None]
            if len(messages) == 1:  # the usual case: no task to gather
                try:
                    results = [await self._broker.publish(messages[0])]
                except Exception as exc:
                    results = [exc]
            else:
                results = await asyncio.gather(
                    *(self._broker.publish(message) for message in messages),
                    return_exceptions=True,
                )
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                self._metrics.broker_up.set(0)
                if isinstance(failure, BrokerUnavailable):
                    raise failure
                log.error("publish failed unexpectedly", exc_info=failure)
                raise BrokerUnavailable(str(failure)) from failure
            self._metrics.broker_up.set(1)
        finally:
            self._metrics.publish_latency.observe(time.perf_counter() - started)
            self._metrics.in_flight.dec()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
