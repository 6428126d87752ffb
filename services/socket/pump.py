"""The pod's one reader of its subscription: decode, drop duplicates, record, fan out, ack.

Everything a pod delivers passes through `Pump.handle`, on the event loop, one message at a time,
in the order the subscription hands them out (Pub/Sub keeps per-channel order).
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.core.broker import Delivery, StreamBroken, Subscription
from services.core.channels import NamespaceLabeler
from services.core.envelope import KIND_ATTRIBUTE, InvalidEnvelope, decode_envelope
from services.core.protocol import message_frame
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.wsframe import text_frame

log = logging.getLogger(__name__)

REOPEN_BACKOFF_MAX_S = 10.0


class Pump:
    def __init__(
        self,
        subscription: Subscription,
        history: History,
        hub: Hub,
        metrics: SocketMetrics,
        labeler: NamespaceLabeler,
    ) -> None:
        self._subscription = subscription
        self._history = history
        self._hub = hub
        self._metrics = metrics
        self._labeler = labeler
        self._received: dict[str, object] = {}
        self.healthy = False

    async def open(self) -> None:
        """Opens the subscription, retrying with backoff until the broker answers."""
        backoff_s = 0.2
        while True:
            try:
                complete_from_ms = await self._subscription.open()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not open the subscription; retrying", exc_info=True)
                self._metrics.broker_up.set(0)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, REOPEN_BACKOFF_MAX_S)
                continue
            self._history.stream_started(complete_from_ms)
            self.healthy = True
            self._metrics.broker_up.set(1)
            return

    async def run(self) -> None:
        while True:
            try:
                batch = await self._subscription.next_batch()
            except StreamBroken as exc:
                self.healthy = False
                self._metrics.stream_breaks.inc()
                self._metrics.broker_up.set(0)
                log.warning("subscription stream ended; reopening", extra={"reason": str(exc)})
                await self.open()
                continue
            for delivery in batch:
                self.handle(delivery)

    def handle(self, delivery: Delivery, live: bool = True) -> None:
        if delivery.attributes.get(KIND_ATTRIBUTE):
            delivery.ack()  # presence and other non-message kinds never reach clients here
            return
        try:
            envelope = decode_envelope(
                delivery.data, delivery.attributes, delivery.message_id, delivery.publish_ms
            )
        except InvalidEnvelope as exc:
            self._metrics.invalid_messages.inc()
            log.warning(
                "dropped an unreadable message",
                extra={"pubsub_message_id": delivery.message_id, "reason": str(exc)},
            )
            delivery.ack()
            return
        history = self._history
        if history.contains(envelope.channel, envelope.id):
            self._metrics.duplicates_dropped.inc()
            delivery.ack()
            return
        entry = history.append(
            envelope.channel, envelope.id, delivery.publish_ms, text_frame(message_frame(envelope))
        )
        self._hub.publish(envelope.channel, entry, live)
        self._count(envelope.channel)
        self._metrics.delivery_lag.observe(max(0.0, time.time() - delivery.publish_ms / 1000))
        delivery.ack()

    def _count(self, channel: str) -> None:
        label = self._labeler(channel)
        counter = self._received.get(label)
        if counter is None:
            counter = self._received[label] = self._metrics.messages_received.labels(label)
        counter.inc()  # type: ignore[attr-defined]
