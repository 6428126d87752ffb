"""The Google Cloud Pub/Sub broker, on the real `google-cloud-pubsub` client.

The client runs its own threads (publisher batches, the streaming pull and its callbacks). This
module is the one place where those threads meet asyncio: publish futures are awaited through
`asyncio.wrap_future`, subscriber callbacks hand messages to the loop with
`call_soon_threadsafe`, and blocking admin calls run in `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.publisher.exceptions import PublishToPausedOrderingKeyException
from google.cloud.pubsub_v1.subscriber.message import Message

from services.core.broker import (
    Broker,
    BrokerUnavailable,
    Delivery,
    OpenResult,
    OutgoingMessage,
    StreamBroken,
    Subscription,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBSCRIPTION_EXPIRATION_S = (
    86400  # the minimum Pub/Sub allows: orphans of killed pods vanish in a day
)
SUBSCRIPTION_RETENTION_S = 600  # the minimum: a pod's backlog older than that is useless anyway
ACK_DEADLINE_S = 60
FLOW_CONTROL_MAX_MESSAGES = 2000
INBOX_MAX_MESSAGES = 2000
FLOW_CONTROL_MAX_BYTES = 64 * 1024 * 1024
BATCH_MAX = 500
ADMIN_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
_TRANSIENT = (gexc.GoogleAPICallError, gexc.RetryError, TimeoutError, OSError)


async def _blocking(call: Callable[[], T]) -> T:
    """Runs a blocking client call off the event loop."""
    return await asyncio.to_thread(call)


class _StreamEnded:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class PubSubSubscription(Subscription):
    def __init__(self, project: str, topic_path: str, name: str, labels: Mapping[str, str]) -> None:
        self._path = f"projects/{project}/subscriptions/{name}"
        self._topic_path = topic_path
        self._labels = dict(labels)
        self._client = pubsub_v1.SubscriberClient()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: asyncio.Queue[Message | _StreamEnded] = asyncio.Queue()
        self._future: Any = None
        # Messages handed to the loop but not yet handled: bounds the inbox (see _on_message).
        self._slots = threading.BoundedSemaphore(INBOX_MAX_MESSAGES)
        self._closing = False

    @property
    def path(self) -> str:
        return self._path

    async def _create(self) -> bool:
        request = {
            "name": self._path,
            "topic": self._topic_path,
            "enable_message_ordering": True,
            "expiration_policy": {"ttl": {"seconds": SUBSCRIPTION_EXPIRATION_S}},
            "message_retention_duration": {"seconds": SUBSCRIPTION_RETENTION_S},
            "ack_deadline_seconds": ACK_DEADLINE_S,
            "labels": self._labels,
        }
        try:
            await _blocking(
                lambda: self._client.create_subscription(request=request, timeout=ADMIN_TIMEOUT_S)
            )
            log.info("subscription created", extra={"subscription": self._path})
        except gexc.AlreadyExists:
            return False
        return True

    async def open(self) -> OpenResult:
        self._loop = asyncio.get_running_loop()
        await self._stop_stream()
        self._closing = False
        created = await self._create()
        complete_from_ms = int(time.time() * 1000)
        # The inbox is kept across reopens: what it holds was acked already and must be handled.
        self._future = self._client.subscribe(
            self._path,
            callback=self._on_message,
            flow_control=pubsub_v1.types.FlowControl(
                max_messages=FLOW_CONTROL_MAX_MESSAGES, max_bytes=FLOW_CONTROL_MAX_BYTES
            ),
        )
        inbox = self._inbox
        self._future.add_done_callback(lambda future: self._on_stream_done(future, inbox))
        return OpenResult(complete_from_ms, created)

    async def seek_to(self, time_ms: int) -> bool:
        seconds, millis = divmod(time_ms, 1000)
        request = {
            "subscription": self._path,
            "time": {"seconds": seconds, "nanos": millis * 1_000_000},
        }
        try:
            await _blocking(lambda: self._client.seek(request=request, timeout=ADMIN_TIMEOUT_S))
        except (gexc.MethodNotImplemented, gexc.FailedPrecondition, gexc.InvalidArgument):
            return False
        log.info("subscription seeked", extra={"subscription": self._path, "to_ms": time_ms})
        return True

    async def restart_stream(self) -> None:
        await self._stop_stream()

    # Both callbacks run on the client's threads: hand off to the loop and return.
    def _on_message(self, message: Message) -> None:
        """Hands the message to the loop, then acks it.

        With ordering keys the client releases a key's next message only when the previous one
        is acked; acking after the fan-out would make each channel wait for a round trip through
        the busy event loop (tens of messages a second per channel). So: enqueue (in order), then
        ack. The inbox stays bounded because this thread waits for a free slot, which the pump
        returns as it handles each message; back-pressure reaches the subscriber's threads.
        """
        assert self._loop is not None
        while not self._slots.acquire(timeout=1.0):
            if self._closing:
                return  # not acked: Pub/Sub delivers it again to the next stream
        self._loop.call_soon_threadsafe(self._inbox.put_nowait, message)
        message.ack()

    def _on_stream_done(self, future: Any, inbox: asyncio.Queue[Message | _StreamEnded]) -> None:
        error = None if future.cancelled() else future.exception()
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone at process exit
            self._loop.call_soon_threadsafe(inbox.put_nowait, _StreamEnded(error))

    async def next_batch(self) -> list[Delivery]:
        item = await self._inbox.get()
        batch: list[Delivery] = []
        while True:
            if isinstance(item, _StreamEnded):
                if batch:
                    self._inbox.put_nowait(item)  # report after this batch is handled
                    return batch
                raise StreamBroken(str(item.error or "stream cancelled"))
            batch.append(
                Delivery(
                    data=item.data,
                    attributes=item.attributes,
                    message_id=item.message_id,
                    publish_ms=int(item.publish_time.timestamp() * 1000),
                    ack=self._release_slot,
                )
            )
            if len(batch) >= BATCH_MAX or self._inbox.empty():
                return batch
            item = self._inbox.get_nowait()

    def _release_slot(self) -> None:
        with contextlib.suppress(ValueError):  # a slot from before a reopen
            self._slots.release()

    async def _stop_stream(self) -> None:
        future, self._future = self._future, None
        if future is None:
            return
        self._closing = True
        future.cancel()
        with contextlib.suppress(Exception):  # the stream is thrown away either way
            await _blocking(lambda: future.result(timeout=ADMIN_TIMEOUT_S))

    async def exists(self) -> bool:
        try:
            await _blocking(
                lambda: self._client.get_subscription(
                    request={"subscription": self._path}, timeout=ADMIN_TIMEOUT_S
                )
            )
        except gexc.NotFound:
            return False
        return True

    async def close(self, *, delete: bool) -> None:
        await self._stop_stream()
        if delete:
            try:
                await _blocking(
                    lambda: self._client.delete_subscription(
                        request={"subscription": self._path}, timeout=ADMIN_TIMEOUT_S
                    )
                )
                log.info("subscription deleted", extra={"subscription": self._path})
            except gexc.NotFound:
                pass
            except _TRANSIENT:
                log.warning(
                    "could not delete subscription; it expires after a day unused",
                    extra={"subscription": self._path},
                    exc_info=True,
                )
        await _blocking(self._client.close)


class PubSubBroker(Broker):
    def __init__(
        self, project: str, topic: str, publish_timeout_s: float, batch_latency_s: float
    ) -> None:
        self._project = project
        self._topic_path = f"projects/{project}/topics/{topic}"
        self._timeout_s = publish_timeout_s
        self._batch_latency_s = batch_latency_s
        self._publisher: pubsub_v1.PublisherClient | None = None
        # Publish attempts stop retrying inside the window we wait, so futures settle and a
        # failed ordering key is resumed instead of staying paused forever.
        self._retry = Retry(initial=0.1, maximum=2.0, multiplier=2.0, timeout=publish_timeout_s)

    async def start(self) -> None:
        self._publisher = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(
                max_messages=100, max_bytes=1_000_000, max_latency=self._batch_latency_s
            ),
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True),
        )

    async def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await _blocking(publisher.stop)

    def _resume_on_failure(self, ordering_key: str) -> Callable[[Any], None]:
        def resume(future: Any) -> None:
            if future.cancelled() or future.exception() is not None:
                assert self._publisher is not None
                self._publisher.resume_publish(self._topic_path, ordering_key)

        return resume

    async def publish(self, message: OutgoingMessage) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("publisher not started")
        try:
            future = publisher.publish(
                self._topic_path,
                message.data,
                ordering_key=message.ordering_key,
                retry=self._retry,
                timeout=self._timeout_s,
                **message.attributes,
            )
        except PublishToPausedOrderingKeyException as exc:
            # An earlier failure paused the key; resume so the next attempt can go through.
            publisher.resume_publish(self._topic_path, message.ordering_key)
            raise BrokerUnavailable("ordering key paused after an earlier failure") from exc
        future.add_done_callback(self._resume_on_failure(message.ordering_key))
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError as exc:
            raise BrokerUnavailable("Pub/Sub did not confirm the publish in time") from exc
        except _TRANSIENT as exc:
            raise BrokerUnavailable(f"Pub/Sub refused the publish: {exc}") from exc

    async def probe(self) -> bool:
        publisher = self._publisher
        if publisher is None:
            return False
        try:
            await _blocking(
                lambda: publisher.api.get_topic(
                    request={"topic": self._topic_path}, retry=None, timeout=PROBE_TIMEOUT_S
                )
            )
        except (gexc.PermissionDenied, gexc.NotFound, gexc.Forbidden):
            return True  # the service answered; what it said is for the publish to report
        except _TRANSIENT:
            return False
        return True

    def subscription(self, name: str, labels: Mapping[str, str]) -> Subscription:
        return PubSubSubscription(self._project, self._topic_path, name, labels)
