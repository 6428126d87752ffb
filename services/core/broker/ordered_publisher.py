"""Ordered, batched publishing on the event loop: one ordering key per request, one request in
flight per key.

Pub/Sub keeps the order of messages with the same ordering key only if the publisher does not send
a key's next message before the previous one is confirmed, and it refuses a Publish whose messages
carry different ordering keys (FAILED_PRECONDITION, "all messages must have no ordering key or they
must all have the same ordering key"; the emulator accepts it). google-cloud-pubsub's
PublisherClient does that with threads (a commit thread per batch, a future per message, a lock per
key); here it is done on the event loop, which costs the api a fraction of the CPU (bench:
scenario 4):

- A message waits in its key's queue. On the next flush (the loop's next turn, or after
  `batch_latency_s`) every key with messages queued and nothing in flight sends them in a request
  of its own (up to the request limits); many keys are in flight at once. Messages that arrive
  meanwhile wait and go together in the key's next request, so batches grow with the load.
- Each key's backlog (queued and in flight) is bounded in messages and bytes: a key carries at
  most 1 MB/s on the real service, so a hot key must push back (`KeyBacklogFull`, the api's 429)
  instead of queueing without end. A batch is checked whole before any of it is queued.
- A request is retried while its errors are transient, until `timeout_s` after it was first sent
  (see `send`). When it fails for good, its messages fail, and so does every message queued behind
  them on that key: nothing is published after a predecessor that may be lost. The key then takes
  new messages at once. The official client instead pauses the key until `resume_publish()`;
  that suits a library whose caller owns the order, but here the callers are HTTP clients that
  were told 503 with their ids and retry in their own order, and an api that paused a channel
  until an operator acted would turn one failed request into an outage of that channel.

The request itself is a callable (`send`), so the rules above are tested without a network.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

REQUEST_MAX_MESSAGES = 1000  # Pub/Sub's limit per Publish request
REQUEST_MAX_BYTES = 9 * 1024 * 1024  # under its 10 MB limit, with room for the envelope
MESSAGE_OVERHEAD_BYTES = 32  # a message's framing in the request, roughly


@dataclass(slots=True)
class Pending:
    """A message waiting for Pub/Sub: what to send, and who waits for its server id."""

    data: bytes
    attributes: Mapping[str, str]
    ordering_key: str
    future: asyncio.Future[str] = field(repr=False)
    size: int = 0

    def __post_init__(self) -> None:
        self.size = (
            len(self.data)
            + len(self.ordering_key)
            + sum(len(k) + len(v) for k, v in self.attributes.items())
            + MESSAGE_OVERHEAD_BYTES
        )


Send = Callable[[Sequence[Pending], float], Awaitable[Sequence[str]]]
"""Sends one request (messages of one key, deadline in loop time); returns their ids, or raises."""


class PublishFailed(Exception):
    """The request failed for good; `__cause__` says why."""


class KeyBacklogFull(Exception):
    """A key's backlog is at its bound: nothing of the batch was queued; try again later."""

    def __init__(self, key: str, messages: int, size: int) -> None:
        super().__init__(
            f"ordering key {key!r} has {messages} messages ({size} bytes) waiting for Pub/Sub"
        )
        self.key = key


@dataclass(slots=True)
class _Key:
    """One ordering key's state: what waits, and how much is waiting or in flight."""

    queue: deque[Pending] = field(default_factory=deque)
    in_flight: bool = False
    backlog_messages: int = 0  # queued + in flight
    backlog_bytes: int = 0


class OrderedPublisher:
    def __init__(
        self,
        send: Send,
        timeout_s: float,
        batch_latency_s: float = 0.0,
        key_max_messages: int = 10_000,
        key_max_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._send = send
        self._timeout_s = timeout_s
        self._batch_latency_s = batch_latency_s
        self._key_max_messages = key_max_messages
        self._key_max_bytes = key_max_bytes
        self._keys: dict[str, _Key] = {}  # keys with a backlog
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.requests_sent = 0

    def publish(self, data: bytes, attributes: Mapping[str, str], ordering_key: str) -> Pending:
        """Queues a message; await `pending.future` for its Pub/Sub id (or PublishFailed)."""
        return self.publish_all([(data, attributes, ordering_key)])[0]

    def publish_all(self, items: Sequence[tuple[bytes, Mapping[str, str], str]]) -> list[Pending]:
        """Queues every message, or none of them (KeyBacklogFull, PublishFailed when closed)."""
        if self._closed:
            raise PublishFailed("publisher closed")
        loop = asyncio.get_running_loop()
        pendings = [
            Pending(data, attributes, key, loop.create_future()) for data, attributes, key in items
        ]
        self._check_room(pendings)
        for pending in pendings:
            state = self._keys.get(pending.ordering_key)
            if state is None:
                state = self._keys[pending.ordering_key] = _Key()
            state.queue.append(pending)
            state.backlog_messages += 1
            state.backlog_bytes += pending.size
            if not state.in_flight:
                self._schedule_flush(loop)
        return pendings

    def _check_room(self, pendings: Sequence[Pending]) -> None:
        wanted: dict[str, list[int]] = {}
        for pending in pendings:
            counts = wanted.setdefault(pending.ordering_key, [0, 0])
            counts[0] += 1
            counts[1] += pending.size
        for key, (messages, size) in wanted.items():
            state = self._keys.get(key)
            have_messages = state.backlog_messages if state else 0
            have_bytes = state.backlog_bytes if state else 0
            if (
                have_messages + messages > self._key_max_messages
                or have_bytes + size > self._key_max_bytes
            ):
                raise KeyBacklogFull(key, have_messages, have_bytes)

    def backlog(self, key: str) -> tuple[int, int]:
        """(messages, bytes) queued or in flight for `key`."""
        state = self._keys.get(key)
        return (state.backlog_messages, state.backlog_bytes) if state else (0, 0)

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flush_handle is None:
            if self._batch_latency_s > 0:
                self._flush_handle = loop.call_later(self._batch_latency_s, self._flush)
            else:
                self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Every key with messages queued and nothing in flight sends one request of its own."""
        self._flush_handle = None
        for key, state in self._keys.items():
            if state.in_flight or not state.queue:
                continue
            batch: list[Pending] = []
            size = 0
            queue = state.queue
            while queue and len(batch) < REQUEST_MAX_MESSAGES:
                item = queue[0]
                if batch and size + item.size > REQUEST_MAX_BYTES:
                    break
                batch.append(queue.popleft())
                size += item.size
            state.in_flight = True
            self._start(key, batch)

    def _start(self, key: str, batch: list[Pending]) -> None:
        self.requests_sent += 1
        task = asyncio.get_running_loop().create_task(self._request(key, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, key: str, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        state = self._keys[key]
        try:
            ids = await self._send(batch, loop.time() + self._timeout_s)
            if len(ids) != len(batch):
                raise RuntimeError(f"{len(ids)} ids for {len(batch)} messages")
        except Exception as exc:  # a cancelled task (shutdown) fails its messages too
            error = PublishFailed(str(exc) or type(exc).__name__)
            error.__cause__ = exc
            behind = list(state.queue)
            state.queue.clear()
            for item in (*batch, *behind):  # what waits behind a lost message must not overtake it
                _settle(item.future, error=error)
            state.backlog_messages -= len(behind)
            state.backlog_bytes -= sum(item.size for item in behind)
        else:
            for item, message_id in zip(batch, ids, strict=True):
                _settle(item.future, result=message_id)
        finally:
            state.in_flight = False
            state.backlog_messages -= len(batch)
            state.backlog_bytes -= sum(item.size for item in batch)
            if state.queue:
                if not self._closed:
                    self._schedule_flush(loop)
            elif self._keys.get(key) is state:
                del self._keys[key]

    async def close(self) -> None:
        """Sends what is queued, waits for every request in flight, then refuses new messages."""
        while True:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
                self._flush()
            if not self._tasks:
                break
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed = True


def _settle(
    future: asyncio.Future[str], result: str | None = None, error: BaseException | None = None
) -> None:
    if future.done():  # the caller gave up (timeout, cancelled): nobody reads it
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)
