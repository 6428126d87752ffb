"""The strict stand-in: a gRPC server in front of the Pub/Sub emulator that behaves, where it
matters to pubsock, like the real service and not like the emulator.

What it adds to the emulator (docs/pubsub.md lists the same):
- the request rules of rules.py (one ordering key per Publish, sizes, ack request sizes);
- a new subscription sees only messages published after its creation (the emulator replays a
  retained topic's whole backlog to every new subscription: dropped here, and acked upstream);
- `Seek` to a time, which the emulator answers with 501: the stand-in keeps the topic's retained
  messages itself (a "tap" subscription of its own per topic, trimmed to the topic's retention)
  and replays those published from the seek time up to the subscription's creation before
  anything else on the stream. Seeking forward drops what is older. (A seek does not redeliver
  what the subscription acked after its creation; pubsock never seeks that way.)
- StreamingPull streams closed by the server now and then with UNAVAILABLE;
- an ordering key's order across redeliveries, as the real service keeps it (`SubState.owed`):
  the emulator queues a nacked message behind the key's messages already waiting, and hands out
  a key's later messages while an earlier one is lost on a stream that ended;
- TLS and an `authorization: Bearer` check against the tokens its fake GCE metadata server
  (admin.py) issued, with accounts that are refused (UNAUTHENTICATED, PERMISSION_DENIED);
- controls for tests and the soak: close every stream now, answer UNAVAILABLE for a while, stall
  one subscription's streams, make seeks fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1.types import pubsub as pubsub_types

from devtools.strictpubsub.rules import Refusal, check_ack_ids, check_publish

log = logging.getLogger("strictpubsub")

PUBLISHER = "/google.pubsub.v1.Publisher/"
SUBSCRIBER = "/google.pubsub.v1.Subscriber/"
REPLAY_ACK_PREFIX = "strictpubsub-replay-"
TAP_CATCH_UP_S = 5.0
UNSEEN_FORGET_S = 10.0
EARLY_MAX = 10_000
_ABSENT = object()
UNAVAILABLE_TEXT = "The service was unable to fulfill your request. Please try again. [Code: 14]"

_PublishRequest: Any = pubsub_types.PublishRequest.pb()
_PublishResponse: Any = pubsub_types.PublishResponse.pb()
_Subscription: Any = pubsub_types.Subscription.pb()
_DeleteSubscriptionRequest: Any = pubsub_types.DeleteSubscriptionRequest.pb()
_SeekRequest: Any = pubsub_types.SeekRequest.pb()
_SeekResponse: Any = pubsub_types.SeekResponse.pb()
_AcknowledgeRequest: Any = pubsub_types.AcknowledgeRequest.pb()
_ModifyAckDeadlineRequest: Any = pubsub_types.ModifyAckDeadlineRequest.pb()
_StreamingPullRequest: Any = pubsub_types.StreamingPullRequest.pb()
_StreamingPullResponse: Any = pubsub_types.StreamingPullResponse.pb()
_GetTopicRequest: Any = pubsub_types.GetTopicRequest.pb()
_Topic: Any = pubsub_types.Topic.pb()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _publish_ms(message: Any) -> int:
    return int(message.publish_time.seconds * 1000 + message.publish_time.nanos // 1_000_000)


def _place(message: Any) -> tuple[str, int] | None:
    """(ordering key, place in the key's order), or None for a message without a key. The
    emulator numbers messages as they are published (pinned in test_strict_pubsub.py)."""
    key: str = message.ordering_key
    message_id: str = message.message_id
    if not key or not message_id.isdigit():
        return None
    return key, int(message_id)


@dataclass
class Account:
    """Who a token stands for, and which methods (by short name) it may call; None: all."""

    name: str
    allowed: frozenset[str] | None = None


ACCOUNTS = {
    "default": Account("default"),
    "denied": Account("denied", frozenset()),
    # roles/pubsub.publisher only: publishes, but may not GetTopic (the api's probe).
    "publisher-only": Account("publisher-only", frozenset({"Publish"})),
}


@dataclass
class Topic:
    """A topic's retained messages, read by the stand-in's own tap subscription."""

    path: str
    tap_path: str
    retention_ms: int
    messages: deque[tuple[int, Any]] = field(default_factory=deque)  # (publish ms, PubsubMessage)
    unseen: dict[str, float] = field(default_factory=dict)  # published, not yet tapped
    # Tapped before their Publish returned here (the tap can be that quick): not unseen.
    early: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # Publish calls forwarded and not yet answered (their messages' ids are not known yet).
    in_flight: dict[int, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # a tap read, a Publish answer
    task: asyncio.Task[None] | None = None
    _calls: Iterator[int] = field(default_factory=itertools.count)

    def publishing(self, sent: float) -> int:
        call = next(self._calls)
        self.in_flight[call] = sent
        return call

    def published(self, call: int, message_ids: Iterable[str]) -> None:
        sent = self.in_flight.pop(call)
        for message_id in message_ids:
            if self.early.pop(message_id, _ABSENT) is _ABSENT:
                self.unseen[message_id] = sent
        self.changed.set()

    def tapped_one(self, message_id: str) -> None:
        if self.unseen.pop(message_id, _ABSENT) is _ABSENT:
            self.early[message_id] = None
            while len(self.early) > EARLY_MAX:  # published elsewhere, not through the stand-in
                self.early.popitem(last=False)

    def trim(self) -> None:
        if not self.retention_ms:
            self.messages.clear()
            return
        horizon = _now_ms() - self.retention_ms
        while self.messages and self.messages[0][0] < horizon:
            self.messages.popleft()

    async def caught_up(self, before: float, timeout_s: float) -> bool:
        """Waits until every message published before `before` (monotonic) is tapped, those
        of Publish calls not yet answered included."""
        deadline = time.monotonic() + timeout_s
        # A message published while the tap itself was gone (the emulator restarted) never
        # comes: forget what waited longer than any tap lag.
        stale = time.monotonic() - UNSEEN_FORGET_S
        for message_id in [m for m, sent in self.unseen.items() if sent < stale]:
            del self.unseen[message_id]
        while any(sent <= before for sent in (*self.unseen.values(), *self.in_flight.values())):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return True


@dataclass
class SubState:
    """A subscription created through the stand-in: what it may see, and what it must replay."""

    path: str
    topic: str
    floor_ms: int  # messages published before this are not the subscription's
    replay: deque[Any] = field(default_factory=deque)  # PubsubMessages to deliver first
    # Replayed from the floor's own millisecond: the emulator may deliver them too (dropped).
    replayed_at_floor: set[str] = field(default_factory=set)
    streams: set[Stream] = field(default_factory=set)
    # A key's messages that must come again before its later ones go out: given back from a
    # stream that ended (None), or handed out there and not acknowledged (their ack id).
    owed: dict[str, dict[int, str | None]] = field(default_factory=dict)  # key -> {seq: ack id}
    owed_acks: dict[str, tuple[str, int]] = field(default_factory=dict)  # ack id -> (key, seq)

    def owe(self, key: str, seq: int, ack_id: str | None = None) -> None:
        owed = self.owed.setdefault(key, {})
        if ack_id is None:
            owed.setdefault(seq, None)
            return
        previous = owed.get(seq)
        if previous is not None:
            self.owed_acks.pop(previous, None)
        owed[seq] = ack_id
        self.owed_acks[ack_id] = (key, seq)

    def settle(self, key: str, seq: int) -> bool:
        """`seq` of `key` came again or was acknowledged; True if that may free later ones."""
        owed = self.owed.get(key)
        if owed is None or seq not in owed:
            return False
        ack_id = owed.pop(seq)
        if ack_id is not None:
            self.owed_acks.pop(ack_id, None)
        if not owed:
            del self.owed[key]
        return True

    def acknowledged(self, ack_ids: Iterable[str]) -> None:
        """The client acknowledged these (on a stream, or unary after its stream ended)."""
        settled = False
        for ack_id in ack_ids:
            for stream in self.streams:
                stream.acknowledged(ack_id)
            owed = self.owed_acks.get(ack_id)
            if owed is not None:
                settled |= self.settle(*owed)
        if settled:
            self.wake()

    def release(self, stream: Stream, received: Iterable[Any]) -> list[Any]:
        """What of `received` and of what `stream` holds back may go to its client now: a
        message waits while an earlier one of its key is owed. Each key goes out in order."""
        waiting = [*stream.blocked, *received]
        stream.blocked = []
        out: list[Any] = []
        gated: dict[str, list[tuple[int, Any]]] = {}
        for item in waiting:
            place = _place(item.message)
            if place is not None and place[0] in self.owed:
                gated.setdefault(place[0], []).append((place[1], item))
            else:
                out.append(item)
        settled = False
        for key, items in gated.items():
            items.sort(key=lambda pair: pair[0])
            for i, (seq, item) in enumerate(items):
                owed = self.owed.get(key)
                if owed and min(owed) < seq:
                    stream.blocked.extend(later for _, later in items[i:])
                    break
                settled |= self.settle(key, seq)
                out.append(item)
        if settled:
            self.wake(but=stream)
        return out

    def wake(self, but: Stream | None = None) -> None:
        """Streams holding messages back look again."""
        for stream in self.streams:
            if stream is not but and stream.blocked:
                stream.events.put_nowait(("recheck",))


class Stream:
    """One StreamingPull call as the stand-in serves it; controls reach it through `events`."""

    def __init__(self, subscription: str) -> None:
        self.subscription = subscription
        self.ended = False  # the client's side is over; what still comes upstream is nacked
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.stalled = False
        self.unstalled = asyncio.Event()
        self.pending = 0  # messages received upstream, not yet sent to the client
        # Handed out and not acknowledged: ack id -> (key, seq), and each message's latest ack id.
        self.unacked: dict[str, tuple[str, int]] = {}
        self.handed: dict[tuple[str, int], str] = {}
        self.blocked: list[Any] = []  # ReceivedMessages waiting for an earlier one of their key

    def handed_out(self, ack_id: str, place: tuple[str, int]) -> None:
        earlier = self.handed.get(place)
        if earlier is not None:  # a copy handed out again: its latest ack id counts
            self.unacked.pop(earlier, None)
        self.handed[place] = ack_id
        self.unacked[ack_id] = place

    def acknowledged(self, ack_id: str) -> None:
        place = self.unacked.pop(ack_id, None)
        if place is not None and self.handed.get(place) == ack_id:
            del self.handed[place]

    def close(self, code: grpc.StatusCode, details: str) -> None:
        self.unstalled.set()
        self.events.put_nowait(("close", code, details))

    def stall(self) -> None:
        self.stalled = True
        self.unstalled.clear()

    def unstall(self) -> None:
        self.stalled = False
        self.unstalled.set()


class StandIn:
    def __init__(
        self,
        upstream: str,
        stream_lifetime_s: tuple[float, float] | None = (10.0, 40.0),
        seed: int | None = None,
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            upstream,
            options=[
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", -1),
            ],
        )
        self._stream_lifetime_s = stream_lifetime_s
        self._random = random.Random(seed)
        self._tokens: dict[str, Account] = {}
        self._topics: dict[str, Topic] = {}
        self._topic_locks: dict[str, asyncio.Lock] = {}
        self._subs: dict[str, SubState] = {}
        self._streams: set[Stream] = set()
        self._replay_ids = itertools.count(1)
        self._tap_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.outage_until = 0.0
        self.seek_fails = False
        self.refused: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    # -- credentials -------------------------------------------------------------------------
    def issue_token(self, account: str) -> str:
        """A token for `account`; an account the stand-in does not know gets one it refuses."""
        token = f"ya29.strictpubsub-{account}-{secrets.token_urlsafe(12)}"
        known = ACCOUNTS.get(account)
        if known is not None:
            self._tokens[token] = known
        return token

    async def _admit(self, context: grpc.aio.ServicerContext, method: str) -> None:
        name = method.rsplit("/", 1)[1]
        self.calls[name] += 1
        if time.monotonic() < self.outage_until:
            await self._refuse(context, "outage", grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_TEXT)
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        token = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
        account = self._tokens.get(token)
        if account is None:
            await self._refuse(
                context,
                "unauthenticated",
                grpc.StatusCode.UNAUTHENTICATED,
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            )
            return
        if account.allowed is not None and name not in account.allowed:
            await self._refuse(
                context,
                "permission",
                grpc.StatusCode.PERMISSION_DENIED,
                f"User not authorized to perform this action. ({account.name} may not {name})",
            )

    async def _refuse(
        self, context: grpc.aio.ServicerContext, rule: str, code: grpc.StatusCode, details: str
    ) -> None:
        self.refused[rule] += 1
        log.info("refused", extra={"rule": rule, "code": code.name, "details": details})
        await context.abort(code, details)

    async def _check(self, context: grpc.aio.ServicerContext, rule: str, refusal: Refusal) -> None:
        if refusal is not None:
            await self._refuse(context, rule, refusal[0], refusal[1])

    # -- controls ----------------------------------------------------------------------------
    def close_streams(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> int:
        streams = list(self._streams)
        for stream in streams:
            stream.close(code, UNAVAILABLE_TEXT)
        return len(streams)

    def unavailable_for(self, seconds: float) -> None:
        self.outage_until = time.monotonic() + seconds
        self.close_streams()

    def stall(self, subscription_part: str) -> int:
        """Stalls the open streams of every subscription whose name contains the text: they
        stay open and deliver nothing. A new stream is not stalled."""
        streams = [s for s in self._streams if subscription_part in s.subscription]
        for stream in streams:
            stream.stall()
        return len(streams)

    def unstall(self) -> None:
        for stream in self._streams:
            stream.unstall()

    def state(self) -> dict[str, Any]:
        return {
            "refused": dict(self.refused),
            "calls": dict(self.calls),
            "streams": len(self._streams),
            "held": sum(s.pending for s in self._streams if s.stalled),
            "subscriptions": sorted(self._subs),
            "seek_fails": self.seek_fails,
            "outage_s": max(0.0, self.outage_until - time.monotonic()),
            "topics": {
                path: {
                    "retained": len(topic.messages),
                    "retention_ms": topic.retention_ms,
                    "unseen": len(topic.unseen),
                }
                for path, topic in self._topics.items()
            },
        }

    # -- gRPC plumbing -----------------------------------------------------------------------
    def handler(self) -> grpc.GenericRpcHandler:
        standin = self

        class Handler(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc has no types
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                method: str = details.method
                if method == SUBSCRIBER + "StreamingPull":
                    return grpc.stream_stream_rpc_method_handler(standin._streaming_pull)
                if method.startswith((PUBLISHER, SUBSCRIBER)):
                    return grpc.unary_unary_rpc_method_handler(standin._unary_for(method))
                return None

        return Handler()

    async def _forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        try:
            response: bytes = await self._channel.unary_unary(method)(
                request, timeout=context.time_remaining()
            )
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        return response

    def _unary_for(self, method: str) -> Callable[[bytes, grpc.aio.ServicerContext], Any]:
        name = method.rsplit("/", 1)[1]
        special = {
            "Publish": self._publish,
            "CreateSubscription": self._create_subscription,
            "DeleteSubscription": self._delete_subscription,
            "Seek": self._seek,
            "Acknowledge": self._acknowledge,
            "ModifyAckDeadline": self._modify_ack_deadline,
        }.get(name)

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await self._admit(context, method)
            if special is not None:
                return await special(method, request, context)
            return await self._forward(method, request, context)

        return handle

    # -- publisher ---------------------------------------------------------------------------
    async def _publish(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = _PublishRequest.FromString(raw)
        await self._check(context, "publish", check_publish(request))
        topic = await self._topic(request.topic, context)
        if topic is None:
            return await self._forward(method, raw, context)
        call = topic.publishing(time.monotonic())
        message_ids: Iterable[str] = ()
        try:
            response_raw = await self._forward(method, raw, context)
            message_ids = _PublishResponse.FromString(response_raw).message_ids
        finally:
            topic.published(call, message_ids)
        return response_raw

    async def _topic(self, path: str, context: grpc.aio.ServicerContext | None) -> Topic | None:
        """The topic's tap, created on first sight; None if the topic does not exist."""
        topic = self._topics.get(path)
        if topic is not None:
            return topic
        lock = self._topic_locks.setdefault(path, asyncio.Lock())
        async with lock:
            topic = self._topics.get(path)
            if topic is not None:
                return topic
            try:
                raw = await self._channel.unary_unary(PUBLISHER + "GetTopic")(
                    _GetTopicRequest(topic=path).SerializeToString(), timeout=10
                )
            except grpc.aio.AioRpcError:
                return None
            described = _Topic.FromString(raw)
            retention_ms = described.message_retention_duration.seconds * 1000
            project = path.split("/")[1]
            tap_path = f"projects/{project}/subscriptions/strictpubsub-tap-{next(self._tap_ids)}"
            await self._channel.unary_unary(SUBSCRIBER + "CreateSubscription")(
                _Subscription(
                    name=tap_path, topic=path, ack_deadline_seconds=60, enable_message_ordering=True
                ).SerializeToString(),
                timeout=10,
            )
            topic = Topic(path, tap_path, retention_ms)
            topic.task = asyncio.get_running_loop().create_task(self._tap(topic))
            self._topics[path] = topic
            return topic

    async def _tap(self, topic: Topic) -> None:
        """Reads every message of the topic into its retained store, forever."""
        pull = self._channel.stream_stream(SUBSCRIBER + "StreamingPull")
        while True:
            requests: asyncio.Queue[Any] = asyncio.Queue()
            requests.put_nowait(
                _StreamingPullRequest(
                    subscription=topic.tap_path, stream_ack_deadline_seconds=60
                ).SerializeToString()
            )

            async def request_stream(queue: asyncio.Queue[Any] = requests) -> AsyncIterator[Any]:
                while (item := await queue.get()) is not None:
                    yield item

            call = pull(request_stream())
            try:
                async for raw in call:
                    response = _StreamingPullResponse.FromString(raw)
                    ack_ids = []
                    for received in response.received_messages:
                        message = received.message
                        topic.messages.append((_publish_ms(message), message))
                        topic.tapped_one(message.message_id)
                        ack_ids.append(received.ack_id)
                    topic.trim()
                    topic.changed.set()
                    if ack_ids:
                        requests.put_nowait(
                            _StreamingPullRequest(ack_ids=ack_ids).SerializeToString()
                        )
            except grpc.aio.AioRpcError as exc:
                log.info("tap stream ended", extra={"code": exc.code().name})
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # the emulator restarted: again
                    topic.early.clear()  # its message ids start over; the old ones are gone
                    topic.unseen.clear()
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await self._channel.unary_unary(SUBSCRIBER + "CreateSubscription")(
                            _Subscription(
                                name=topic.tap_path,
                                topic=topic.path,
                                ack_deadline_seconds=60,
                                enable_message_ordering=True,
                            ).SerializeToString(),
                            timeout=10,
                        )
            finally:
                requests.put_nowait(None)
                call.cancel()
            await asyncio.sleep(0.2)

    # -- subscriptions -----------------------------------------------------------------------
    async def _create_subscription(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = _Subscription.FromString(raw)
        await self._topic(request.topic, None)
        response = await self._forward(method, raw, context)
        # The new subscription's own messages are those published once the emulator has it:
        # taken before the call, the floor let a message published during it fall between a
        # seek's replay and the emulator's delivery (which began later). A message stamped in
        # the floor's own millisecond may come before or after the creation: the emulator's
        # copy is kept, and a seek replays it too (then the emulator's copy is dropped).
        floor_ms = _now_ms()
        self._subs[request.name] = SubState(request.name, request.topic, floor_ms)
        return response

    async def _delete_subscription(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = _DeleteSubscriptionRequest.FromString(raw)
        response = await self._forward(method, raw, context)
        sub = self._subs.pop(request.subscription, None)
        if sub is not None:
            for stream in list(sub.streams):
                stream.close(
                    grpc.StatusCode.NOT_FOUND, "Resource not found (resource=subscription)."
                )
        return response

    async def _seek(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        request = _SeekRequest.FromString(raw)
        sub = self._subs.get(request.subscription)
        if not request.HasField("time") or sub is None:
            return await self._forward(method, raw, context)
        if self.seek_fails:
            await self._refuse(
                context,
                "seek_control",
                grpc.StatusCode.FAILED_PRECONDITION,
                "Seek failed (strictpubsub control: seeks fail).",
            )
        time_ms = int(request.time.seconds * 1000 + request.time.nanos // 1_000_000)
        topic = await self._topic(sub.topic, None)
        if time_ms > sub.floor_ms:
            sub.floor_ms = time_ms  # forward: older messages are acknowledged
            sub.replay.clear()
            sub.replayed_at_floor.clear()
        elif topic is not None:
            if not await topic.caught_up(time.monotonic(), TAP_CATCH_UP_S):
                log.warning(
                    "seek: the tap has not read every message published before it; the replay "
                    "may miss some",
                    extra={"subscription": sub.path, "unseen": len(topic.unseen)},
                )
            topic.trim()
            sub.replay = deque(m for p, m in topic.messages if time_ms <= p <= sub.floor_ms)
            sub.replayed_at_floor = {
                m.message_id for m in sub.replay if _publish_ms(m) == sub.floor_ms
            }
            for stream in sub.streams:
                stream.events.put_nowait(("replay",))
        log.info(
            "seek", extra={"subscription": sub.path, "to_ms": time_ms, "replay": len(sub.replay)}
        )
        answer: bytes = _SeekResponse().SerializeToString()
        return answer

    async def _acknowledge(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        return await self._ack_ids_request(method, _AcknowledgeRequest.FromString(raw), context)

    async def _modify_ack_deadline(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        request = _ModifyAckDeadlineRequest.FromString(raw)
        return await self._ack_ids_request(method, request, context)

    async def _ack_ids_request(
        self, method: str, request: Any, context: grpc.aio.ServicerContext
    ) -> bytes:
        """Acknowledge or ModifyAckDeadline: the size rule, then upstream without the
        stand-in's own replay ids (answered here when nothing else is left)."""
        await self._check(context, "ack_size", check_ack_ids(request.ack_ids))
        sub = self._subs.get(request.subscription)
        if sub is not None and method == SUBSCRIBER + "Acknowledge":
            sub.acknowledged(request.ack_ids)  # e.g. acks sent again after a stream ended
        request = _strip_replay_acks(request)
        if not request.ack_ids:
            return _EMPTY
        return await self._forward(method, request.SerializeToString(), context)

    # -- streaming pull ----------------------------------------------------------------------
    async def _streaming_pull(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._admit(context, SUBSCRIBER + "StreamingPull")
        first = _StreamingPullRequest.FromString(await anext(requests))
        await self._check(
            context, "ack_size", check_ack_ids(first.ack_ids, first.modify_deadline_ack_ids)
        )
        sub = self._subs.get(first.subscription)
        stream = Stream(first.subscription)
        self._streams.add(stream)
        if sub is not None:
            sub.streams.add(stream)
        upstream_requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        upstream_requests.put_nowait(_strip_replay_acks(first).SerializeToString())

        async def upstream_stream() -> AsyncIterator[bytes]:
            while (item := await upstream_requests.get()) is not None:
                yield item

        call = self._channel.stream_stream(SUBSCRIBER + "StreamingPull")(upstream_stream())
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._from_client(requests, sub, stream, upstream_requests)),
            loop.create_task(self._from_upstream(call, sub, stream, upstream_requests)),
        ]
        lifetime = None
        if self._stream_lifetime_s is not None:
            lifetime = loop.call_later(
                self._random.uniform(*self._stream_lifetime_s),
                stream.close,
                grpc.StatusCode.UNAVAILABLE,
                UNAVAILABLE_TEXT,
            )
        undelivered: list[str] = []
        held: tuple[Any, ...] | None = None  # taken from the queue, held back by a stall
        parked: list[tuple[Any, ...]] = []  # queued behind it when a close ended the stall
        try:
            while True:
                if sub is not None and sub.replay:
                    yield _replay_response(sub, self._replay_ids)
                    continue
                event = await stream.events.get()
                if stream.stalled and event[0] != "close":
                    held = event
                    await stream.unstalled.wait()
                    if stream.stalled:
                        # Woken by a close, not an unstall: what the stall held back never went
                        # out (a partitioned stream that dies delivers nothing); the close comes
                        # next and `finally` gives it all back to the emulator, in order.
                        while event[0] != "close":
                            event = await stream.events.get()
                            if event[0] != "close":
                                parked.append(event)
                    else:
                        held = None
                kind = event[0]
                if kind == "response" or kind == "recheck":
                    if kind == "response":
                        stream.pending -= event[2]
                    out = self._hand_out(sub, stream, event[1] if kind == "response" else None)
                    if out is not None:
                        yield out
                elif kind == "close":
                    self.refused[
                        "stream_closed"
                        if event[1] == grpc.StatusCode.UNAVAILABLE
                        else "stream_ended"
                    ] += 1
                    await context.abort(event[1], event[2])
                elif kind == "client_done":
                    return
        finally:
            if lifetime is not None:
                lifetime.cancel()
            tasks[0].cancel()
            stream.ended = True
            # Half-close, never cancel: the emulator ends the call by itself, while a cancelled
            # call (RST_STREAM) hits an emulator bug that leaves a zombie stream swallowing
            # the subscription's messages.
            upstream_requests.put_nowait(None)
            self._streams.discard(stream)
            if sub is not None:
                sub.streams.discard(stream)
            # What a stall held back goes back first, with the rest, in the order received:
            # nacking only the queue would let the emulator hand the held (older) messages out
            # after the deadline, behind later messages of the same ordering key, which the
            # real service never does.
            pending = ([held] if held is not None else []) + parked
            while not stream.events.empty():
                pending.append(stream.events.get_nowait())
            given_back = list(stream.blocked)
            for event in pending:
                if event[0] == "response":
                    response = _StreamingPullResponse.FromString(event[1])
                    given_back.extend(response.received_messages)
            undelivered.extend(m.ack_id for m in given_back)
            if sub is not None:
                # The emulator hands them out again behind what waits for their keys, or (those
                # handed out and not acknowledged: lost in transit, say) at the ack deadline,
                # after the keys' later messages: until they come again, those wait.
                self._owe(sub, given_back)
                for ack_id, (key, seq) in stream.unacked.items():
                    sub.owe(key, seq, ack_id)
            stream.unacked.clear()
            stream.handed.clear()
            stream.blocked.clear()
            if undelivered:  # let the emulator hand them out again now, not after the deadline
                self._spawn(self._nack(first.subscription, undelivered))
            self._spawn(self._retire(call, tasks[1]))

    async def _retire(self, call: Any, reader: asyncio.Task[None]) -> None:
        """Waits for the half-closed upstream call to end; cancels it only if it will not."""
        try:
            async with asyncio.timeout(5):
                await asyncio.shield(reader)
        except TimeoutError:
            call.cancel()
            reader.cancel()

    async def _from_client(
        self,
        requests: AsyncIterator[bytes],
        sub: SubState | None,
        stream: Stream,
        upstream_requests: asyncio.Queue[bytes | None],
    ) -> None:
        try:
            async for raw in requests:
                request = _StreamingPullRequest.FromString(raw)
                refusal = check_ack_ids(request.ack_ids, request.modify_deadline_ack_ids)
                if refusal is not None:
                    self.refused["ack_size"] += 1
                    stream.close(*refusal)
                    return
                if sub is not None and request.ack_ids:
                    sub.acknowledged(request.ack_ids)
                upstream_requests.put_nowait(_strip_replay_acks(request).SerializeToString())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass
        stream.events.put_nowait(("client_done",))

    async def _from_upstream(
        self,
        call: Any,
        sub: SubState | None,
        stream: Stream,
        upstream_requests: asyncio.Queue[bytes | None],
    ) -> None:
        try:
            async for raw in call:
                response = _StreamingPullResponse.FromString(raw)
                if stream.ended:
                    if sub is not None:
                        self._owe(sub, response.received_messages)
                    self._spawn(
                        self._nack(
                            stream.subscription, [m.ack_id for m in response.received_messages]
                        )
                    )
                    continue
                if sub is None:
                    stream.pending += len(response.received_messages)
                    stream.events.put_nowait(("response", raw, len(response.received_messages)))
                    continue
                kept = []
                dropped = []
                for received in response.received_messages:
                    published_ms = _publish_ms(received.message)
                    if published_ms < sub.floor_ms or (
                        published_ms == sub.floor_ms
                        and received.message.message_id in sub.replayed_at_floor
                    ):
                        dropped.append(received.ack_id)
                        place = _place(received.message)
                        if place is not None and sub.settle(*place):  # it never goes out
                            sub.wake()
                    else:
                        kept.append(received)
                if dropped:  # not its own (published before its creation or seek) or replayed
                    self.refused["pre_creation_dropped"] += len(dropped)
                    upstream_requests.put_nowait(
                        _StreamingPullRequest(ack_ids=dropped).SerializeToString()
                    )
                if kept:
                    out = _StreamingPullResponse()
                    out.received_messages.extend(kept)
                    stream.pending += len(kept)
                    stream.events.put_nowait(("response", out.SerializeToString(), len(kept)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                stream.close(exc.code(), exc.details() or "")

    @staticmethod
    def _owe(sub: SubState, given_back: Iterable[Any]) -> None:
        for received in given_back:
            place = _place(received.message)
            if place is not None:
                sub.owe(*place)

    def _hand_out(self, sub: SubState | None, stream: Stream, raw: bytes | None) -> bytes | None:
        """The response to send the client, each key's messages in order (`SubState.release`);
        None when everything must wait."""
        if sub is None:
            return raw
        response = _StreamingPullResponse.FromString(raw) if raw is not None else None
        received = response.received_messages if response is not None else ()
        was_blocked = len(stream.blocked)
        out = sub.release(stream, received)
        if len(stream.blocked) > was_blocked:
            self.refused["key_order_held"] += 1
            log.info(
                "%s: %d messages held back for their keys' order (%s)",
                sub.path.rsplit("/", 1)[-1],
                len(stream.blocked),
                ", ".join(sorted({m.message.ordering_key for m in stream.blocked})),
            )
        for item in out:
            place = _place(item.message)
            if place is not None and not item.ack_id.startswith(REPLAY_ACK_PREFIX):
                stream.handed_out(item.ack_id, place)
        if not out:
            return None
        if raw is not None and [m.ack_id for m in out] == [m.ack_id for m in received]:
            return raw  # as received
        answer = _StreamingPullResponse()
        answer.received_messages.extend(out)
        serialized: bytes = answer.SerializeToString()
        return serialized

    async def _nack(self, subscription: str, ack_ids: list[str]) -> None:
        upstream = [a for a in ack_ids if not a.startswith(REPLAY_ACK_PREFIX)]
        if not upstream:
            return
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._channel.unary_unary(SUBSCRIBER + "ModifyAckDeadline")(
                _ModifyAckDeadlineRequest(
                    subscription=subscription, ack_ids=upstream, ack_deadline_seconds=0
                ).SerializeToString(),
                timeout=10,
            )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Ends every stream and removes the taps from the emulator."""
        self.close_streams()
        for topic in self._topics.values():
            if topic.task is not None:
                topic.task.cancel()
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._channel.unary_unary(SUBSCRIBER + "DeleteSubscription")(
                    _DeleteSubscriptionRequest(subscription=topic.tap_path).SerializeToString(),
                    timeout=5,
                )
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()


_EMPTY: bytes = empty_pb2.Empty().SerializeToString()


def _strip_replay_acks(request: Any) -> Any:
    """The stand-in's own replayed messages are acknowledged here, not upstream."""
    if any(a.startswith(REPLAY_ACK_PREFIX) for a in request.ack_ids):
        kept = [a for a in request.ack_ids if not a.startswith(REPLAY_ACK_PREFIX)]
        del request.ack_ids[:]
        request.ack_ids.extend(kept)
    return request


def _replay_response(sub: SubState, ids: itertools.count[int]) -> bytes:
    response = _StreamingPullResponse()
    for _ in range(min(len(sub.replay), 1000)):
        message = sub.replay.popleft()
        received = response.received_messages.add()
        received.ack_id = f"{REPLAY_ACK_PREFIX}{next(ids)}"
        received.message.CopyFrom(message)
    serialized: bytes = response.SerializeToString()
    return serialized
