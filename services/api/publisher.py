"""Publishing as the API sees it: the broker plus the metrics and the liveness signal around it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from services.api.metrics import ApiMetrics
from services.core.broker import Broker, BrokerBusy, BrokerUnavailable, OutgoingMessage
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
            up = await self._broker.probe()  # logs why it is down, once per change
            self._metrics.broker_up.set(1 if up else 0)
            await asyncio.sleep(self._probe_interval_s)

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Publishes every envelope; returns once Pub/Sub confirmed all. Raises BrokerUnavailable
        (outcome unknown) or BrokerBusy (a channel's backlog is full: nothing was published)."""
        self._in_flight += 1
        self._idle.clear()
        self._metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            messages = [
                OutgoingMessage(env.encode(), env.channel, env.attributes()) for env in envelopes
            ]
            try:
                if len(messages) == 1:  # the usual case: no gather
                    await self._broker.publish(messages[0])
                else:
                    await self._broker.publish_many(messages)
            except BrokerBusy:
                raise  # the channel's backlog is full: Pub/Sub itself is fine
            except BrokerUnavailable:
                self._metrics.broker_up.set(0)
                raise
            except Exception as exc:
                self._metrics.broker_up.set(0)
                log.error("publish failed unexpectedly", exc_info=exc)
                raise BrokerUnavailable(str(exc)) from exc
            self._metrics.broker_up.set(1)
        finally:
            self._metrics.publish_latency.observe(time.perf_counter() - started)
            self._metrics.in_flight.dec()
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
