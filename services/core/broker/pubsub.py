"""The Google Cloud Pub/Sub broker, on google-cloud-pubsub's async GAPIC clients.

`PublisherAsyncClient` and `SubscriberAsyncClient` (grpc.aio) give the channel, Application
Default Credentials (Workload Identity on GKE), the endpoint (`PUBSUB_API_ENDPOINT`, e.g. a
regional one), TLS and the `x-goog-api-client` header; the admin calls (create, seek, get, delete,
a unary acknowledge) go through them with their retry policy. No client threads anywhere.

Two calls do not go through the clients' proto-plus wrappers, because those cost what the bench
measures: Publish (the api's hot path: `OrderedPublisher`, one ordering key per request) and
StreamingPull (the pod's ingest). They run on the very same channel, with the generated protobuf
classes and the same headers the clients send (`_METADATA`). The client library's threaded
PublisherClient and streaming-pull client cost about twice the CPU (bench scenarios 2-4).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import google.auth
import grpc
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.retry import AsyncRetry, if_exception_type
from google.pubsub_v1.services.publisher import PublisherAsyncClient
from google.pubsub_v1.services.publisher.transports.base import (
    DEFAULT_CLIENT_INFO as PUBLISHER_CLIENT_INFO,
)
from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
    PublisherGrpcAsyncIOTransport,
)
from google.pubsub_v1.services.subscriber import SubscriberAsyncClient
from google.pubsub_v1.services.subscriber.transports.base import (
    DEFAULT_CLIENT_INFO as SUBSCRIBER_CLIENT_INFO,
)
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
    SubscriberGrpcAsyncIOTransport,
)
from google.pubsub_v1.types import pubsub as pubsub_types

from services.core.backoff import backoff_delays
from services.core.broker import (
    Broker,
    BrokerBusy,
    BrokerRefused,
    BrokerUnavailable,
    Delivery,
    OpenResult,
    OutgoingMessage,
    StreamBroken,
    Subscription,
)
from services.core.broker.ordered_publisher import (
    KeyBacklogFull,
    OrderedPublisher,
    Pending,
    PublishFailed,
)

log = logging.getLogger(__name__)

SUBSCRIPTION_EXPIRATION_S = 86400  # the minimum Pub/Sub allows: orphans vanish in a day
SUBSCRIPTION_RETENTION_S = 600  # the minimum: a pod's backlog older than that is useless anyway
ACK_DEADLINE_S = 10  # the minimum: a message lost in transit comes again soon (acked on hand-off)
FLOW_CONTROL_MAX_MESSAGES = 2000
FLOW_CONTROL_MAX_BYTES = 64 * 1024 * 1024
ADMIN_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 3.0
SEEK_TIMEOUT_S = 10.0  # a warm start waits for it
RETRY_INITIAL_S = 0.1
RETRY_MAX_S = 2.0
STREAM_RETRY_MAX_S = 10.0
HEARTBEAT_S = 30.0
# Acknowledge and ModifyAckDeadline requests are limited to 512 KB (and so are a StreamingPull
# request's ack ids); the client library sends at most 1,000 ids a request (dispatcher.py).
ACK_MAX_IDS = 1000
ACK_MAX_BYTES = 400 * 1024
ACK_ID_OVERHEAD_BYTES = 4  # a repeated string's tag and length
# Ack ids written to a stream this recently may not have reached the service when it ended:
# they are sent again (unary, idempotent) with those still queued.
ACK_RESEND_WINDOW_S = 5.0
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
_ADMIN_RETRY = AsyncRetry(
    initial=RETRY_INITIAL_S,
    maximum=RETRY_MAX_S,
    multiplier=2.0,
    predicate=if_exception_type(
        gexc.ServiceUnavailable,
        gexc.DeadlineExceeded,
        gexc.InternalServerError,
        gexc.Aborted,
        gexc.ResourceExhausted,
        gexc.Unknown,
    ),
    timeout=ADMIN_TIMEOUT_S,
)
# What an operator must fix when the service refuses for good (logged at ERROR; docs/pubsub.md).
FIXES = {
    "UNAUTHENTICATED": "credentials were refused: check Workload Identity (the Kubernetes service "
    "account's iam.gke.io/gcp-service-account annotation and its workloadIdentityUser binding)",
    "PERMISSION_DENIED": "the service account lacks a Pub/Sub permission: {need} "
    "(make deploy grants it; see docs/pubsub.md)",
    "NOT_FOUND": "{what} does not exist: create it (make deploy does) or fix "
    "GOOGLE_CLOUD_PROJECT / PUBSUB_TOPIC",
    "INVALID_ARGUMENT": "the request was refused as invalid: check GOOGLE_CLOUD_PROJECT, "
    "PUBSUB_TOPIC and the subscription settings",
    "FAILED_PRECONDITION": "the service refused the request in its current state "
    "(e.g. message ordering or the topic's retention): see docs/pubsub.md",
}
# The generated messages' protobuf classes: serialized by upb, without proto-plus wrappers.
_PublishRequest: Any = pubsub_types.PublishRequest.pb()
_PublishResponse: Any = pubsub_types.PublishResponse.pb()
_PubsubMessage: Any = pubsub_types.PubsubMessage.pb()
_StreamingPullRequest: Any = pubsub_types.StreamingPullRequest.pb()
_StreamingPullResponse: Any = pubsub_types.StreamingPullResponse.pb()
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30000),
]


def _client_options(endpoint: str) -> ClientOptions | None:
    return ClientOptions(api_endpoint=endpoint) if endpoint else None


async def _credentials() -> Any:
    """Application Default Credentials, looked up off the event loop (on GKE it asks the
    metadata server); refreshed later by gRPC's own auth plugin, also off the loop."""
    credentials, _ = await asyncio.to_thread(
        google.auth.default, default_scopes=PublisherGrpcAsyncIOTransport.AUTH_SCOPES
    )
    return credentials


async def publisher_client(endpoint: str) -> PublisherAsyncClient:
    """PUBSUB_EMULATOR_HOST wins (as in the client library), with our channel options;
    otherwise `endpoint` (empty: pubsub.googleapis.com) with ADC and TLS."""
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        channel = grpc.aio.insecure_channel(emulator, options=_CHANNEL_OPTIONS)
        return PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=channel))
    return PublisherAsyncClient(
        credentials=await _credentials(), client_options=_client_options(endpoint)
    )


async def subscriber_client(endpoint: str) -> SubscriberAsyncClient:
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        channel = grpc.aio.insecure_channel(emulator, options=_CHANNEL_OPTIONS)
        return SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
    return SubscriberAsyncClient(
        credentials=await _credentials(), client_options=_client_options(endpoint)
    )


def _metadata(routing: str, client_info: Any) -> tuple[tuple[str, str], ...]:
    """The headers the generated client sends: its routing header and `x-goog-api-client`."""
    return (("x-goog-request-params", routing), client_info.to_grpc_metadata())


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="")


def ack_chunks(ack_ids: Sequence[str]) -> Iterator[list[str]]:
    """Ack ids in groups inside the service's request limits (count and bytes)."""
    chunk: list[str] = []
    size = 0
    for ack_id in ack_ids:
        cost = len(ack_id) + ACK_ID_OVERHEAD_BYTES
        if chunk and (len(chunk) >= ACK_MAX_IDS or size + cost > ACK_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(ack_id)
        size += cost
    if chunk:
        yield chunk


def describe_refusal(code: str, need: str, what: str) -> str:
    """What to fix for a permanent error code, for the ERROR log line."""
    return FIXES.get(code, "see docs/pubsub.md").format(need=need, what=what)


class PubSubSubscription(Subscription):
    """The pod's subscription, read with StreamingPull on the subscriber client's channel.

    Messages are acknowledged as `next_batch` hands them over, before they are handled: handing
    over is in order and handling does not fail, and with ordering keys Pub/Sub holds a key's
    next message until the previous one is acked. Acks travel on the stream, in chunks inside
    the service's limits; those still queued (or just written) when a stream ends are sent again
    with a unary Acknowledge, so no ack is silently lost. The stream's client id stays the same
    across reconnects, so Pub/Sub carries the keys' ordering state over. Transient stream errors
    (UNAVAILABLE, the server's periodic stream resets, ...) reconnect here with jittered backoff
    and lose nothing (what was not acked comes again); anything else ends the stream
    (`StreamBroken`, permanent) and the pump reopens it with its own backoff.
    """

    def __init__(
        self,
        client: Callable[[], Awaitable[SubscriberAsyncClient]],
        retention_ms: Callable[[], Awaitable[int | None]],
        project: str,
        topic_path: str,
        name: str,
        labels: Mapping[str, str],
    ) -> None:
        self._get_client = client
        self._retention_ms = retention_ms
        self._client: Any = None
        self._path = f"projects/{project}/subscriptions/{name}"
        self._topic_path = topic_path
        self._labels = dict(labels)
        self._client_id = uuid.uuid4().hex
        self._metadata = _metadata(f"subscription={_quote(self._path)}", SUBSCRIBER_CLIENT_INFO)
        self._streaming_pull: Any = None
        self._call: Any = None
        self._requests: asyncio.Queue[Any] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._written_acks: deque[tuple[float, list[str]]] = deque()
        self._ack_tasks: set[asyncio.Task[None]] = set()
        self._ended: StreamBroken | None = StreamBroken("not open")
        self.acks_resent = 0

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
            await self._client.create_subscription(
                request=request, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_S
            )
        except gexc.AlreadyExists:
            return False
        log.info("subscription created", extra={"subscription": self._path})
        return True

    async def open(self, seek_to_ms: int | None = None) -> OpenResult:
        self._stop_stream()
        if self._client is None:
            self._client = await self._get_client()
            self._streaming_pull = self._client.transport.grpc_channel.stream_stream(
                "/google.pubsub.v1.Subscriber/StreamingPull",
                request_serializer=_StreamingPullRequest.SerializeToString,
                response_deserializer=_StreamingPullResponse.FromString,
            )
        try:
            created = await self._create()
        except gexc.GoogleAPICallError as exc:
            code = exc.grpc_status_code
            if code is None or code in _RETRYABLE:
                raise
            raise BrokerRefused(
                f"CreateSubscription: {code.name} {exc.message}",
                code.name,
                describe_refusal(
                    code.name,
                    "pubsub.subscriptions.create on the project and "
                    "pubsub.topics.attachSubscription on the topic",
                    f"the topic {self._topic_path}",
                ),
            ) from exc
        created_ms = int(time.time() * 1000)
        seeked_to_ms = None
        if created and seek_to_ms is not None:
            seeked_to_ms = await self._seek_within_retention(seek_to_ms, created_ms)
        self._start_stream()
        self._ended = None
        return OpenResult(created_ms, created, seeked_to_ms)

    async def _seek_within_retention(self, seek_to_ms: int, created_ms: int) -> int | None:
        """Seeks before the stream starts (the replay then comes first, in each key's order),
        no further back than the topic retains: the service takes a seek before that and
        replays nothing of it, which would claim a history the pod does not have."""
        retention_ms = await self._retention_ms()
        if not retention_ms:
            log.warning(
                "the topic retains no messages (or its retention cannot be read: "
                "pubsub.topics.get): no warm start",
                extra={"topic": self._topic_path},
            )
            return None
        seek_to_ms = max(seek_to_ms, created_ms - retention_ms)
        return seek_to_ms if await self._seek(seek_to_ms) else None

    def _start_stream(self) -> None:
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
        written = self._written_acks

        async def request_stream() -> AsyncIterator[Any]:
            while (request := await requests.get()) is not None:
                yield request
                if request.ack_ids:  # gRPC has written it by the time it asks for the next
                    written.append((time.monotonic(), list(request.ack_ids)))

        self._requests = requests
        self._call = self._streaming_pull(request_stream(), metadata=self._metadata)
        self._heartbeat = asyncio.get_running_loop().create_task(self._heartbeat_forever(requests))

    async def _heartbeat_forever(self, requests: asyncio.Queue[Any]) -> None:
        """An empty request now and then keeps an idle stream open through proxies."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            requests.put_nowait(_StreamingPullRequest())

    async def _seek(self, time_ms: int) -> bool:
        seconds, millis = divmod(time_ms, 1000)
        request = {
            "subscription": self._path,
            "time": {"seconds": seconds, "nanos": millis * 1_000_000},
        }
        try:
            await self._client.seek(
                request=request,
                retry=_ADMIN_RETRY.with_timeout(SEEK_TIMEOUT_S),
                timeout=SEEK_TIMEOUT_S,
            )
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            log.warning(
                "seek failed: history starts at the subscription's creation",
                extra={"subscription": self._path, "error": str(exc)},
            )
            return False
        log.info("subscription seeked", extra={"subscription": self._path, "to_ms": time_ms})
        return True

    async def restart_stream(self) -> None:
        self._stop_stream(StreamBroken("restarted"))

    async def next_batch(self) -> list[Delivery]:
        delays = backoff_delays(RETRY_INITIAL_S, STREAM_RETRY_MAX_S)
        while True:
            if self._ended is not None:
                raise self._ended
            call = self._call
            try:
                response = await call.read()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if (task is not None and task.cancelling()) or self._ended is None:
                    raise
                raise self._ended from None  # restart_stream or close ended it
            except grpc.aio.AioRpcError as exc:
                if call is not self._call:  # replaced meanwhile (restart, reopen)
                    continue
                code = exc.code()
                if code not in _RETRYABLE:
                    self._stop_stream(
                        StreamBroken(
                            f"stream ended: {code.name} {exc.details()}",
                            code=code.name,
                            permanent=True,
                            fix=describe_refusal(
                                code.name,
                                "pubsub.subscriptions.consume (roles/pubsub.subscriber)",
                                f"the subscription {self._path} or its topic",
                            ),
                        )
                    )
                    continue
                log.info("subscription stream reconnecting", extra={"code": code.name})
                self._stop_stream()
                await asyncio.sleep(next(delays))
                if self._ended is None:
                    self._start_stream()
                continue
            if response is grpc.aio.EOF:
                if call is self._call:
                    self._stop_stream()
                    await asyncio.sleep(next(delays))
                    if self._ended is None:
                        self._start_stream()  # the server closed it cleanly: a new one
                continue
            received = response.received_messages
            if not received:
                continue
            delays = backoff_delays(RETRY_INITIAL_S, STREAM_RETRY_MAX_S)
            assert self._requests is not None
            for chunk in ack_chunks([m.ack_id for m in received]):
                self._requests.put_nowait(_StreamingPullRequest(ack_ids=chunk))
            return [
                Delivery(
                    data=m.message.data,
                    attributes=m.message.attributes,
                    message_id=m.message.message_id,
                    publish_ms=m.message.publish_time.seconds * 1000
                    + m.message.publish_time.nanos // 1_000_000,
                )
                for m in received
            ]

    def _stop_stream(self, ended: StreamBroken | None = None) -> None:
        """Ends the current stream; with `ended`, `next_batch` raises it until `open` starts a
        new one. Acks that may not have reached the service go again, unary."""
        if ended is not None:
            self._ended = ended
        call, self._call = self._call, None
        heartbeat, self._heartbeat = self._heartbeat, None
        requests, self._requests = self._requests, None
        if heartbeat is not None:
            heartbeat.cancel()
        unsent: list[str] = []
        if requests is not None:
            while not requests.empty():
                request = requests.get_nowait()
                if request is not None:
                    unsent.extend(request.ack_ids)
            requests.put_nowait(None)
        horizon = time.monotonic() - ACK_RESEND_WINDOW_S
        for written_at, ack_ids in self._written_acks:
            if written_at >= horizon:
                unsent.extend(ack_ids)
        self._written_acks.clear()
        if call is not None:
            call.cancel()
        if unsent:
            self.acks_resent += len(unsent)
            task = asyncio.get_running_loop().create_task(self._acknowledge(unsent))
            self._ack_tasks.add(task)
            task.add_done_callback(self._ack_tasks.discard)

    async def _acknowledge(self, ack_ids: list[str]) -> None:
        """Unary Acknowledge with the client's retry policy, chunked inside the limits."""
        for chunk in ack_chunks(ack_ids):
            try:
                await self._client.acknowledge(
                    subscription=self._path,
                    ack_ids=chunk,
                    retry=_ADMIN_RETRY,
                    timeout=ACK_DEADLINE_S,
                )
            except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
                # Past the ack deadline the messages come again; history drops the duplicates.
                log.warning(
                    "acknowledge failed; the messages will be redelivered",
                    extra={"subscription": self._path, "ack_ids": len(chunk), "error": str(exc)},
                )

    async def exists(self) -> bool:
        if self._client is None:
            self._client = await self._get_client()
        try:
            await self._client.get_subscription(
                subscription=self._path, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_S
            )
        except gexc.NotFound:
            return False
        return True

    async def close(self, *, delete: bool) -> None:
        self._stop_stream(StreamBroken("closed"))
        if self._ack_tasks:
            await asyncio.gather(*self._ack_tasks, return_exceptions=True)
        if delete and self._client is not None:
            try:
                await self._client.delete_subscription(
                    subscription=self._path, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_S
                )
                log.info("subscription deleted", extra={"subscription": self._path})
            except gexc.NotFound:
                pass
            except (gexc.GoogleAPICallError, gexc.RetryError):
                log.warning(
                    "could not delete subscription; it expires after a day unused",
                    extra={"subscription": self._path},
                    exc_info=True,
                )


class PubSubBroker(Broker):
    """Publishes through `OrderedPublisher` on the publisher client's channel; subscriptions
    read with StreamingPull (`PubSubSubscription`)."""

    def __init__(
        self,
        project: str,
        topic: str,
        publish_timeout_s: float,
        batch_latency_s: float,
        api_endpoint: str = "",
        key_max_messages: int = 10_000,
        key_max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._project = project
        self._topic_path = f"projects/{project}/topics/{topic}"
        self._timeout_s = publish_timeout_s
        self._batch_latency_s = batch_latency_s
        self._endpoint = api_endpoint
        self._key_max_messages = key_max_messages
        self._key_max_bytes = key_max_bytes
        self._publisher_client: PublisherAsyncClient | None = None
        self._subscriber_client: SubscriberAsyncClient | None = None
        self._publish_rpc: Any = None
        self._publisher: OrderedPublisher | None = None
        self._metadata = _metadata(f"topic={_quote(self._topic_path)}", PUBLISHER_CLIENT_INFO)
        self._last_probe_error: str | None = None

    @property
    def publisher(self) -> OrderedPublisher | None:
        return self._publisher

    async def start(self) -> None:
        client = self._publisher_client = await publisher_client(self._endpoint)
        transport: Any = client.transport  # grpc_asyncio: has the channel
        self._publish_rpc = transport.grpc_channel.unary_unary(
            "/google.pubsub.v1.Publisher/Publish",
            request_serializer=_PublishRequest.SerializeToString,
            response_deserializer=_PublishResponse.FromString,
        )
        self._publisher = OrderedPublisher(
            self._send,
            self._timeout_s,
            self._batch_latency_s,
            key_max_messages=self._key_max_messages,
            key_max_bytes=self._key_max_bytes,
        )

    async def close(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()
        for client in (self._publisher_client, self._subscriber_client):
            if client is not None:
                transport: Any = client.transport
                await transport.close()
        self._publisher_client = self._subscriber_client = None

    async def _send(self, batch: Sequence[Pending], deadline: float) -> Sequence[str]:
        """One Publish request (one ordering key), retried with jittered backoff on transient
        errors until `deadline` (loop time)."""
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
        delays = backoff_delays(RETRY_INITIAL_S, RETRY_MAX_S)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError("Pub/Sub did not confirm the publish in time")
            try:
                response = await self._publish_rpc(
                    request, timeout=remaining, metadata=self._metadata
                )
            except grpc.aio.AioRpcError as exc:
                delay = next(delays)
                if exc.code() not in _RETRYABLE or deadline - loop.time() <= delay:
                    if exc.code() not in _RETRYABLE:
                        self._log_refusal(exc.code().name, exc.details() or "", "publish")
                    raise
                log.warning("publish retried", extra={"code": exc.code().name})
                await asyncio.sleep(delay)
                continue
            return list(response.message_ids)

    def _log_refusal(self, code: str, details: str, call: str) -> None:
        need = "pubsub.topics.publish (roles/pubsub.publisher on the topic)"
        if call == "probe":
            need = "pubsub.topics.get (roles/pubsub.viewer on the topic)"
        log.error(
            f"Pub/Sub refused {call}: {code}",
            extra={
                "code": code,
                "details": details,
                "topic": self._topic_path,
                "fix": describe_refusal(code, need, f"the topic {self._topic_path}"),
            },
        )

    async def publish(self, message: OutgoingMessage) -> None:
        await self.publish_many([message])

    async def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        publisher = self._publisher
        if publisher is None:
            raise BrokerUnavailable("publisher not started")
        try:
            pendings = publisher.publish_all(
                [(m.data, m.attributes, m.ordering_key) for m in messages]
            )
        except KeyBacklogFull as exc:
            raise BrokerBusy(str(exc)) from exc
        except PublishFailed as exc:
            raise BrokerUnavailable(f"Pub/Sub refused the publish: {exc}") from exc
        try:
            if len(pendings) == 1:
                await asyncio.wait_for(pendings[0].future, self._timeout_s)
            else:
                await asyncio.wait_for(
                    asyncio.gather(*(p.future for p in pendings)), self._timeout_s
                )
        except TimeoutError as exc:
            raise BrokerUnavailable("Pub/Sub did not confirm the publish in time") from exc
        except PublishFailed as exc:
            raise BrokerUnavailable(f"Pub/Sub refused the publish: {exc}") from exc

    async def probe(self) -> bool:
        """GetTopic: up only when it answers. Authentication, permission and not-found errors
        are down too (a Workload Identity mistake or a missing topic must not look healthy),
        logged once per change with what to fix."""
        client = self._publisher_client
        if client is None:
            return False
        try:
            await client.get_topic(topic=self._topic_path, retry=None, timeout=PROBE_TIMEOUT_S)
        except gexc.GoogleAPICallError as exc:
            code = exc.grpc_status_code.name if exc.grpc_status_code else type(exc).__name__
            if code != self._last_probe_error:
                self._last_probe_error = code
                if exc.grpc_status_code in _RETRYABLE:
                    log.warning("Pub/Sub does not answer", extra={"code": code})
                else:
                    self._log_refusal(code, exc.message, "probe")
            return False
        if self._last_probe_error is not None:
            log.info("Pub/Sub answers again", extra={"was": self._last_probe_error})
            self._last_probe_error = None
        return True

    async def _topic_retention_ms(self) -> int | None:
        """The topic's message retention, or None when it cannot be read."""
        client = self._publisher_client
        if client is None:
            return None
        try:
            topic = await client.get_topic(
                topic=self._topic_path, retry=_ADMIN_RETRY, timeout=ADMIN_TIMEOUT_S
            )
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            log.warning(
                "cannot read the topic", extra={"topic": self._topic_path, "error": str(exc)}
            )
            return None
        duration = topic.message_retention_duration
        return int(duration.total_seconds() * 1000) if duration else 0

    async def _subscriber(self) -> SubscriberAsyncClient:
        if self._subscriber_client is None:
            self._subscriber_client = await subscriber_client(self._endpoint)
        return self._subscriber_client

    def subscription(self, name: str, labels: Mapping[str, str]) -> Subscription:
        return PubSubSubscription(
            self._subscriber,
            self._topic_retention_ms,
            self._project,
            self._topic_path,
            name,
            labels,
        )
