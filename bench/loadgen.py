"""`python -m bench.loadgen --port P --connections N`: websocket clients, made cheap.

Each connection is a bare asyncio protocol on uvloop for the handshake and the subscribe; then it
is detached from the loop and read in batches: every TICK_S the process polls its own epoll set
and reads every ready socket once. One wake-up serves hundreds of connections instead of one
wake-up per frame, which makes a client several times cheaper and spares the server the cost
of waking a sleeping reader on every write (the same for every server under test; it adds at
most TICK_S to a measured latency). Server frames are parsed by hand (unmasked, unfragmented),
only `message` frames' JSON is read, and client frames are masked with a zero key. The bench
reports the clients' CPU beside every figure anyway.

Every connection checks every message it gets:
- `strict` order (the engine scenarios: one generator, no broker): each seq must be the previous
  plus one; anything else counts as a gap (loss) or a step back (duplicate or reorder).
- `shared` order (the full path: concurrent publishes whose order Pub/Sub assigns): a rolling
  hash of the sequence a connection saw plus its count; the bench checks that every connection
  of every pod saw the same sequence, and that it respects the publishers' acknowledgements.

Commands: `connect {count, concurrency}`, `reset`, `count`, `snapshot`, `orders`,
`disconnect`, `reconnect {expect}`, `rewind {channel, count}` (every open connection subscribes
to another channel with `"rewind": {"count": count}` and waits for its messages), `close`,
`exit`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import os
import select
import time
from array import array
from typing import Any

import orjson
import uvloop

from bench import control
from bench.stats import quantiles

_KEY = base64.b64encode(b"pubsock-bench-16").decode()
_ACCEPT = base64.b64encode(
    hashlib.sha1((_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
)
TICK_S = 0.002
READ_BYTES = 16 * 1024  # under the allocator's mmap threshold: a read stays cheap
HASH_MASK = (1 << 61) - 1
HASH_MULTIPLIER = 1_000_003
PARSED_MAX = 4096


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame with a zero masking key (XOR with zeros: the payload as is)."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    else:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    return head + b"\x00\x00\x00\x00" + payload


class Fleet:
    """All connections of this process and what they saw."""

    def __init__(self, host: str, port: int, channels: list[str], order: str) -> None:
        self.host = host
        self.port = port
        self.channels = channels
        self.shared_order = order == "shared"
        self.clients: list[Client] = []
        self.latencies = array("d")
        self.frames = 0  # message frames, total
        self.gaps = 0  # messages missing between two received ones (strict order)
        self.backwards = 0  # a seq not above the previous one: duplicate or reorder
        self.errors = 0
        self.closes: dict[int, int] = {}
        self.recovered_true = 0
        self.recovered_false = 0
        self.rewound = 0  # messages announced by `rewound` answers
        self.rewound_incomplete = 0  # answers with `rewound.complete` false
        self.reference_order: dict[str, list[int]] = {}  # per channel, what connection 0 saw
        self.pending_recovery = 0
        self.recovery_done: asyncio.Event | None = None
        self.recovery_finished_at = 0.0
        self.poller = select.epoll()
        self.detached: dict[int, Client] = {}
        # Every connection of a channel gets the same bytes for a message: parse them once.
        self.parsed: dict[bytes, tuple[int, float, str, str]] = {}

    def detach(self, client: Client) -> None:
        """From now on this connection is read by `read_ready`, not by the event loop."""
        transport = client.transport
        assert transport is not None
        fd = transport.get_extra_info("socket").fileno()
        transport.pause_reading()
        self.poller.register(fd, select.EPOLLIN)
        self.detached[fd] = client
        client.fd = fd

    def forget(self, client: Client) -> None:
        fd, client.fd = client.fd, -1
        if fd >= 0 and self.detached.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.poller.unregister(fd)

    def read_ready(self) -> None:
        """Reads every detached connection that has data, once."""
        events = self.poller.poll(0)
        if not events:
            return
        now = time.time()
        detached = self.detached
        for fd, _ in events:
            client = detached.get(fd)
            if client is None:
                continue
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                client.frames_received(data, now)
            else:
                client.lost()

    async def read_forever(self, tick_s: float) -> None:
        while True:
            await asyncio.sleep(tick_s)
            self.read_ready()

    def subscribe_frames(self, since: str | None) -> bytes:
        frames = []
        for channel in self.channels:
            body: dict[str, Any] = {"type": "subscribe", "channel": channel}
            if since is not None:
                body["since"] = since
            frames.append(client_frame(0x1, orjson.dumps(body)))
        return b"".join(frames)

    def recovery_complete(self) -> None:
        self.pending_recovery -= 1
        if self.pending_recovery == 0 and self.recovery_done is not None:
            self.recovery_finished_at = time.time()
            self.recovery_done.set()


class Client(asyncio.Protocol):
    __slots__ = (
        "buffer",
        "count",
        "expect",
        "fd",
        "fleet",
        "hash",
        "index",
        "last_id",
        "last_seq",
        "open",
        "pending_subscribes",
        "recovering",
        "since",
        "subscribed",
        "transport",
        "upgraded",
    )

    def __init__(
        self,
        fleet: Fleet,
        index: int,
        since: str | None = None,
        last_seq: int = -1,
        expect: int = 0,
    ) -> None:
        self.fleet = fleet
        self.index = index
        self.since = since
        self.expect = expect  # messages to get before a recovery counts as complete
        self.recovering = since is not None
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.open = False
        self.subscribed = asyncio.get_running_loop().create_future()
        self.pending_subscribes = len(fleet.channels)
        self.last_seq = last_seq  # a resumed connection checks continuity with its last life
        self.last_id: str | None = since
        self.count = 0
        self.hash: dict[str, int] = {}  # shared order: per channel, a hash of the sequence seen
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True
        fleet = self.fleet
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET /ws HTTP/1.1\r\nHost: {fleet.host}:{fleet.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost()

    def lost(self) -> None:
        self.fleet.forget(self)
        if self.open and self.transport is not None:
            self.transport.close()
        self.open = False
        if not self.subscribed.done():
            self.subscribed.set_exception(ConnectionError("closed before subscribed"))

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self.buffer += data
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            if not head.startswith(b"HTTP/1.1 101") or _ACCEPT not in head:
                self.subscribed.set_exception(ConnectionError(head[:80].decode(errors="replace")))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.upgraded = True
            data = self.buffer[end + 4 :]
            self.buffer = b""
            self.transport.write(self.fleet.subscribe_frames(self.since))  # type: ignore[union-attr]
            if not data:
                return
        self.frames_received(data, time.time())
        if self.subscribed.done() and self.fd < 0 and self.open:
            self.fleet.detach(self)

    def frames_received(self, data: bytes, now: float) -> None:
        buffer = self.buffer + data if self.buffer else data
        size = len(buffer)
        position = 0
        while size - position >= 2:
            length = buffer[position + 1] & 0x7F
            header = 2
            if length == 126:
                if size - position < 4:
                    break
                length = (buffer[position + 2] << 8) | buffer[position + 3]
                header = 4
            elif length == 127:
                if size - position < 10:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
                header = 10
            end = position + header + length
            if end > size:
                break
            opcode = buffer[position] & 0x0F
            payload = buffer[position + header : end]
            position = end
            if opcode == 0x1:
                self.on_text(payload, now)
            elif opcode == 0x9:
                self.transport.write(client_frame(0xA, payload))  # type: ignore[union-attr]
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.fleet.closes[code] = self.fleet.closes.get(code, 0) + 1
                if self.open:
                    self.fleet.forget(self)
                    self.transport.write(client_frame(0x8, payload[:2]))  # type: ignore[union-attr]
                    self.transport.close()  # type: ignore[union-attr]
                self.open = False
        self.buffer = buffer[position:] if position < size else b""

    def on_text(self, payload: bytes, now: float) -> None:
        fleet = self.fleet
        message = fleet.parsed.get(payload)
        if message is None:
            frame = orjson.loads(payload)
            if frame["type"] != "message":
                self.on_control(frame)
                return
            data = frame["data"]
            message = (data["seq"], data["t"], frame["id"], frame["channel"])
            if len(fleet.parsed) >= PARSED_MAX:
                fleet.parsed.clear()
            fleet.parsed[payload] = message
        seq, sent_at, message_id, channel = message
        fleet.latencies.append(now - sent_at)
        fleet.frames += 1
        self.count += 1
        self.last_id = message_id
        if fleet.shared_order:
            self.hash[channel] = (self.hash.get(channel, 0) * HASH_MULTIPLIER + seq) & HASH_MASK
            if self.index == 0:
                fleet.reference_order.setdefault(channel, []).append(seq)
        elif self.last_seq >= 0 and seq != self.last_seq + 1:
            if seq > self.last_seq:
                fleet.gaps += seq - self.last_seq - 1
            else:
                fleet.backwards += 1
        self.last_seq = seq
        if self.recovering and self.count == self.expect:
            self.recovering = False
            fleet.recovery_complete()

    def on_control(self, frame: dict[str, Any]) -> None:
        fleet = self.fleet
        kind = frame["type"]
        if kind == "subscribed":
            rewound = frame.get("rewound")
            if rewound is not None:
                fleet.rewound += rewound["count"]
                fleet.rewound_incomplete += not rewound["complete"]
            recovered = frame.get("recovered")
            if recovered is True:
                fleet.recovered_true += 1
            elif recovered is False:
                fleet.recovered_false += 1
            self.pending_subscribes -= 1
            if self.pending_subscribes <= 0 and not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind == "error":
            fleet.errors += 1

    def close(self) -> None:
        self.fleet.forget(self)
        if self.open and self.transport is not None:
            self.open = False
            self.transport.write(client_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()


async def open_clients(
    fleet: Fleet,
    count: int,
    concurrency: int,
    resume: list[tuple[str | None, int]] | None = None,
    expect: int = 0,
    timeout_s: float = 60.0,
) -> tuple[list[Client], int]:
    """Opens `count` connections and waits until each is subscribed (or failed)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    failed = 0

    async def one(index: int) -> Client | None:
        nonlocal failed
        async with gate:
            try:
                _, client = await loop.create_connection(
                    lambda: Client(
                        fleet, index, *(resume[index] if resume else (None, -1)), expect
                    ),
                    fleet.host,
                    fleet.port,
                )
                await asyncio.wait_for(asyncio.shield(client.subscribed), timeout_s)
                return client
            except (OSError, TimeoutError, ConnectionError):
                failed += 1
                return None

    opened = await asyncio.gather(*(one(i) for i in range(count)))
    return [client for client in opened if client is not None], failed


async def main(args: argparse.Namespace) -> None:
    nofile = control.raise_nofile_limit()
    channels = (
        [args.channel]
        if args.channels == 1
        else [f"{args.channel}-{i}" for i in range(args.channels)]
    )
    fleet = Fleet(args.host, args.port, channels, args.order)

    def step_stats() -> dict[str, Any]:
        return {
            "frames": fleet.frames,
            "gaps": fleet.gaps,
            "backwards": fleet.backwards,
            "errors": fleet.errors,
            "closes": {str(k): v for k, v in fleet.closes.items()},
            "open": sum(1 for c in fleet.clients if c.open),
            "latency": quantiles(fleet.latencies),
        }

    def reset() -> None:
        fleet.latencies = array("d")
        fleet.frames = fleet.gaps = fleet.backwards = fleet.errors = 0
        fleet.closes = {}
        fleet.recovered_true = fleet.recovered_false = 0
        fleet.rewound = fleet.rewound_incomplete = 0
        fleet.reference_order = {}
        for client in fleet.clients:
            client.count = 0
            client.hash = {}

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        name = command["cmd"]
        if name == "connect":
            started = time.monotonic()
            clients, failed = await open_clients(
                fleet, int(command["count"]), int(command.get("concurrency", 100))
            )
            fleet.clients.extend(clients)
            return {"connected": len(clients), "failed": failed, "s": time.monotonic() - started}
        if name == "reset":
            reset()
            return {}
        if name == "count":
            return {"frames": fleet.frames, "open": sum(1 for c in fleet.clients if c.open)}
        if name == "snapshot":
            return step_stats()
        if name == "orders":
            hashes: dict[str, int] = {}
            counts: dict[str, int] = {}
            for client in fleet.clients:
                signature = str(sorted(client.hash.items()))
                hashes[signature] = hashes.get(signature, 0) + 1
                counts[str(client.count)] = counts.get(str(client.count), 0) + 1
            return {"hashes": hashes, "counts": counts, "reference": fleet.reference_order}
        if name == "disconnect":
            last = [client.last_id for client in fleet.clients]
            for client in fleet.clients:
                client.close()
            await asyncio.sleep(0.2)
            return {"closed": len(last), "last_ids": sorted({x for x in last if x})}
        if name == "reconnect":
            # Every connection comes back at once with `since` = the last id it saw.
            expect = int(command["expect"])
            resume = [(client.last_id, client.last_seq) for client in fleet.clients]
            reset()
            fleet.pending_recovery = sum(1 for since, _ in resume if since is not None)
            fleet.recovery_done = asyncio.Event()
            started = time.time()
            clients, failed = await open_clients(
                fleet, len(resume), len(resume), resume=resume, expect=expect
            )
            fleet.pending_recovery -= failed
            if fleet.pending_recovery > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fleet.recovery_done.wait(), float(command["timeout_s"]))
            else:
                fleet.recovery_finished_at = time.time()
            fleet.clients = clients
            complete = sum(1 for c in clients if not c.recovering and c.count == expect)
            return {
                "started": started,
                "finished": fleet.recovery_finished_at,
                "reconnected": len(clients),
                "failed": failed,
                "complete": complete,
                "recovered_true": fleet.recovered_true,
                "recovered_false": fleet.recovered_false,
                **step_stats(),
            }
        if name == "rewind":
            # Every open connection subscribes to another channel with a rewind, at once; done
            # when each has that many messages (their seq from 0, in order, once).
            count = int(command["count"])
            frame = client_frame(
                0x1,
                orjson.dumps(
                    {"type": "subscribe", "channel": command["channel"], "rewind": {"count": count}}
                ),
            )
            reset()
            live = [client for client in fleet.clients if client.open]
            fleet.pending_recovery = len(live)
            fleet.recovery_done = asyncio.Event()
            started = time.time()
            saved = [client.last_seq for client in live]  # of the live channel: back after
            for client in live:
                client.recovering = True
                client.expect = count
                client.last_seq = -1
                client.transport.write(frame)  # type: ignore[union-attr]
            if live:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fleet.recovery_done.wait(), float(command["timeout_s"]))
            else:
                fleet.recovery_finished_at = time.time()
            complete = sum(1 for c in live if not c.recovering and c.count == count)
            for client, last_seq in zip(live, saved, strict=True):
                client.recovering = False
                client.last_seq = last_seq
            return {
                "started": started,
                "finished": fleet.recovery_finished_at,
                "clients": len(live),
                "complete": complete,
                "rewound": fleet.rewound,
                "rewound_incomplete": fleet.rewound_incomplete,
                **step_stats(),
            }
        if name == "close":
            for client in fleet.clients:
                client.close()
            fleet.clients = []
            await asyncio.sleep(0.2)
            return {}
        raise ValueError(f"unknown command {name!r}")

    reader = asyncio.get_running_loop().create_task(fleet.read_forever(args.tick_ms / 1000))
    if args.connections:
        clients, failed = await open_clients(fleet, args.connections, args.concurrency)
        fleet.clients.extend(clients)
        hello = {"connected": len(clients), "failed": failed, "nofile": nofile}
    else:
        hello = {"connected": 0, "failed": 0, "nofile": nofile}
    await control.serve(handle, hello)
    reader.cancel()
    for client in fleet.clients:
        client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", default="bench")
    parser.add_argument("--channels", type=int, default=1, help="subscribe to <channel>-0..N-1")
    parser.add_argument("--connections", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--tick-ms", type=float, default=TICK_S * 1000)
    parser.add_argument("--order", choices=("strict", "shared"), default="strict")
    uvloop.run(main(parser.parse_args()))
