"""Test helpers: a websocket client that records frames, and event waits with deadlines."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

DEFAULT_TIMEOUT_S = 15.0
CLOSED = "_closed"  # queued after the last frame when the connection ends


class WsClient:
    """A real websocket client; frames are parsed and queued as they arrive."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WsClient:
        connection = await websockets.connect(url, open_timeout=10, **kwargs)
        return cls(connection)

    async def _read(self) -> None:
        try:
            async for raw in self.connection:
                self.frames.put_nowait(orjson.loads(raw))
        except websockets.ConnectionClosed:
            pass
        finally:
            self.close_code = self.connection.close_code
            self.closed.set()
            self.frames.put_nowait({"type": CLOSED, "code": self.close_code})

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            frame = orjson.dumps(frame).decode()
        await self.connection.send(frame)

    async def next(
        self, kind: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """The next frame (of `kind`, skipping pongs when another kind is asked for)."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.frames.get()
                if frame.get("type") == CLOSED and kind != CLOSED:
                    self.frames.put_nowait(frame)  # stays the last word
                    raise ConnectionError(f"closed with {frame['code']} while waiting for {kind}")
                if kind is None or frame.get("type") == kind:
                    return frame
                if frame.get("type") != "pong":
                    raise AssertionError(f"expected a {kind} frame, got {frame}")

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "channel": channel, **extra})
        return await self.next("subscribed")

    async def messages(
        self, count: int, timeout: float = DEFAULT_TIMEOUT_S
    ) -> list[dict[str, Any]]:
        return [await self.next("message", timeout) for _ in range(count)]

    async def pod(self) -> str:
        await self.send({"type": "ping"})
        return (await self.next("pong"))["pod"]

    async def assert_quiet(self, within_s: float = 0.5) -> None:
        """No frame arrives for a moment (used only after everything expected has arrived)."""
        try:
            async with asyncio.timeout(within_s):
                frame = await self.frames.get()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {frame}")

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT_S) -> int | None:
        async with asyncio.timeout(timeout):
            await self.closed.wait()
        return self.close_code

    async def close(self) -> None:
        await self.connection.close()
        await self._reader
