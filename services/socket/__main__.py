"""`python -m services.socket`: run one socket pod until SIGTERM/SIGINT, then drain and exit."""

from __future__ import annotations

import asyncio
import signal

from services.core.logs import configure_logging
from services.socket.pod import Pod
from services.socket.settings import SocketSettings


async def serve(settings: SocketSettings) -> None:
    pod = Pod(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.create_task(pod.start())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)
    else:
        start.result()
        await stopped
    await pod.drain()


def main() -> None:
    settings = SocketSettings()
    configure_logging("socket", settings.log_level)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
