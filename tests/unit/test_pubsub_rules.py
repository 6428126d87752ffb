"""The Pub/Sub broker's own rules without a network: ack chunking inside the service's limits,
acks that a stream restart would drop sent again, reopen backoff with full jitter, and the
warm start's proof of a complete history."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from devtools.strictpubsub.rules import check_ack_ids
from services.core.backoff import backoff_delays
from services.core.broker import BrokerRefused, OpenResult, StreamBroken, Subscription
from services.core.broker.pubsub import (
    ACK_MAX_IDS,
    PubSubSubscription,
    _StreamingPullRequest,
    ack_chunks,
)
from services.core.channels import NamespaceLabeler
from services.socket.history import History
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.pump import Pump


def test_ack_ids_are_chunked_inside_the_service_limits() -> None:
    ids = [f"{n:06d}-" + "x" * 293 for n in range(2500)]  # real ack ids are long
    assert check_ack_ids(ids) is not None  # all at once: over 512 KB, refused
    chunks = list(ack_chunks(ids))
    assert [a for chunk in chunks for a in chunk] == ids
    assert all(len(chunk) <= ACK_MAX_IDS and check_ack_ids(chunk) is None for chunk in chunks)
    short = list(ack_chunks([str(n) for n in range(2500)]))
    assert [len(chunk) for chunk in short] == [1000, 1000, 500]


class FakeSubscriberClient:
    def __init__(self) -> None:
        self.acknowledged: list[str] = []

    async def acknowledge(self, subscription: str, ack_ids: list[str], **_: Any) -> None:
        self.acknowledged.extend(ack_ids)


async def test_acks_queued_or_just_written_when_a_stream_ends_are_sent_again() -> None:
    client = FakeSubscriberClient()

    async def source() -> Any:
        return client

    async def retention() -> int | None:
        return None

    subscription = PubSubSubscription(source, retention, "p", "projects/p/topics/t", "s", {})
    subscription._client = client
    queue: asyncio.Queue[Any] = asyncio.Queue()
    queue.put_nowait(_StreamingPullRequest(ack_ids=["queued-1", "queued-2"]))
    subscription._requests = queue
    subscription._written_acks.append((time.monotonic() - 3600, ["long-ago"]))
    subscription._written_acks.append((time.monotonic(), ["just-written"]))
    subscription._stop_stream()
    await asyncio.gather(*subscription._ack_tasks)
    assert sorted(client.acknowledged) == ["just-written", "queued-1", "queued-2"]
    assert subscription.acks_resent == 3


class RefusingSubscription(Subscription):
    """Opens fine, then every stream is refused for good (as with a missing role)."""

    def __init__(self) -> None:
        self.opens = 0

    async def open(self, seek_to_ms: int | None = None) -> OpenResult:
        self.opens += 1
        if self.opens == 1:
            raise BrokerRefused(
                "CreateSubscription: PERMISSION_DENIED", "PERMISSION_DENIED", "fix X"
            )
        return OpenResult(0, False)

    async def restart_stream(self) -> None:
        return None

    async def next_batch(self) -> list[Any]:
        raise StreamBroken("stream ended", code="PERMISSION_DENIED", permanent=True, fix="grant Y")

    async def close(self, *, delete: bool) -> None:
        return None


async def test_every_reopen_backs_off_with_full_jitter_and_says_what_to_fix(caplog) -> None:
    subscription = RefusingSubscription()
    metrics = SocketMetrics()
    history = History(100, 60, 100, 0)
    delays: list[float] = []
    done = asyncio.Event()

    async def sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 8:
            done.set()
            await asyncio.Event().wait()  # park the pump here

    pump = Pump(
        subscription,
        history,
        Hub(history, metrics, recovery_wait_s=0),
        metrics,
        NamespaceLabeler(frozenset()),
        sleep=sleep,
    )
    caplog.set_level(logging.ERROR, logger="services.socket.pump")
    await pump.open()
    task = asyncio.create_task(pump.run())
    async with asyncio.timeout(5):
        await done.wait()
    task.cancel()
    # One open per step, never a hot loop; each wait drawn below a doubling cap.
    assert subscription.opens == len(delays)
    caps = [min(0.2 * 2**n, 30.0) for n in range(len(delays))]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)  # jittered
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == len(delays)
    assert "fix X" in errors[0] and all("grant Y" in e for e in errors[1:])
    refusals = metrics.broker_refusals.labels("PERMISSION_DENIED")._value.get()
    assert refusals == len(delays)


def test_backoff_caps_double_up_to_the_maximum() -> None:
    delays = backoff_delays(0.1, 1.0)
    samples = [next(delays) for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in samples)
    assert max(samples[:1]) <= 0.1


class SeekingSubscription(Subscription):
    def __init__(self, seeked: bool) -> None:
        self.seeked = seeked
        self.asked: int | None = None

    async def open(self, seek_to_ms: int | None = None) -> OpenResult:
        self.asked = seek_to_ms
        self.opened_ms = int(time.time() * 1000)
        return OpenResult(self.opened_ms, True, seek_to_ms if self.seeked else None)

    async def restart_stream(self) -> None:
        return None

    async def next_batch(self) -> list[Any]:
        await asyncio.Event().wait()
        return []

    async def close(self, *, delete: bool) -> None:
        return None


def _pump(subscription: Subscription, history: History) -> Pump:
    metrics = SocketMetrics()
    return Pump(
        subscription,
        history,
        Hub(history, metrics, recovery_wait_s=0),
        metrics,
        NamespaceLabeler(frozenset()),
        warm_window_ms=60_000,
    )


@pytest.mark.parametrize("seeked", [True, False])
async def test_history_is_complete_back_to_a_time_only_after_a_seek_to_it(seeked: bool) -> None:
    history = History(100, 3600, 100, position_slack_ms=0)
    subscription = SeekingSubscription(seeked)
    pump = _pump(subscription, history)
    await pump.open()
    assert subscription.asked is not None
    asked = subscription.asked
    if seeked:
        assert history.complete_from_ms == asked
        assert pump.backlog_until_ms == subscription.opened_ms
    else:  # created without a seek: older positions must answer recovered: false
        assert history.complete_from_ms == subscription.opened_ms
        assert history.recover("room:a", f"@{asked + 5}").recovered is False


def test_a_channel_is_complete_from_the_seek_once_its_backlog_is_over() -> None:
    history = History(100, 3600, 100, position_slack_ms=0, clock_ms=lambda: 20_000)
    history.stream_started(1_000, backlog_until_ms=10_000)
    history.append("a", "a1", 5_000, b"f")  # backlog
    history.append("b", "b1", 5_000, b"f")
    assert history.recover("a", "@2000").recovered is False  # more backlog may follow
    assert history.recover("a", "a1").recovered is False
    history.append("a", "a2", 12_000, b"f")  # published after the opening: a's backlog is over
    assert history.recover("a", "@2000") == (True, history.recover("a", "@2000").entries)
    assert [e.id for e in history.recover("a", "a1").entries] == ["a2"]
    assert history.recover("b", "@2000").recovered is False
    history.backlog_over()  # the whole backlog was quiet for long enough
    assert [e.id for e in history.recover("b", "@2000").entries] == ["b1"]
