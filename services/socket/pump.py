"""The pod's one reader of its subscription: decode, drop duplicates, record, fan out.

Everything a pod delivers passes through `Pump.handle`, on the event loop, one message at a time,
in the order the subscription hands them out (Pub/Sub keeps per-channel order).

The pump also keeps the history honest about what it can prove (docs/pubsub.md):
- A first start seeks the new subscription back by the warm window. Only a successful seek makes
  the history complete back to then; otherwise it starts at the subscription's creation.
- The seek's replay (the backlog: messages published before the subscription was opened) goes to
  history only. A channel's backlog is known to be over once one of its messages published after
  the opening arrives (per-key order); all of it once the backlog has been quiet for a while
  (`backlog_quiet_s`), live traffic notwithstanding.
- Every reopen backs off with full jitter; a refusal (permission, not found) is logged at ERROR
  with what to fix, once per step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from services.core.backoff import backoff_delays
from services.core.broker import (
    BrokerRefused,
    Delivery,
    OpenResult,
    StreamBroken,
    Subscription,
)
from services.core.channels import NamespaceLabeler
from services.core.envelope import (
    KIND_ATTRIBUTE,
    PRESENCE_KIND,
    InvalidEnvelope,
    decode_envelope,
)
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.wsframe import message_text_frame

log = logging.getLogger(__name__)

REOPEN_BACKOFF_INITIAL_S = 0.2
REOPEN_BACKOFF_MAX_S = 30.0


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
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._subscription = subscription
        self._sleep = sleep  # the backoff's wait (tests record it)
        self._history = history
        self._hub = hub
        self._metrics = metrics
        self._labeler = labeler
        self._on_announcement = on_announcement
        self._on_unprovable_break = on_unprovable_break
        self._warm_window_ms = warm_window_ms
        self._received: dict[str, object] = {}
        self._deaf_since_ms: int | None = None
        self._reopen_delays = self._new_delays()
        self.healthy = False
        # Messages published before this go to history only, never live (the seek's replay).
        self.live_from_ms = 2**62
        # While the warm start's backlog is not known to be over: messages published before
        # this are backlog.
        self.backlog_until_ms: int | None = None
        self.last_backlog_at = time.monotonic()
        self.last_delivery_at = time.monotonic()
        self.opened_at = time.monotonic()  # deafness is judged from here or the last own echo
        # The newest publish time the stream handed over: up to about then the stream is known
        # complete, so a recreated subscription seeks back to it (minus the slack).
        self.heard_ms = 0

    @staticmethod
    def _new_delays() -> Iterator[float]:
        return backoff_delays(REOPEN_BACKOFF_INITIAL_S, REOPEN_BACKOFF_MAX_S)

    async def _open_with_retry(self, seek_to_ms: int | None) -> OpenResult:
        while True:
            try:
                return await self._subscription.open(seek_to_ms)
            except asyncio.CancelledError:
                raise
            except BrokerRefused as exc:
                delay = next(self._reopen_delays)
                self._refused(exc.code, exc.fix, str(exc), delay)
            except Exception:
                delay = next(self._reopen_delays)
                log.warning("could not open the subscription; retrying", exc_info=True)
            self._metrics.broker_up.set(0)
            await self._sleep(delay)

    def _refused(self, code: str | None, fix: str, reason: str, delay: float) -> None:
        """Logged at ERROR once per backoff step, with what to fix; counted by code."""
        self._metrics.broker_refusals.labels(code or "unknown").inc()
        log.error(
            f"Pub/Sub refused the subscription: {code}; {fix}",
            extra={"reason": reason, "code": code, "retry_in_s": round(delay, 2)},
        )

    async def open(self) -> None:
        """First start: create the subscription, seeked back by the warm window."""
        seek_to_ms = _now_ms() - self._warm_window_ms if self._warm_window_ms else None
        result = await self._open_with_retry(seek_to_ms)
        self.live_from_ms = self.heard_ms = result.opened_ms
        if result.seeked_to_ms is not None:
            self._history.stream_started(result.seeked_to_ms, backlog_until_ms=result.opened_ms)
            self.backlog_until_ms = result.opened_ms
            self.last_backlog_at = time.monotonic()
        else:
            if seek_to_ms is not None:
                log.warning(
                    "no warm start: history starts now; older positions answer recovered: false"
                )
            self._history.stream_started(result.opened_ms)
        self.opened_at = time.monotonic()
        self.healthy = True
        self._metrics.broker_up.set(1)

    def backlog_quiet_s(self) -> float:
        """Seconds since the last backlog message (or since the seek)."""
        return time.monotonic() - self.last_backlog_at

    def end_backlog(self) -> None:
        """The warm start's backlog is over: every channel's history is complete from the seek."""
        if self.backlog_until_ms is not None:
            self.backlog_until_ms = None
            self._history.backlog_over()
            log.info("warm start backlog received", extra={"messages": self._history.message_count})

    async def _reopen(self, broken_at_ms: int, deaf: bool) -> None:
        """After a broken or deaf stream: resume the same subscription (nothing is lost: what
        was not acknowledged comes again), or recreate it and replay the gap; where that cannot
        be proven, mark the break so recovery across it answers `recovered: false`."""
        seek_to_ms = broken_at_ms - self._history.position_slack_ms
        result = await self._open_with_retry(seek_to_ms)
        if result.created:
            if result.seeked_to_ms is not None:
                self.live_from_ms = result.seeked_to_ms
            else:
                log.warning("subscription recreated; messages may be missing: marking a break")
                self.live_from_ms = result.opened_ms
                self.end_backlog()
                self._history.stream_started(result.opened_ms)
                self._on_unprovable_break()
        elif deaf:
            # Resumed, so nothing should be lost; still, a pod that heard nothing for a while
            # cannot prove it, so recovery across this point answers false.
            self.end_backlog()
            self._history.stream_started(broken_at_ms)
        self.healthy = True
        self.opened_at = time.monotonic()
        self._metrics.broker_up.set(1)

    async def restart_deaf(self, last_heard_ms: int) -> None:
        """Our own announcements stopped coming back: end the stream; `run` reopens it."""
        self._deaf_since_ms = last_heard_ms
        self._metrics.deaf.inc()
        await self._subscription.restart_stream()

    async def _broken(self, exc: StreamBroken) -> None:
        deaf_since, self._deaf_since_ms = self._deaf_since_ms, None
        broken_at_ms = deaf_since if deaf_since is not None else min(_now_ms(), self.heard_ms)
        self.healthy = False
        self._metrics.stream_breaks.inc()
        self._metrics.broker_up.set(0)
        delay = next(self._reopen_delays)
        if exc.permanent:
            self._refused(exc.code, exc.fix, str(exc), delay)
        else:
            log.warning(
                "subscription stream ended; reopening",
                extra={"reason": str(exc), "deaf": deaf_since is not None},
            )
        await self._sleep(delay)
        await self._reopen(broken_at_ms, deaf=deaf_since is not None)

    async def run(self) -> None:
        while True:
            try:
                batch = await self._subscription.next_batch()
            except StreamBroken as exc:
                await self._broken(exc)
                continue
            self._reopen_delays = self._new_delays()
            self.last_delivery_at = time.monotonic()
            self._hub.begin_batch()
            try:
                for delivery in batch:
                    self.handle(delivery)
            finally:
                self._hub.end_batch()

    def handle(self, delivery: Delivery) -> None:
        if delivery.publish_ms > self.heard_ms:
            self.heard_ms = delivery.publish_ms
        if self.backlog_until_ms is not None and delivery.publish_ms < self.backlog_until_ms:
            self.last_backlog_at = time.monotonic()
        kind = delivery.attributes.get(KIND_ATTRIBUTE)
        if kind:
            if kind == PRESENCE_KIND:
                self._on_announcement(delivery)
            return  # presence and other kinds never reach clients as messages
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
            return
        history = self._history
        if history.contains(envelope.channel, envelope.id):
            self._metrics.duplicates_dropped.inc()
            return
        frame, data_span = message_text_frame(envelope)
        entry = history.append(
            envelope.channel,
            envelope.id,
            delivery.publish_ms,
            frame,
            envelope.ts,
            envelope.sub,
            data_span,
        )
        self._hub.publish(envelope.channel, entry, delivery.publish_ms >= self.live_from_ms)
        self._count(envelope.channel)
        self._metrics.delivery_lag.observe(max(0.0, time.time() - delivery.publish_ms / 1000))

    def _count(self, channel: str) -> None:
        label = self._labeler(channel)
        counter = self._received.get(label)
        if counter is None:
            counter = self._received[label] = self._metrics.messages_received.labels(label)
        counter.inc()  # type: ignore[attr-defined]
