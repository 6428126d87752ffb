"""Plain HTTP endpoints of a socket pod: health, readiness, metrics, the demo page and client."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Callable
from pathlib import Path

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.core.auth import mint_token
from services.socket.http import Request, json_response, response
from services.socket.lifecycle import Lifecycle
from services.socket.settings import SocketSettings

_DEMO_NAME = re.compile(r"^(?=.*\S)[A-Za-z0-9 ._-]{1,40}$")
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}


class Routes:
    def __init__(
        self,
        settings: SocketSettings,
        lifecycle: Lifecycle,
        registry: CollectorRegistry,
        refresh_gauges: Callable[[], None],
        web_dir: Path,
    ) -> None:
        self._settings = settings
        self._lifecycle = lifecycle
        self._registry = registry
        self._refresh_gauges = refresh_gauges
        self._web_dir = web_dir.resolve()

    def handle(self, request: Request) -> bytes:
        keep_alive = request.keep_alive
        head_only = request.method == "HEAD"
        pod_header = {"X-Pubsock-Pod": self._settings.pod_name}
        path = request.path
        if path == "/demo/token" and self._settings.demo_tokens:
            return self._demo_token(request)
        if request.method not in ("GET", "HEAD"):
            return json_response(
                405,
                {"detail": "method not allowed"},
                keep_alive=keep_alive,
                headers={"Allow": "GET, HEAD"},
            )
        if path == "/healthz":
            return json_response(200, {"status": "ok"}, keep_alive=keep_alive, headers=pod_header)
        if path == "/readyz":
            ready = self._lifecycle.ready
            return json_response(
                200 if ready else 503,
                {
                    "ready": ready,
                    "pod": self._settings.pod_name,
                    "draining": self._lifecycle.draining,
                },
                keep_alive=keep_alive,
                headers=pod_header,
            )
        if path == "/config.json":
            return json_response(
                200,
                {"api_base": self._settings.public_api_url, "pod": self._settings.pod_name},
                keep_alive=keep_alive,
                headers={**pod_header, "Cache-Control": "no-store"},
            )
        if path == "/metrics":
            self._refresh_gauges()
            return response(
                200,
                generate_latest(self._registry),
                CONTENT_TYPE_LATEST,
                keep_alive=keep_alive,
                head_only=head_only,
            )
        return self._static(path, keep_alive, head_only, pod_header)

    def _demo_token(self, request: Request) -> bytes:
        """A short-lived token for `demo:*` channels, so the demo page signs in by name alone.

        Only with DEMO_TOKENS=1; anyone can call it, so it is never for production.
        """
        keep_alive = request.keep_alive
        if request.method != "POST":
            return json_response(
                405, {"detail": "use POST"}, keep_alive=keep_alive, headers={"Allow": "POST"}
            )
        try:
            body = orjson.loads(request.body)
        except orjson.JSONDecodeError:
            return json_response(422, {"detail": "body must be JSON"}, keep_alive=keep_alive)
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not _DEMO_NAME.match(name):
            return json_response(
                422,
                {"detail": "name: 1-40 letters, digits, spaces, . _ -"},
                keep_alive=keep_alive,
            )
        settings = self._settings
        token, expires_at = mint_token(
            settings.token_secret, name.strip(), ["demo:*"], ["demo:*"], settings.demo_token_ttl_s
        )
        return json_response(
            200,
            {"token": token, "expires_at": expires_at},
            keep_alive=keep_alive,
            headers={"Cache-Control": "no-store", "X-Pubsock-Pod": settings.pod_name},
        )

    def _static(
        self, path: str, keep_alive: bool, head_only: bool, headers: dict[str, str]
    ) -> bytes:
        relative = "index.html" if path in ("", "/") else path.lstrip("/")
        candidate = (self._web_dir / relative).resolve()
        suffix = candidate.suffix.lower()
        if (
            self._web_dir not in candidate.parents
            or suffix not in _STATIC_TYPES
            or not candidate.is_file()
        ):
            return json_response(404, {"detail": "not found"}, keep_alive=keep_alive)
        body = candidate.read_bytes()
        content_type = _STATIC_TYPES.get(suffix) or mimetypes.guess_type(candidate.name)[0]
        return response(
            200,
            body,
            content_type or "application/octet-stream",
            headers={**headers, "Cache-Control": "no-cache"},
            keep_alive=keep_alive,
            head_only=head_only,
        )
