"""OrderedPublisher's rules, with a fake Publish request whose answers the test controls."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.core.broker.ordered_publisher import (
    REQUEST_MAX_BYTES,
    REQUEST_MAX_MESSAGES,
    KeyBacklogFull,
    OrderedPublisher,
    Pending,
    PublishFailed,
)
from tests.support import eventually


class FakePubSub:
    """Holds every request until the test answers it; records what each carried."""

    def __init__(self) -> None:
        self.requests: list[list[tuple[str, bytes]]] = []
        self._answers: list[asyncio.Future[None]] = []
        self.arrived = asyncio.Event()

    async def send(self, batch: Sequence[Pending], deadline: float) -> Sequence[str]:
        assert deadline > asyncio.get_running_loop().time()
        assert len({item.ordering_key for item in batch}) == 1, "one ordering key per request"
        self.requests.append([(item.ordering_key, item.data) for item in batch])
        answer = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        self.arrived.set()
        await answer
        return [f"id-{item.data.decode()}" for item in batch]

    async def wait_requests(self, count: int) -> None:
        await eventually(
            lambda: len(self.requests) >= count, 5, f"{count} requests", wake=self.arrived
        )

    def answer(self, index: int, error: Exception | None = None) -> None:
        if error is None:
            self._answers[index].set_result(None)
        else:
            self._answers[index].set_exception(error)


def publish(publisher: OrderedPublisher, key: str, data: str) -> asyncio.Future[str]:
    return publisher.publish(data.encode(), {"channel": key}, key).future


async def test_one_request_in_flight_per_key_and_the_rest_batched_behind_it() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5)
    first = publish(publisher, "a", "1")
    await fake.wait_requests(1)
    later = [publish(publisher, "a", str(n)) for n in (2, 3, 4)]
    other = publish(publisher, "b", "b1")  # another key does not wait for "a"
    await fake.wait_requests(2)
    assert fake.requests == [[("a", b"1")], [("b", b"b1")]]
    fake.answer(1)
    assert await other == "id-b1"
    assert len(fake.requests) == 2  # "a" still in flight: its next messages wait
    fake.answer(0)
    assert await first == "id-1"
    await fake.wait_requests(3)
    assert fake.requests[2] == [("a", b"2"), ("a", b"3"), ("a", b"4")]
    fake.answer(2)
    assert await asyncio.gather(*later) == ["id-2", "id-3", "id-4"]
    await publisher.close()


async def test_every_request_carries_one_ordering_key() -> None:
    """Pub/Sub refuses a Publish with mixed ordering keys (FAILED_PRECONDITION): keys ready at
    once go in requests of their own, all in flight together."""
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5)
    futures = [publish(publisher, key, f"{key}{n}") for n in range(2) for key in "abc"]
    await fake.wait_requests(3)
    assert sorted(fake.requests) == [
        [(key, f"{key}0".encode()), (key, f"{key}1".encode())] for key in "abc"
    ]
    for index in range(3):
        fake.answer(index)
    assert len(await asyncio.gather(*futures)) == 6
    assert publisher.requests_sent == 3
    await publisher.close()


async def test_a_full_key_refuses_the_whole_batch_and_queues_nothing() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5, key_max_messages=3)
    first = [publish(publisher, "hot", str(n)) for n in range(3)]
    await fake.wait_requests(1)
    with pytest.raises(KeyBacklogFull, match="hot"):
        publisher.publish_all([(b"x", {}, "calm"), (b"4", {}, "hot")])
    assert publisher.backlog("calm") == (0, 0)  # all or nothing
    assert publisher.backlog("hot")[0] == 3
    fake.answer(0)
    await asyncio.gather(*first)
    assert publisher.backlog("hot") == (0, 0)
    later = publish(publisher, "hot", "5")  # room again once Pub/Sub confirmed
    await fake.wait_requests(2)
    fake.answer(1)
    assert await later == "id-5"
    await publisher.close()


async def test_a_key_is_bounded_in_bytes_too() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5, key_max_bytes=1000)
    kept = publisher.publish(b"x" * 500, {}, "k").future
    with pytest.raises(KeyBacklogFull):
        publisher.publish(b"y" * 500, {}, "k")
    await fake.wait_requests(1)
    fake.answer(0)
    assert await kept == "id-" + "x" * 500
    await publisher.close()


async def test_requests_stay_within_the_byte_limit() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5, key_max_bytes=64 * 1024 * 1024)
    big = b"z" * (REQUEST_MAX_BYTES // 2)
    futures = [publisher.publish(big, {}, "k").future for _ in range(3)]
    await fake.wait_requests(1)
    assert len(fake.requests[0]) == 1  # two would pass the limit with their overhead
    fake.answer(0)
    await fake.wait_requests(2)
    fake.answer(1)
    await fake.wait_requests(3)
    fake.answer(2)
    await asyncio.gather(*futures)
    await publisher.close()


async def test_a_failed_request_fails_what_queued_behind_it_on_its_keys_only() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5)
    lost = publish(publisher, "a", "1")
    await fake.wait_requests(1)
    behind = publish(publisher, "a", "2")
    elsewhere = publish(publisher, "b", "b1")
    await fake.wait_requests(2)
    fake.answer(0, RuntimeError("unavailable"))
    with pytest.raises(PublishFailed, match="unavailable"):
        await lost
    with pytest.raises(PublishFailed):
        await behind  # never sent: it would have overtaken a message that may be lost
    fake.answer(1)
    assert await elsewhere == "id-b1"
    after = publish(publisher, "a", "3")  # the key works again
    await fake.wait_requests(3)
    assert fake.requests[2] == [("a", b"3")]
    fake.answer(2)
    assert await after == "id-3"
    await publisher.close()


async def test_requests_stay_within_the_message_limit_and_in_order() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5)
    futures = [publish(publisher, "a", str(n)) for n in range(REQUEST_MAX_MESSAGES + 5)]
    await fake.wait_requests(1)
    assert len(fake.requests[0]) == REQUEST_MAX_MESSAGES
    fake.answer(0)
    await fake.wait_requests(2)
    assert [data for _, data in fake.requests[1]] == [
        str(n).encode() for n in range(REQUEST_MAX_MESSAGES, REQUEST_MAX_MESSAGES + 5)
    ]
    fake.answer(1)
    assert (await asyncio.gather(*futures))[-1] == f"id-{REQUEST_MAX_MESSAGES + 4}"
    await publisher.close()


async def test_close_sends_what_is_queued_then_refuses() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5, batch_latency_s=60)
    queued = publish(publisher, "a", "1")  # would wait a minute for company
    closing = asyncio.create_task(publisher.close())
    await fake.wait_requests(1)
    fake.answer(0)
    await closing
    assert await queued == "id-1"
    with pytest.raises(PublishFailed, match="closed"):
        publish(publisher, "a", "2")


async def test_a_caller_that_gave_up_does_not_break_the_others() -> None:
    fake = FakePubSub()
    publisher = OrderedPublisher(fake.send, timeout_s=5)
    abandoned = publish(publisher, "a", "1")
    kept = publish(publisher, "a", "2")
    await fake.wait_requests(1)
    abandoned.cancel()
    fake.answer(0)
    assert await kept == "id-2"
    await publisher.close()
