"""A TCP proxy between the soak's clients and the load balancer, so the nemesis can cut client
connections as a network would (both sides reset, no close frame).

`python -m devtools.soak.tcpproxy --listen PORT --target PORT [--seed S]`; stdin, one JSON object
a line: `{"cmd": "cut", "share": 0.3}` resets that share of the open connections (chosen with the
seed) and answers `{"ev": "cut", "count": N, "open": M}` on stdout. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import sys

CHUNK = 1 << 16


class Pair:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


class Proxy:
    def __init__(self, target: int, seed: int) -> None:
        self.target = target
        self.pairs: set[Pair] = set()
        self.random = random.Random(seed)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = Pair(writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            self.pairs.discard(pair)
            for w in (writer, up_writer):
                w.transport.abort() if w.transport.is_closing() else w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (OSError, ConnectionError):
            writer.transport.abort()

    def cut(self, share: float) -> int:
        pairs = sorted(self.pairs, key=id)
        chosen = [p for p in pairs if self.random.random() < share]
        for pair in chosen:
            pair.reset()
        return len(chosen)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    proxy = Proxy(args.target, args.seed)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.listen, backlog=1024)
    print(json.dumps({"ev": "listening", "port": args.listen}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("cmd") == "cut":
            count = proxy.cut(float(command.get("share", 0.3)))
            answer = {"ev": "cut", "count": count, "open": len(proxy.pairs)}
            print(json.dumps(answer), flush=True)
    server.close()  # stdin closed: the runner is gone or done


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(main())
