"""An in-process broker: unit tests and single-process mode, never a stand-in for Pub/Sub in
integration tests. It keeps the same contract: per-key order, at-least-once (here exactly once)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Mapping
from typing import ClassVar

from services.core.broker import (
    Broker,
    BrokerUnavailable,
    Delivery,
    OpenResult,
    OutgoingMessage,
    StreamBroken,
    Subscription,
)


class MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, name: str) -> None:
        self._broker = broker
        self.name = name
        self._inbox: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self.deleted = False

    async def open(self, seek_to_ms: int | None = None) -> OpenResult:
        """Nothing is retained, so there is no seek: history starts at the creation."""
        created = self.name not in self._broker._subscriptions
        self._broker._subscriptions[self.name] = self
        return OpenResult(int(time.time() * 1000), created)

    async def restart_stream(self) -> None:
        self.break_stream()

    def _put(self, delivery: Delivery | None) -> None:
        self._inbox.put_nowait(delivery)

    def break_stream(self) -> None:
        """Test hook: end the stream as a dying streaming pull would."""
        self._put(None)

    async def next_batch(self) -> list[Delivery]:
        first = await self._inbox.get()
        if first is None:
            raise StreamBroken("memory stream ended")
        batch = [first]
        while not self._inbox.empty() and len(batch) < 500:
            item = self._inbox.get_nowait()
            if item is None:
                self._put(None)  # raise on the next call, after this batch is handled
                break
            batch.append(item)
        return batch

    async def close(self, *, delete: bool) -> None:
        self._broker._subscriptions.pop(self.name, None)
        self.deleted = delete


class MemoryBroker(Broker):
    _shared: ClassVar[MemoryBroker | None] = None

    def __init__(self) -> None:
        self._subscriptions: dict[str, MemorySubscription] = {}
        self._ids = itertools.count(1)
        self.available = True

    @classmethod
    def shared(cls) -> MemoryBroker:
        """One broker per process, so the api and the socket service of single-process mode meet."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, message: OutgoingMessage) -> None:
        if not self.available:
            raise BrokerUnavailable("memory broker marked unavailable")
        delivery = Delivery(
            data=message.data,
            attributes=dict(message.attributes),
            message_id=str(next(self._ids)),
            publish_ms=int(time.time() * 1000),
        )
        for subscription in self._subscriptions.values():
            subscription._put(delivery)

    async def probe(self) -> bool:
        return self.available

    def subscription(self, name: str, labels: Mapping[str, str]) -> Subscription:
        return MemorySubscription(self, name)
