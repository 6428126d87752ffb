"""Single-process mode (BROKER=memory): the api and one socket pod in one event loop.

For machines without the Pub/Sub emulator. One process only: the memory broker does not cross
process boundaries.
"""

from __future__ import annotations

import asyncio
import os
import signal

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.core.broker.memory import MemoryBroker
from services.core.logs import configure_logging
from services.socket.pod import Pod
from services.socket.settings import SocketSettings


async def serve() -> None:
    broker = MemoryBroker.shared()
    api_settings = ApiSettings(broker="memory", port=int(os.environ.get("API_PORT", "8080")))
    socket_settings = SocketSettings(
        broker="memory", port=int(os.environ.get("SOCKET_PORT", "8081"))
    )
    configure_logging("single", api_settings.log_level)
    pod = Pod(socket_settings, broker)
    await pod.start()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(api_settings, broker),
            host=api_settings.host,
            port=api_settings.port,
            log_config=None,
            access_log=False,
        )
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # uvicorn captures SIGINT/SIGTERM itself while it serves (and ends serve()): either way out.
    api_task = asyncio.create_task(server.serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({api_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    server.should_exit = True
    await api_task
    await pod.drain()


if __name__ == "__main__":
    asyncio.run(serve())
