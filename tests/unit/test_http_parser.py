"""The socket pod's HTTP head parser."""

from __future__ import annotations

import pytest

from services.socket.http import HttpError, content_length, parse_head, response
from services.socket.wsframe import text_frame


def test_parses_request_line_headers_and_query():
    request = parse_head(b"GET /ws?token=a%20b&x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert (request.method, request.path, request.version) == ("GET", "/ws", "HTTP/1.1")
    assert request.query_value("token") == "a b"
    assert request.header("x-a") == "1, 2"
    assert request.keep_alive


@pytest.mark.parametrize(
    "head",
    [b"GET\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET nope HTTP/1.1\r\n\r\n",
     b"G3T / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
     b"GET / HTTP/1.1\r\n : x\r\n\r\n"],
)  # fmt: skip
def test_malformed_heads_are_400(head):
    with pytest.raises(HttpError) as info:
        parse_head(head)
    assert info.value.status == 400


def test_content_length_rules():
    assert content_length(parse_head(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n")) == 12
    with pytest.raises(HttpError):
        content_length(parse_head(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"))
    with pytest.raises(HttpError) as info:
        content_length(parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"))
    assert info.value.status == 411


def test_response_and_keep_alive():
    assert parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive is False
    raw = response(200, b"hi", keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\nhi")
    assert b"Connection: close" in raw


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frames_match_the_websockets_library(size):
    from websockets.frames import Frame, Opcode

    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
