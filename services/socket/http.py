"""A small, strict HTTP/1.1 request-head parser and response builder for the socket pod.

The pod serves only a handful of plain HTTP endpoints beside the websocket upgrade, so it reads
requests itself instead of running a second server: one port, one event loop, no framework.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import orjson

HEAD_MAX_BYTES = 16 * 1024
HEADERS_MAX = 100


class HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection

    @property
    def is_websocket_upgrade(self) -> bool:
        return (
            self.method == "GET"
            and "websocket" in self.headers.get("upgrade", "").lower()
            and "upgrade" in self.headers.get("connection", "").lower()
        )

    def query_value(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


def parse_head(head: bytes) -> Request:
    """Parses the request line and headers (`head` ends with the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HttpError(400, "bad request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if (
        version not in ("HTTP/1.1", "HTTP/1.0")
        or not method.isalpha()
        or not target.startswith("/")
    ):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    count = 0
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpError(400, "malformed header")
        count += 1
        if count > HEADERS_MAX:
            raise HttpError(431, "too many headers")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    split = urlsplit(target)
    return Request(
        method=method,
        target=target,
        path=split.path,
        query=parse_qs(split.query, keep_blank_values=True),
        version=version,
        headers=headers,
    )


def content_length(request: Request) -> int:
    if "transfer-encoding" in request.headers:
        raise HttpError(411, "chunked request bodies are not accepted; send Content-Length")
    raw = request.headers.get("content-length")
    if raw is None:
        return 0
    if not raw.isdigit():
        raise HttpError(400, "bad Content-Length")
    return int(raw)


def response(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    headers: dict[str, str] | None = None,
    keep_alive: bool = True,
    head_only: bool = False,
) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def json_response(status: int, payload: object, **kwargs: object) -> bytes:
    return response(
        status,
        orjson.dumps(payload),
        "application/json",
        **kwargs,  # type: ignore[arg-type]
    )
