"""HTTP/1.1 for the socket pod: h11 reads the requests, this module builds the responses.

The pod serves only a handful of plain HTTP endpoints beside the websocket upgrade, so it answers
them on its own asyncio protocol (gateway.py) instead of running a second server: one port, one
event loop, no framework. Parsing is h11's (sans-I/O, maintained); the limits are the pod's:
the head's size (431), the number of headers (431), the body's size (413), no chunked bodies
(411). Responses are plain bytes written by the gateway, so h11's response state machine is not
used: every request is read by a fresh `h11.Connection` fed with what the last one left over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11
import orjson

HEAD_MAX_BYTES = 16 * 1024
_REASONS = {status.value: status.phrase for status in HTTPStatus}
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
    raw_headers: list[tuple[str, str]] = field(default_factory=list)  # as sent, in order
    head_bytes: int = 0  # request line and header lines, as measured against HEAD_MAX_BYTES

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


def _request(event: h11.Request) -> Request:
    if len(event.headers) > HEADERS_MAX:
        raise HttpError(431, "too many headers")
    # h11 bounds a head still arriving (max_incomplete_event_size); one that came whole is
    # measured here: request line and header lines with their separators.
    size = (
        len(event.method)
        + len(event.target)
        + 12
        + sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items())
    )
    if size > HEAD_MAX_BYTES:
        raise HttpError(431, "request head too large")
    target = event.target.decode("latin-1")
    if not target.startswith("/") or event.http_version not in (b"1.1", b"1.0"):
        raise HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    raw: list[tuple[str, str]] = []
    for name, value in event.headers.raw_items():
        text_name, text_value = name.decode("latin-1"), value.decode("latin-1")
        raw.append((text_name, text_value))
        key = text_name.lower()
        headers[key] = f"{headers[key]}, {text_value}" if key in headers else text_value
    split = urlsplit(target)
    return Request(
        method=event.method.decode("ascii"),
        target=target,
        path=split.path,
        query=parse_qs(split.query, keep_blank_values=True),
        version="HTTP/" + event.http_version.decode("ascii"),
        headers=headers,
        raw_headers=raw,
        head_bytes=size,
    )


class RequestReader:
    """The requests of one connection, in order (pipelining allowed), each with its body."""

    def __init__(self, max_body_bytes: int) -> None:
        self._max_body_bytes = max_body_bytes
        self._parser = self._new_parser()
        self._request: Request | None = None
        self._body = bytearray()

    @staticmethod
    def _new_parser() -> h11.Connection:
        return h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_MAX_BYTES)

    def feed(self, data: bytes) -> None:
        self._parser.receive_data(data)

    @property
    def leftover(self) -> bytes:
        """What came after the last request (the first websocket frames, after an upgrade)."""
        data, _ = self._parser.trailing_data
        return bytes(data)

    def next_request(self) -> Request | None:
        """The next complete request, or None until more data comes; HttpError for a bad one."""
        while True:
            try:
                event = self._parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                detail = "request head too large" if status == 431 else "malformed request"
                raise HttpError(status, detail) from None
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Request):
                self._request = _request(event)
                length = content_length(self._request)
                if length > self._max_body_bytes:
                    raise HttpError(413, "request body too large")
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                request, self._request = self._request, None
                assert request is not None
                request.body = bytes(self._body)
                self._body.clear()
                rest = self.leftover
                self._parser = self._new_parser()  # the next request starts afresh
                if rest:
                    self._parser.receive_data(rest)
                return request


def parse_head(head: bytes) -> Request:
    """One request head (ending with the blank line), as the reader parses it."""
    reader = RequestReader(max_body_bytes=2**62)
    reader.feed(head)
    try:
        event = reader._parser.next_event()
    except h11.RemoteProtocolError:
        raise HttpError(400, "malformed request") from None
    if not isinstance(event, h11.Request):
        raise HttpError(400, "malformed request")
    return _request(event)


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
    reason = _REASONS.get(status, "")
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


def stream_head(content_type: str, headers: dict[str, str] | None = None) -> bytes:
    """The head of a 200 response whose body lasts until the server closes the connection (no
    `Content-Length`, not chunked: RFC 9112 section 6.3), for a stream of events."""
    lines = ["HTTP/1.1 200 OK", f"Content-Type: {content_type}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(status: int, payload: object, **kwargs: object) -> bytes:
    return response(
        status,
        orjson.dumps(payload),
        "application/json",
        **kwargs,  # type: ignore[arg-type]
    )
