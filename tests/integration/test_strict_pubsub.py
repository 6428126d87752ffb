"""The strict stand-in refuses what the real Pub/Sub refuses, and the emulator does not.

Each rule is shown twice where it can be: refused by the stand-in, and (in the pinned test at
the end) accepted by the emulator itself, so a new emulator version that changes is noticed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.pubsub_v1.types import pubsub as pubsub_types

from devtools.cluster import PROJECT, TOPIC, LocalCluster, StrictPubSub
from tests.support import eventually, unique_name

PUB = "/google.pubsub.v1.Publisher/"
SUB = "/google.pubsub.v1.Subscriber/"
TOPIC_PATH = f"projects/{PROJECT}/topics/{TOPIC}"
PublishRequest: Any = pubsub_types.PublishRequest.pb()
PublishResponse: Any = pubsub_types.PublishResponse.pb()
PubsubMessage: Any = pubsub_types.PubsubMessage.pb()
Subscription: Any = pubsub_types.Subscription.pb()
SeekRequest: Any = pubsub_types.SeekRequest.pb()
SeekResponse: Any = pubsub_types.SeekResponse.pb()
AcknowledgeRequest: Any = pubsub_types.AcknowledgeRequest.pb()
ModifyAckDeadlineRequest: Any = pubsub_types.ModifyAckDeadlineRequest.pb()
StreamingPullRequest: Any = pubsub_types.StreamingPullRequest.pb()
StreamingPullResponse: Any = pubsub_types.StreamingPullResponse.pb()
DeleteSubscriptionRequest: Any = pubsub_types.DeleteSubscriptionRequest.pb()
_created: list[str] = []


@pytest.fixture(scope="module")
def strict(cluster: LocalCluster) -> StrictPubSub:
    assert cluster.strict is not None, "the integration suite runs on the strict stand-in"
    return cluster.strict


def token(strict: StrictPubSub, account: str = "default") -> str:
    prefix = "" if account == "default" else f"/as/{account}"
    response = httpx.get(
        f"{strict.admin_url}{prefix}/computeMetadata/v1/instance/service-accounts/default/token",
        headers={"Metadata-Flavor": "Google"},
    )
    return str(response.json()["access_token"])


@pytest.fixture
async def channel_to(strict: StrictPubSub) -> AsyncIterator[Any]:
    """Opens TLS channels to the stand-in, with an account's token or none."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(account: str | None = "default") -> grpc.aio.Channel:
        ssl = grpc.ssl_channel_credentials((strict.dir / "tls" / "ca.pem").read_bytes())
        credentials = ssl
        if account is not None:
            credentials = grpc.composite_channel_credentials(
                ssl, grpc.access_token_call_credentials(token(strict, account))
            )
        channel = grpc.aio.secure_channel(f"127.0.0.1:{strict.port}", credentials)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        await channel.close()


def unary(channel: grpc.aio.Channel, method: str, response: Any) -> Any:
    return channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


async def publish(channel: grpc.aio.Channel, *messages: Any) -> list[str]:
    answer = await unary(channel, PUB + "Publish", PublishResponse)(
        PublishRequest(topic=TOPIC_PATH, messages=list(messages)), timeout=10
    )
    return list(answer.message_ids)


def message(data: bytes = b"x", key: str = "k", **attributes: str) -> Any:
    return PubsubMessage(data=data, ordering_key=key, attributes=attributes)


async def create_subscription(channel: grpc.aio.Channel) -> str:
    name = f"projects/{PROJECT}/subscriptions/{unique_name('strict-test')}"
    await unary(channel, SUB + "CreateSubscription", Subscription)(
        Subscription(name=name, topic=TOPIC_PATH, enable_message_ordering=True), timeout=10
    )
    _created.append(name)
    return name


@pytest.fixture(autouse=True)
async def delete_test_subscriptions(cluster: LocalCluster) -> AsyncIterator[None]:
    """Subscriptions left behind would slow the emulator down for every later test."""
    yield
    async with grpc.aio.insecure_channel(cluster.emulator.host) as channel:
        while _created:
            name = _created.pop()
            try:
                await unary(channel, SUB + "DeleteSubscription", SeekResponse)(
                    DeleteSubscriptionRequest(subscription=name), timeout=10
                )
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND


class Puller:
    """A StreamingPull call: messages as they come; acks on the stream."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        subscription: str,
        ack_deadline_s: int = 60,
        client_id: str = "",
    ) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue()
        self.requests.put_nowait(
            StreamingPullRequest(
                subscription=subscription,
                stream_ack_deadline_seconds=ack_deadline_s,
                client_id=client_id,  # a pod keeps one across its streams
            )
        )
        self.call = channel.stream_stream(
            SUB + "StreamingPull",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=StreamingPullResponse.FromString,
        )(self._requests())

    async def _requests(self) -> AsyncIterator[Any]:
        while (request := await self.requests.get()) is not None:
            yield request

    async def take(
        self, count: int, key: str, timeout_s: float = 20, *, ack: bool = True
    ) -> list[bytes]:
        """The next `count` messages of ordering key `key` (the topic is shared); acknowledged
        on the stream unless `ack` is false."""
        got: list[bytes] = []
        async with asyncio.timeout(timeout_s):
            while len(got) < count:
                got.extend(m.data for m in await self._read(ack) if m.ordering_key == key)
        return got

    async def _read(self, ack: bool) -> list[Any]:
        """The messages of the stream's next response (of every key), acknowledged on the
        stream if `ack`."""
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        if ack:
            self.requests.put_nowait(
                StreamingPullRequest(ack_ids=[m.ack_id for m in response.received_messages])
            )
        return [m.message for m in response.received_messages]

    async def take_distinct(self, count: int, key: str, timeout_s: float = 20) -> list[bytes]:
        """Messages of `key` until `count` distinct ones came, each in the place of its first
        copy (a redelivery of one already received is dropped, as a pod drops it)."""
        got: list[bytes] = []
        async with asyncio.timeout(timeout_s):
            while len(got) < count:
                for data in await self.take(1, key, timeout_s):
                    if data not in got:
                        got.append(data)
        return got

    async def take_until(
        self, last: dict[str, bytes], timeout_s: float = 20
    ) -> dict[str, list[bytes]]:
        """Messages of each key in `last` until that key's last one came; acknowledged."""
        got: dict[str, list[bytes]] = {key: [] for key in last}
        async with asyncio.timeout(timeout_s):
            while any(not got[key] or got[key][-1] != data for key, data in last.items()):
                for message in await self._read(ack=True):
                    if message.ordering_key in got:
                        got[message.ordering_key].append(message.data)
        return got

    def close(self) -> None:
        self.requests.put_nowait(None)
        self.call.cancel()


async def held_back(strict: StrictPubSub, count: int) -> None:
    """Until the stand-in holds `count` messages back from a stalled stream."""
    await eventually(
        lambda: strict.state()["held"],
        10,
        f"{count} messages held by the stall",
        interval_s=0.05,
        until=lambda held: held >= count,
    )


@contextlib.asynccontextmanager
async def two_held_by_a_stall(
    strict: StrictPubSub, channel: grpc.aio.Channel, key: str
) -> AsyncIterator[tuple[str, Puller]]:
    """A subscription whose stream got `one`, then was stalled while `two` and `three` came:
    both held by the stand-in. Yields the subscription and that first stream's puller."""
    subscription = await create_subscription(channel)
    first = Puller(channel, subscription)
    await publish(channel, message(b"one", key=key))
    assert await first.take(1, key) == [b"one"]
    strict.control("stall", subscription=subscription.rsplit("/", 1)[-1])
    try:
        await publish(channel, message(b"two", key=key))
        await publish(channel, message(b"three", key=key))
        await held_back(strict, 2)  # both reached the stand-in, held by the stall
        yield subscription, first
    finally:
        strict.control("unstall")


REFUSED_PUBLISHES = {
    "mixed ordering keys": (
        [message(key="a"), message(key="b")],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "1,001 messages": (
        [message(str(n).encode()) for n in range(1001)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "over 10 MB": (
        [message(b"x" * 1_000_000) for _ in range(11)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an ordering key over 1,024 bytes": (
        [message(key="k" * 1025)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "101 attributes": (
        [message(**{f"a{n}": "v" for n in range(101)})],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an attribute key over 256 bytes": (
        [message(**{"k" * 257: "v"})],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "an attribute value over 1,024 bytes": (
        [message(a="v" * 1025)],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED_PUBLISHES))
async def test_a_publish_the_service_refuses_is_refused(channel_to, case: str) -> None:
    messages, code = REFUSED_PUBLISHES[case]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await publish(channel_to(), *messages)
    assert refused.value.code() == code


async def test_the_largest_publish_the_service_takes_is_taken(channel_to) -> None:
    channel = channel_to()
    ids = await publish(channel, *(message(b"m", key="one-key") for _ in range(1000)))
    assert len(ids) == 1000
    assert len(await publish(channel, message(b"x" * 1_000_000, key="k" * 1024))) == 1


async def test_acks_over_512_kb_are_refused_unary_and_on_the_stream(channel_to) -> None:
    channel = channel_to()
    subscription = await create_subscription(channel)
    big = [f"{n:05d}" + "a" * 300 for n in range(2000)]  # about 610 KB of ack ids
    for method, request, answer in (
        ("Acknowledge", AcknowledgeRequest(subscription=subscription, ack_ids=big), SeekResponse),
        (
            "ModifyAckDeadline",
            ModifyAckDeadlineRequest(
                subscription=subscription, ack_ids=big, ack_deadline_seconds=0
            ),
            SeekResponse,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel, SUB + method, answer)(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    puller = Puller(channel, subscription)
    puller.requests.put_nowait(StreamingPullRequest(ack_ids=big))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async with asyncio.timeout(10):
            while await puller.call.read() is not grpc.aio.EOF:
                pass
    assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    puller.close()


@pytest.mark.parametrize(
    ("account", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("nobody", grpc.StatusCode.UNAUTHENTICATED),
        ("denied", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
async def test_calls_need_a_token_of_an_account_with_the_permission(channel_to, account, code):
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await publish(channel_to(account), message())
    assert refused.value.code() == code


async def test_a_new_subscription_sees_only_messages_published_after_it(channel_to) -> None:
    channel = channel_to()
    key = unique_name("new-sub")
    await publish(channel, message(b"before", key=key))
    subscription = await create_subscription(channel)
    await publish(channel, message(b"after", key=key))
    puller = Puller(channel, subscription)
    assert await puller.take(1, key) == [b"after"]  # per-key order: "before" would have come first
    puller.close()


async def test_a_message_published_once_the_subscription_exists_is_delivered(channel_to):
    """Published right after CreateSubscription returned, a message is the subscription's, even
    within the same millisecond (no seek follows to replay it)."""
    channel = channel_to()
    for round_ in range(10):
        key = unique_name(f"right-after-{round_}")
        subscription = await create_subscription(channel)
        await publish(channel, message(b"right after", key=key))
        puller = Puller(channel, subscription)
        assert await puller.take(1, key) == [b"right after"]
        puller.close()


async def seek(channel: grpc.aio.Channel, subscription: str, since: float) -> None:
    seconds = int(since)
    await unary(channel, SUB + "Seek", SeekResponse)(
        SeekRequest(
            subscription=subscription,
            time={"seconds": seconds, "nanos": int((since - seconds) * 1e9)},
        ),
        timeout=10,
    )


async def test_seek_to_a_time_replays_the_retained_messages_first(channel_to) -> None:
    channel = channel_to()
    key = unique_name("seek")
    since = time.time()
    await publish(channel, message(b"one", key=key))
    await publish(channel, message(b"two", key=key))
    subscription = await create_subscription(channel)
    await seek(channel, subscription, since)
    await publish(channel, message(b"three", key=key))
    puller = Puller(channel, subscription)
    got = await puller.take(3, key)
    assert got == [b"one", b"two", b"three"]
    puller.close()


async def test_a_subscription_created_amid_publishing_and_seeked_back_misses_nothing(
    channel_to,
) -> None:
    """Seeked back to before its creation, a subscription gets every message published since,
    in order: those published while it was being created too. The real service replays from
    the seek time on; the stand-in's replay must end where the emulator's own delivery begins
    (a message published during the CreateSubscription call was lost between the two)."""
    channel = channel_to()
    for round_ in range(6):
        keys = [unique_name(f"amid-{round_}-{n}") for n in range(3)]
        since = time.time()
        published, subscription = await _created_amid_publishing(channel, keys)
        await seek(channel, subscription, since)
        puller = Puller(channel, subscription)
        assert await puller.take_until({key: b"end" for key in keys}) == published
        puller.close()


async def _created_amid_publishing(
    channel: grpc.aio.Channel, keys: list[str]
) -> tuple[dict[str, list[bytes]], str]:
    """Creates a subscription while `keys` are published to, one message after another; what
    was published (each key's last message is b"end") and the subscription."""
    published: dict[str, list[bytes]] = {key: [] for key in keys}
    stop = asyncio.Event()

    def count() -> int:
        return sum(len(sent) for sent in published.values())

    async def publish_until_stopped(key: str) -> None:
        while not stop.is_set():
            data = str(len(published[key])).encode()
            await publish(channel, message(data, key=key))
            published[key].append(data)
        await publish(channel, message(b"end", key=key))
        published[key].append(b"end")

    publishers = [asyncio.create_task(publish_until_stopped(key)) for key in keys]
    await eventually(count, 10, "a few messages published", interval_s=0.01, until=lambda n: n >= 6)
    subscription = await create_subscription(channel)
    before = count()
    await eventually(
        count, 10, "more messages published", interval_s=0.01, until=lambda n: n >= before + 6
    )
    stop.set()
    await asyncio.gather(*publishers)
    return published, subscription


async def test_every_message_published_is_tapped_and_no_seek_waits_for_it(strict, channel_to):
    """The stand-in's tap can read a message before the Publish that sent it has returned. Such
    a message must still count as tapped: one left "unseen" made every later seek wait out
    the catch-up bound (5 s), and the fault tests' pods recover that much slower."""
    channel = channel_to()
    key = unique_name("tapped")
    for _ in range(10):
        await asyncio.gather(
            *(publish(channel, message(str(n).encode(), key=f"{key}-{n}")) for n in range(30))
        )
    await eventually(
        lambda: strict.state()["topics"][TOPIC_PATH]["unseen"],
        5,
        "every message published to be tapped",
        interval_s=0.1,
        until=lambda unseen: unseen == 0,
    )


async def test_seeks_fail_on_command(strict: StrictPubSub, channel_to) -> None:
    channel = channel_to()
    subscription = await create_subscription(channel)
    strict.control("seek-fails", on=1)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel, SUB + "Seek", SeekResponse)(
                SeekRequest(subscription=subscription, time={"seconds": int(time.time()) - 60}),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        strict.control("seek-fails", on=0)


async def test_the_server_closes_streams_with_unavailable(strict: StrictPubSub, channel_to):
    channel = channel_to()
    puller = Puller(channel, await create_subscription(channel))
    key = unique_name("close")
    await publish(channel, message(b"first", key=key))
    assert await puller.take(1, key) == [b"first"]  # the stream is up
    strict.control("close-streams")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async with asyncio.timeout(10):
            while await puller.call.read() is not grpc.aio.EOF:
                pass  # what was already on its way
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    puller.close()


async def test_what_a_stall_held_back_comes_again_first_in_order(strict, channel_to) -> None:
    """A stalled stream that its client gives up on (a deaf pod opens a new one) gives back
    everything it held, in order: the key's older messages are never handed out behind its
    later ones (found by make soak: the message the stall was holding came back only after
    the ack deadline, behind later messages of its channel)."""
    channel = channel_to()
    key = unique_name("stall")
    async with two_held_by_a_stall(strict, channel, key) as (subscription, first):
        first.close()
        second = Puller(channel, subscription)
        await publish(channel, message(b"four", key=key))
        # well within the 60 s ack deadline: nothing waits for it
        assert await second.take(3, key, timeout_s=15) == [b"two", b"three", b"four"]
        second.close()


async def test_a_stalled_stream_that_is_closed_gives_back_what_it_held(strict, channel_to):
    """A server close of a stalled stream (close-streams, an outage) delivers nothing the stall
    held: it all comes again at once on the next stream, in order (found by make soak: the held
    messages were lost in transit and came back only after the ack deadline, behind later ones
    of their channel)."""
    channel = channel_to()
    key = unique_name("stall-close")
    async with two_held_by_a_stall(strict, channel, key) as (subscription, first):
        strict.control("close-streams")
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(10):
                while (response := await first.call.read()) is not grpc.aio.EOF:
                    assert not [
                        m for m in response.received_messages if m.message.ordering_key == key
                    ], "a closed stall delivered what it held"
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        first.close()
        second = Puller(channel, subscription)
        await publish(channel, message(b"four", key=key))
        assert await second.take(3, key, timeout_s=15) == [b"two", b"three", b"four"]
        second.close()


async def test_what_a_stall_held_comes_again_before_the_keys_later_messages(strict, channel_to):
    """A deaf pod gives up on its stalled stream while its next one is already open and the
    channel goes on publishing: the held messages go back to the emulator, which queues them
    behind the key's messages that arrived meanwhile; the key's order holds anyway, as on the
    real service (found by make soak, issue 14: a message published while a deaf pod reopened
    reached its clients before everything the stall had held; 19 reorders)."""
    channel = channel_to()
    # The emulator hands the later message to the stalled stream or keeps it back; only the
    # second reorders, so a few rounds.
    for round_ in range(4):
        subscription = await create_subscription(channel)
        key = f"stall-behind-{round_}-{time.time_ns()}"
        first = Puller(channel, subscription, ack_deadline_s=10, client_id="pod")
        await publish(channel, message(b"0", key=key))
        assert await first.take(1, key) == [b"0"]
        strict.control("stall", subscription=subscription.rsplit("/", 1)[-1])
        try:
            for data in (b"1", b"2", b"3"):
                await publish(channel, message(data, key=key))
            await held_back(strict, 3)
            second = Puller(channel, subscription, ack_deadline_s=10, client_id="pod")
            await publish(channel, message(b"4", key=key))
            first.close()
            assert await second.take_distinct(4, key) == [b"1", b"2", b"3", b"4"], round_
            second.close()
        finally:
            strict.control("unstall")


async def test_a_message_handed_out_and_never_acknowledged_holds_back_its_key(channel_to):
    """A stream ends with a message handed out and not acknowledged (lost in transit, say):
    later messages of its key wait until it comes again at its ack deadline, as on the real
    service, instead of overtaking it on the next stream."""
    channel = channel_to()
    subscription = await create_subscription(channel)
    key = f"unacked-{time.time_ns()}"
    first = Puller(channel, subscription, ack_deadline_s=10)
    await publish(channel, message(b"1", key=key))
    assert await first.take(1, key, ack=False) == [b"1"]  # received, never acknowledged
    first.close()
    second = Puller(channel, subscription, ack_deadline_s=10)
    await publish(channel, message(b"2", key=key))
    assert await second.take_distinct(2, key, timeout_s=30) == [b"1", b"2"]
    second.close()


async def test_the_emulator_itself_is_lenient(cluster: LocalCluster) -> None:
    """Pins what the emulator does, so a version that changes is noticed: it takes mixed
    ordering keys, answers Seek to a time with UNIMPLEMENTED (501), and replays a retained
    topic's messages to a new subscription. Its message ids are numbers in publish order (the
    stand-in keeps each key's order by them)."""
    async with grpc.aio.insecure_channel(cluster.emulator.host) as channel:
        key = unique_name("lenient")
        (old,) = await publish(channel, message(b"old", key=key))
        mixed = await publish(channel, message(key="a"), message(key="b"))
        assert len(mixed) == 2
        assert all(i.isdigit() for i in (old, *mixed))
        assert int(old) < int(mixed[0]) < int(mixed[1])
        name = await create_subscription(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await unary(channel, SUB + "Seek", SeekResponse)(
                SeekRequest(subscription=name, time={"seconds": int(time.time()) - 60}),
                timeout=10,
            )
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        puller = Puller(channel, name)
        got: list[bytes] = []
        async with asyncio.timeout(20):
            while b"old" not in got:
                got += await puller.take(1, key)
        puller.close()
