"""The pod's one reader of its subscription: decode, drop duplicates, record, fan out, ack.

Everything a pod delivers passes through `Pump.handle`, on the event loop, one message at a time,
in the order the subscription hands them out (Pub/Sub keeps per-channel order).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from services.core.broker import Delivery, OpenResult, StreamBroken, Subscription
from services.core.channels import NamespaceLabeler
from services.core.envelope import (
    KIND_ATTRIBUTE,
    PRESENCE_KIND,
    InvalidEnvelope,
    decode_envelope,
)
from services.core.protocol import message_frame
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.wsframe import text_frame

log = logging.getLogger(__name__)

REOPEN_BACKOFF_MAX_S = 10.0


def _now_ms() -> int:
    return int(time.time() * 1000)


class Pump:
    def __init__(
        self,
        subscription: Subscription,
        history: History,
        hub: Hub,
        metrics: SocketMetrics,
        labeler: NamespaceLabeler,
        on_announcement: Callable[[Delivery], None] = lambda _: None,
        on_unprovable_break: Callable[[], None] = lambda: None,
        warm_window_ms: int = 0,
    ) -> None:
        self._subscription = subscription
        self._history = history
        self._hub = hub
        self._metrics = metrics
        self._labeler = labeler
        self._on_announcement = on_announcement
        self._on_unprovable_break = on_unprovable_break
        self._warm_window_ms = warm_window_ms
        self._received: dict[str, object] = {}
        self._opened = False
        self._deaf_since_ms: int | None = None
        self.healthy = False
        # Messages published before this go to history only, never live (warm start replay).
        self.live_from_ms = 2**62
        self.last_delivery_at = time.monotonic()
        self.opened_at = time.monotonic()  # deafness is judged from here or the last own echo

    async def _open_with_retry(self) -> OpenResult:
        backoff_s = 0.2
        while True:
            try:
                return await self._subscription.open()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not open the subscription; retrying", exc_info=True)
                self._metrics.broker_up.set(0)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, REOPEN_BACKOFF_MAX_S)

    async def open(self) -> None:
        """First start: create the subscription and seek back for the warm start.

        The history is complete from the seek point (Pub/Sub), or from `warm_window_ms` ago when
        the emulator replays the retained messages instead, or else from the creation time.
        """
        result = await self._open_with_retry()
        self.live_from_ms = result.complete_from_ms
        complete_from_ms = result.complete_from_ms
        if self._warm_window_ms:
            seek_ms = result.complete_from_ms - self._warm_window_ms
            if await self._seek(seek_ms) or result.created:
                complete_from_ms = seek_ms
        self._history.stream_started(complete_from_ms)
        self._opened = True
        self.opened_at = time.monotonic()
        self.healthy = True
        self._metrics.broker_up.set(1)

    async def _seek(self, time_ms: int) -> bool:
        try:
            return await self._subscription.seek_to(time_ms)
        except Exception:
            log.warning("seek failed", exc_info=True)
            return False

    async def _reopen(self, broken_at_ms: int, deaf: bool) -> None:
        """After a broken or deaf stream: resume the same subscription (nothing is lost: what
        was not acknowledged comes again), or recreate it and replay the gap; where that cannot
        be proven, mark the break so recovery across it answers `recovered: false`."""
        result = await self._open_with_retry()
        if result.created:
            if await self._seek(broken_at_ms - self._history.position_slack_ms):
                self.live_from_ms = broken_at_ms - self._history.position_slack_ms
            else:
                log.warning("subscription recreated; messages may be missing: marking a break")
                self.live_from_ms = result.complete_from_ms
                self._history.stream_started(result.complete_from_ms)
                self._on_unprovable_break()
        elif deaf:
            # Resumed, so nothing should be lost; still, a pod that heard nothing for a while
            # cannot prove it, so recovery across this point answers false.
            self._history.stream_started(broken_at_ms)
        self.healthy = True
        self.opened_at = time.monotonic()
        self._metrics.broker_up.set(1)

    async def restart_deaf(self, last_heard_ms: int) -> None:
        """Our own announcements stopped coming back: end the stream; `run` reopens it."""
        self._deaf_since_ms = last_heard_ms
        self._metrics.deaf.inc()
        await self._subscription.restart_stream()

    async def run(self) -> None:
        while True:
            try:
                batch = await self._subscription.next_batch()
            except StreamBroken as exc:
                deaf_since, self._deaf_since_ms = self._deaf_since_ms, None
                broken_at_ms = deaf_since if deaf_since is not None else _now_ms()
                self.healthy = False
                self._metrics.stream_breaks.inc()
                self._metrics.broker_up.set(0)
                log.warning(
                    "subscription stream ended; reopening",
                    extra={"reason": str(exc), "deaf": deaf_since is not None},
                )
                await self._reopen(broken_at_ms, deaf=deaf_since is not None)
                continue
            self.last_delivery_at = time.monotonic()
            self._hub.begin_batch()
            try:
                for delivery in batch:
                    self.handle(delivery)
            finally:
                self._hub.end_batch()

    def handle(self, delivery: Delivery) -> None:
        if delivery.attributes.get(KIND_ATTRIBUTE):
            if delivery.attributes[KIND_ATTRIBUTE] == PRESENCE_KIND:
                self._on_announcement(delivery)
            delivery.ack()  # presence and other kinds never reach clients as messages
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
        self._hub.publish(envelope.channel, entry, delivery.publish_ms >= self.live_from_ms)
        self._count(envelope.channel)
        self._metrics.delivery_lag.observe(max(0.0, time.time() - delivery.publish_ms / 1000))
        delivery.ack()

    def _count(self, channel: str) -> None:
        label = self._labeler(channel)
        counter = self._received.get(label)
        if counter is None:
            counter = self._received[label] = self._metrics.messages_received.labels(label)
        counter.inc()  # type: ignore[attr-defined]
