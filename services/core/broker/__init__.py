"""The Broker interface: how a service publishes to the topic and how a pod reads its subscription.

Contract of every implementation:
- `publish` returns only once the broker has the message durably (Pub/Sub acknowledged it), or
  raises `BrokerUnavailable` within the publish timeout: a caller never hangs and never sees a
  message "half" published without being told the outcome is unknown.
- Messages with the same ordering key are delivered to each subscription in publish order.
- Delivery is at least once: a subscription may hand out a message again (Pub/Sub redelivery);
  consumers drop duplicates by message id.
- A subscription that may have lost messages (its stream died, it was recreated) raises
  `StreamBroken` from `next_batch`; the consumer marks a continuity break and calls `open` again.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.core.settings import CommonSettings


class BrokerUnavailable(Exception):
    """The broker did not confirm in time or refused: the outcome of a publish is unknown."""


class StreamBroken(Exception):
    """The subscription's stream ended; messages published meanwhile may be missing."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    data: bytes
    ordering_key: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    data: bytes
    attributes: Mapping[str, str]
    message_id: str
    publish_ms: int
    ack: Callable[[], None]


@dataclass(frozen=True, slots=True)
class OpenResult:
    complete_from_ms: int  # every message published from then on will be delivered
    created: bool  # the subscription did not exist (first start, or it vanished)


class Subscription(abc.ABC):
    """One pod's own subscription to the topic: every message, in per-key order."""

    @abc.abstractmethod
    async def open(self) -> OpenResult:
        """Creates the subscription if missing and (re)starts delivery.

        Reopening an existing subscription loses nothing: unacknowledged messages come again.
        """

    @abc.abstractmethod
    async def seek_to(self, time_ms: int) -> bool:
        """Replays what the topic retained since `time_ms`; False where seek is unsupported
        (the emulator answers 501, but replays every retained message to a new subscription)."""

    @abc.abstractmethod
    async def restart_stream(self) -> None:
        """Ends the current stream (`next_batch` raises StreamBroken), e.g. when it went deaf."""

    @abc.abstractmethod
    async def next_batch(self) -> list[Delivery]:
        """Waits for at least one delivery; raises StreamBroken when the stream ended."""

    @abc.abstractmethod
    async def close(self, *, delete: bool) -> None:
        """Stops delivery; with `delete`, removes the subscription (graceful shutdown)."""


class Broker(abc.ABC):
    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def publish(self, message: OutgoingMessage) -> None:
        """Returns once the broker has the message; raises BrokerUnavailable otherwise."""

    @abc.abstractmethod
    async def probe(self) -> bool:
        """True when the broker answers at all (an authorization refusal counts as an answer)."""

    @abc.abstractmethod
    def subscription(self, name: str, labels: Mapping[str, str]) -> Subscription: ...


def create_broker(settings: CommonSettings) -> Broker:
    """The broker named by `BROKER`; imported lazily so memory mode never loads gRPC."""
    if settings.broker == "memory":
        from services.core.broker.memory import MemoryBroker

        return MemoryBroker.shared()
    from services.core.broker.pubsub import PubSubBroker

    return PubSubBroker(
        project=settings.google_cloud_project,
        topic=settings.pubsub_topic,
        publish_timeout_s=settings.publish_timeout_s,
        batch_latency_s=settings.publish_batch_latency_s,
    )
