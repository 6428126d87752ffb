"""The Broker interface: how a service publishes to the topic and how a pod reads its subscription.

The contract every implementation keeps (Google Cloud Pub/Sub in pubsub.py, the in-process one in
memory.py; docs/pubsub.md says what pubsock relies on from the real service):
- `publish` returns only once the broker has the message durably (Pub/Sub acknowledged it), or
  raises within the publish timeout: `BrokerUnavailable` (outcome unknown: the caller retries with
  the same ids) or `BrokerBusy` (the channel's backlog is full: nothing was published). A batch is
  all or nothing as far as admission goes.
- Messages with the same ordering key (the channel) reach each subscription in publish order.
- A subscription is acknowledged as it hands a batch over (`next_batch`): handing over is in
  order and the pump's handling cannot fail. Redelivery (at least once) still happens: after a
  stream restart, a lost ack or a seek; consumers drop duplicates by message id.
- A new subscription sees only what is published after its creation. Older messages come only
  from a successful seek to a time (topic retention), made before the stream starts:
  `OpenResult.seeked_to_ms` says whether it happened. Nothing else may be taken as history.
- A subscription that may have lost messages (its stream died for good, it was recreated) raises
  `StreamBroken` from `next_batch`; the consumer marks a continuity break and calls `open` again,
  backing off (`StreamBroken.permanent`: the service refuses, an operator must act).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.core.settings import CommonSettings


class BrokerUnavailable(Exception):
    """The broker did not confirm in time or refused: the outcome of a publish is unknown."""


class BrokerBusy(Exception):
    """A channel's publish backlog is at its bound: nothing was published; retry later."""


class BrokerRefused(Exception):
    """The broker refused for good (permission, not found, invalid): an operator must act.
    `fix` says what to do, for the ERROR log line."""

    def __init__(self, reason: str, code: str, fix: str) -> None:
        super().__init__(reason)
        self.code = code
        self.fix = fix


class StreamBroken(Exception):
    """The subscription's stream ended; messages published meanwhile may be missing.

    `permanent`: the service refused the stream (permission, not found, ...): reopening can only
    succeed once something is fixed, so the consumer backs off and says what to fix."""

    def __init__(
        self, reason: str, code: str | None = None, permanent: bool = False, fix: str = ""
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.permanent = permanent
        self.fix = fix


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    data: bytes
    ordering_key: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message as the subscription hands it over (already acknowledged, see above)."""

    data: bytes
    attributes: Mapping[str, str]
    message_id: str
    publish_ms: int


@dataclass(frozen=True, slots=True)
class OpenResult:
    opened_ms: int  # every message published from then on will be delivered
    created: bool  # the subscription did not exist (first start, or it vanished)
    seeked_to_ms: int | None = None  # a seek made the history complete back to then


class Subscription(abc.ABC):
    """One pod's own subscription to the topic: every message, in per-key order."""

    @abc.abstractmethod
    async def open(self, seek_to_ms: int | None = None) -> OpenResult:
        """Creates the subscription if missing and (re)starts delivery; a subscription it
        created is first seeked to `seek_to_ms` (the topic's retained messages since then).

        Reopening an existing subscription loses nothing: unacknowledged messages come again.
        """

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
        """Returns once the broker has the message; raises BrokerUnavailable or BrokerBusy."""

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Every message, admitted all or none; returns once the broker has them all."""
        results = await asyncio.gather(
            *(self.publish(message) for message in messages), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    @abc.abstractmethod
    async def probe(self) -> bool:
        """True when the broker answers and lets this service in (a refusal is down)."""

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
        api_endpoint=settings.pubsub_api_endpoint,
        key_max_messages=settings.publish_key_max_messages,
        key_max_bytes=settings.publish_key_max_bytes,
    )
