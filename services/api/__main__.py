"""`python -m services.api`: serve the publish API with uvicorn.

On SIGTERM `/readyz` turns 503 at once; the server keeps serving for DRAIN_DELAY_S while the load
balancer stops sending, then stops accepting, finishes requests in flight (every publish waits
at most PUBLISH_TIMEOUT_S), and exits.
"""

from __future__ import annotations

import threading
from types import FrameType

import uvicorn

from services.api.app import create_app
from services.api.settings import ApiSettings
from services.core.logs import configure_logging


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, settings: ApiSettings, state: object) -> None:
        super().__init__(config)
        self._settings = settings
        self._state = state
        self._drain_started = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._drain_started = True
        self._state.draining = True  # type: ignore[attr-defined]
        # Not super().handle_exit: uvicorn would re-raise the signal at exit; a drain ends in 0.
        timer = threading.Timer(self._settings.drain_delay_s, self._stop)
        timer.daemon = True
        timer.start()

    def _stop(self) -> None:
        self.should_exit = True


def main() -> None:
    settings = ApiSettings()
    configure_logging("api", settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        timeout_keep_alive=int(settings.http_keepalive_s),
        timeout_graceful_shutdown=int(settings.publish_timeout_s) + 5,
        log_config=None,
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
    )
    DrainingServer(config, settings, app.state.pubsock).run()


if __name__ == "__main__":
    main()
