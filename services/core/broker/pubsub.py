"""The Google Cloud Pub/Sub broker, on the real `google-cloud-pubsub` package.

Publishing and the subscription's stream run on the event loop itself, on grpc.aio channels with
the package's generated messages: Publish, ordered and batched by `OrderedPublisher`, and
StreamingPull (see PubSubSubscription). The package's threaded PublisherClient and streaming-pull
client cost about twice the CPU (bench scenarios 2-4). The admin calls (create, seek, get and
delete a subscription) stay on its blocking SubscriberClient; `_blocking` is the one place where
a client thread meets asyncio.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
    PublisherGrpcAsyncIOTransport,
)
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
    SubscriberGrpcAsyncIOTransport,
)
from google.pubsub_v1.types import pubsub as pubsub_types

from services.core.broker import (
    Broker,
    BrokerUnavailable,
    Delivery,
    OpenResult,
    OutgoingMessage,
    StreamBroken,
    Subscription,
)
from services.core.broker.ordered_publisher import OrderedPublisher, Pending, PublishFailed

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBSCRIPTION_EXPIRATION_S = (
    86400  # the minimum Pub/Sub allows: orphans of killed pods vanish in a day
)
SUBSCRIPTION_RETENTION_S = 600  # the minimum: a pod's backlog older than that is useless anyway
ACK_DEADLINE_S = 60
FLOW_CONTROL_MAX_MESSAGES = 2000
FLOW_CONTROL_MAX_BYTES = 64 * 1024 * 1024
ADMIN_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
_TRANSIENT = (gexc.GoogleAPICallError, gexc.RetryError, TimeoutError, OSError)
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0
STREAM_RETRY_MAX_S = 10.0
HEARTBEAT_S = 30.0
# The codes google-cloud-pubsub retries a publish on.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
    }
)
_ANSWERED = frozenset(
    {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED}
)
# The generated messages' protobuf classes: serialized by upb, without proto-plus wrappers.
_PublishRequest = pubsub_types.PublishRequest.pb()
_PublishResponse = pubsub_types.PublishResponse.pb()
_PubsubMessage = pubsub_types.PubsubMessage.pb()
_GetTopicRequest = pubsub_types.GetTopicRequest.pb()
_Topic = pubsub_types.Topic.pb()
_StreamingPullRequest = pubsub_types.StreamingPullRequest.pb()
_StreamingPullResponse = pubsub_types.StreamingPullResponse.pb()
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30000),
]


def _channel(
    transport: type[PublisherGrpcAsyncIOTransport] | type[SubscriberGrpcAsyncIOTransport],
) -> grpc.aio.Channel:
    """The emulator's plain channel when PUBSUB_EMULATOR_HOST is set (as the client library
    does), else Pub/Sub's with Application Default Credentials (Workload Identity on GKE)."""
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        return grpc.aio.insecure_channel(emulator, options=_CHANNEL_OPTIONS)
    return transport.create_channel(f"{transport.DEFAULT_HOST}:443", options=_CHANNEL_OPTIONS)


async def _blocking(call: Callable[[], T]) -> T:
    """Runs a blocking client call off the event loop."""
    return await asyncio.to_thread(call)


def _noop() -> None:
    """A delivery's ack: the stream acknowledged it already (see `next_batch`)."""


class PubSubSubscription(Subscription):
    """The pod's subscription, read with StreamingPull on a grpc.aio channel.

    google-cloud-pubsub's streaming-pull client runs five threads and sends a unary Acknowledge
    and ModifyAckDeadline RPC per received batch; on the 2-core bench machine that was about half
    of a pod's CPU at 100 msg/s. Here the stream is read by the pump's own task, and acks travel
    on the stream itself, one request per received batch.

    Messages are acknowledged as `next_batch` hands them over, before they are handled: handing
    over is in order and handling does not fail, and with ordering keys Pub/Sub would hold a
    key's next message until the previous one is acked. The stream's client id stays the same
    across reconnects, so Pub/Sub carries the keys' ordering state over. Transient stream errors
    (UNAVAILABLE, the server's periodic stream resets, ...) reconnect here with backoff and lose
    nothing (what was not acked comes again); anything else ends the stream (`StreamBroken`).
    """

    def __init__(self, project: str, topic_path: str, name: str, labels: Mapping[str, str]) -> None:
        self._path = f"projects/{project}/subscriptions/{name}"
        self._topic_path = topic_path
        self._labels = dict(labels)
        self._admin = pubsub_v1.SubscriberClient()  # create, seek, get, delete: rare, blocking
        self._client_id = uuid.uuid4().hex
        self._metadata = (("x-goog-request-params", f"subscription={quote(self._path, safe='')}"),)
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._requests: asyncio.Queue[Any] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._ended: str | None = "not open"  # why the stream ended (restart_stream, close)

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
                lambda: self._admin.create_subscription(request=request, timeout=ADMIN_TIMEOUT_S)
            )
            log.info("subscription created", extra={"subscription": self._path})
        except gexc.AlreadyExists:
            return False
        return True

    async def open(self) -> OpenResult:
        self._stop_stream()
        created = await self._create()
        complete_from_ms = int(time.time() * 1000)
        self._start_stream()
        self._ended = None
        return OpenResult(complete_from_ms, created)

    def _start_stream(self) -> None:
        if self._channel is None:
            self._channel = _channel(SubscriberGrpcAsyncIOTransport)
        streaming_pull = self._channel.stream_stream(
            "/google.pubsub.v1.Subscriber/StreamingPull",
            request_serializer=_StreamingPullRequest.SerializeToString,
            response_deserializer=_StreamingPullResponse.FromString,
        )
        requests: asyncio.Queue[Any] = asyncio.Queue()
        requests.put_nowait(
            _StreamingPullRequest(
                subscription=self._path,
                stream_ack_deadline_seconds=ACK_DEADLINE_S,
                client_id=self._client_id,
                max_outstanding_messages=FLOW_CONTROL_MAX_MESSAGES,
                max_outstanding_bytes=FLOW_CONTROL_MAX_BYTES,
            )
        )

        async def request_stream() -> AsyncIterator[Any]:
            while (request := await requests.get()) is not None:
                yield request

        self._requests = requests
        self._call = streaming_pull(request_stream(), metadata=self._metadata)
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_forever(requests))

    async def _heartbeat_forever(self, requests: asyncio.Queue[Any]) -> None:
        """An empty request now and then keeps an idle stream open through proxies."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            requests.put_nowait(_StreamingPullRequest())

    async def seek_to(self, time_ms: int) -> bool:
        seconds, millis = divmod(time_ms, 1000)
        request = {
            "subscription": self._path,
            "time": {"seconds": seconds, "nanos": millis * 1_000_000},
        }
        try:
            await _blocking(lambda: self._admin.seek(request=request, timeout=ADMIN_TIMEOUT_S))
        except (gexc.MethodNotImplemented, gexc.FailedPrecondition, gexc.InvalidArgument):
            return False
        log.info("subscription seeked", extra={"subscription": self._path, "to_ms": time_ms})
        return True

    async def restart_stream(self) -> None:
        self._stop_stream("restarted")

    async def next_batch(self) -> list[Delivery]:
        backoff_s = RETRY_INITIAL_S
        while True:
            if self._ended is not None:
                raise StreamBroken(self._ended)
            call = self._call
            try:
                response = await call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or self._ended is None:
                    raise
                raise StreamBroken(self._ended) from None  # restart_stream or close ended it
            except grpc.aio.AioRpcError as exc:
                if call is not self._call:  # replaced meanwhile (restart, reopen)
                    continue
                if exc.code() not in _RETRYABLE:
                    self._stop_stream(f"stream ended: {exc.code().name} {exc.details()}")
                    continue
                log.info("subscription stream reconnecting", extra={"code": exc.code().name})
                self._stop_stream()
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, STREAM_RETRY_MAX_S)
                if self._ended is None:
                    self._start_stream()
                continue
            if response is grpc.aio.EOF:
                if call is self._call:
                    self._stop_stream()
                    self._start_stream()  # the server closed it cleanly: a new one
                continue
            received = response.received_messages
            if not received:
                continue
            assert self._requests is not None
            self._requests.put_nowait(_StreamingPullRequest(ack_ids=[m.ack_id for m in received]))
            return [
                Delivery(
                    data=m.message.data,
                    attributes=m.message.attributes,
                    message_id=m.message.message_id,
                    publish_ms=m.message.publish_time.seconds * 1000
                    + m.message.publish_time.nanos // 1_000_000,
                    ack=_noop,
                )
                for m in received
            ]

    def _stop_stream(self, reason: str | None = None) -> None:
        """Ends the current stream; with a reason, `next_batch` raises StreamBroken until
        `open` starts a new one."""
        if reason is not None:
            self._ended = reason
        call, self._call = self._call, None
        heartbeat, self._heartbeat = self._heartbeat, None
        requests, self._requests = self._requests, None
        if heartbeat is not None:
            heartbeat.cancel()
        if requests is not None:
            requests.put_nowait(None)
        if call is not None:
            call.cancel()

    async def exists(self) -> bool:
        try:
            await _blocking(
                lambda: self._admin.get_subscription(
                    request={"subscription": self._path}, timeout=ADMIN_TIMEOUT_S
                )
            )
        except gexc.NotFound:
            return False
        return True

    async def close(self, *, delete: bool) -> None:
        self._stop_stream("closed")
        if delete:
            try:
                await _blocking(
                    lambda: self._admin.delete_subscription(
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
        await _blocking(self._admin.close)
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


class PubSubBroker(Broker):
    """Publishes through `OrderedPublisher` on a grpc.aio channel (no client threads, see
    ordered_publisher.py); subscribes with the client library's streaming pull."""

    def __init__(
        self, project: str, topic: str, publish_timeout_s: float, batch_latency_s: float
    ) -> None:
        self._project = project
        self._topic_path = f"projects/{project}/topics/{topic}"
        self._timeout_s = publish_timeout_s
        self._batch_latency_s = batch_latency_s
        self._channel: grpc.aio.Channel | None = None
        self._publish_rpc: Any = None
        self._get_topic_rpc: Any = None
        self._publisher: OrderedPublisher | None = None
        # Google's routing header, as the generated client sends it.
        self._metadata = (("x-goog-request-params", f"topic={quote(self._topic_path, safe='')}"),)

    async def start(self) -> None:
        self._channel = _channel(PublisherGrpcAsyncIOTransport)
        self._publish_rpc = self._channel.unary_unary(
            "/google.pubsub.v1.Publisher/Publish",
            request_serializer=_PublishRequest.SerializeToString,
            response_deserializer=_PublishResponse.FromString,
        )
        self._get_topic_rpc = self._channel.unary_unary(
            "/google.pubsub.v1.Publisher/GetTopic",
            request_serializer=_GetTopicRequest.SerializeToString,
            response_deserializer=_Topic.FromString,
        )
        self._publisher = OrderedPublisher(self._send, self._timeout_s, self._batch_latency_s)

    async def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def _send(self, batch: Sequence[Pending], deadline: float) -> Sequence[str]:
        """One Publish request, retried on transient errors until `deadline` (loop time)."""
        request = _PublishRequest(
            topic=self._topic_path,
            messages=[
                _PubsubMessage(
                    data=item.data, attributes=item.attributes, ordering_key=item.ordering_key
                )
                for item in batch
            ],
        )
        loop = asyncio.get_running_loop()
        delay = RETRY_INITIAL_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("Pub/Sub did not confirm the publish in time")
            try:
                response = await self._publish_rpc(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE or deadline - loop.time() <= delay:
                    raise
                log.warning("publish retried", extra={"code": exc.code().name})
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            return response.message_ids

    async def publish(self, message: OutgoingMessage) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("publisher not started")
        try:
            pending = publisher.publish(message.data, message.attributes, message.ordering_key)
            await asyncio.wait_for(pending.future, self._timeout_s)
        except TimeoutError as exc:
            raise BrokerUnavailable("Pub/Sub did not confirm the publish in time") from exc
        except PublishFailed as exc:
            raise BrokerUnavailable(f"Pub/Sub refused the publish: {exc}") from exc

    async def probe(self) -> bool:
        rpc = self._get_topic_rpc
        if rpc is None:
            return False
        try:
            await rpc(
                _GetTopicRequest(topic=self._topic_path),
                timeout=PROBE_TIMEOUT_S,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as exc:
            # The service answered; what it said is for the publish to report.
            return exc.code() in _ANSWERED
        return True

    def subscription(self, name: str, labels: Mapping[str, str]) -> Subscription:
        return PubSubSubscription(self._project, self._topic_path, name, labels)
