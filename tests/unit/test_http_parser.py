"""The socket pod's HTTP head parser."""

from __future__ import annotations

import pytest

from services.socket.http import (
    HEAD_MAX_BYTES,
    HttpError,
    RequestReader,
    content_length,
    parse_head,
    response,
)
from services.socket.wsframe import text_frame


def test_parses_request_line_headers_and_query():
    request = parse_head(b"GET /ws?token=a%20b&x=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert request.raw_headers == [("Host", "h"), ("X-A", "1"), ("x-a", "2")]
    assert (request.method, request.path, request.version) == ("GET", "/ws", "HTTP/1.1")
    assert request.query_value("token") == "a b"
    assert request.header("x-a") == "1, 2"
    assert request.keep_alive


@pytest.mark.parametrize(
    "head",
    [b"GET\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n", b"GET nope HTTP/1.1\r\nHost: h\r\n\r\n",
     b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
     b"GET / HTTP/1.1\r\n : x\r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"],
)  # fmt: skip
def test_malformed_heads_are_400(head):
    """h11's rules (an HTTP/1.1 request without Host among them), and a target not a path."""
    with pytest.raises(HttpError) as info:
        parse_head(head)
    assert info.value.status == 400


def test_content_length_rules():
    head = b"POST / HTTP/1.1\r\nHost: h\r\n"
    assert content_length(parse_head(head + b"Content-Length: 12\r\n\r\n")) == 12
    with pytest.raises(HttpError):
        content_length(parse_head(head + b"Content-Length: -1\r\n\r\n"))
    with pytest.raises(HttpError) as info:
        content_length(parse_head(head + b"Transfer-Encoding: chunked\r\n\r\n"))
    assert info.value.status == 411


def test_the_reader_keeps_the_limits_and_reads_pipelined_requests():
    reader = RequestReader(max_body_bytes=10)
    reader.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nab")
    assert reader.next_request() is None  # the body is not all there yet
    reader.feed(b"cGET /b HTTP/1.1\r\nHost: h\r\n\r\nGET /c HTTP/1.1\r\nHost: h\r\n\r\n")
    first = reader.next_request()
    assert first is not None and (first.path, first.body) == ("/a", b"abc")
    assert [reader.next_request().path, reader.next_request().path] == ["/b", "/c"]
    assert reader.next_request() is None
    reader.feed(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n")
    with pytest.raises(HttpError) as too_large:
        reader.next_request()
    assert too_large.value.status == 413
    big = RequestReader(max_body_bytes=10)
    big.feed(b"GET / HTTP/1.1\r\nX: " + b"x" * HEAD_MAX_BYTES)
    with pytest.raises(HttpError) as too_big_head:
        big.next_request()
    assert too_big_head.value.status == 431
    whole = RequestReader(max_body_bytes=10)  # a head over the limit that came in one piece
    whole.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"x" * HEAD_MAX_BYTES + b"\r\n\r\n")
    with pytest.raises(HttpError) as whole_head:
        whole.next_request()
    assert whole_head.value.status == 431
    many = RequestReader(max_body_bytes=10)
    many.feed(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: 1\r\n" * 101 + b"\r\n")
    with pytest.raises(HttpError) as too_many:
        many.next_request()
    assert too_many.value.status == 431


def test_an_upgrade_leaves_what_follows_its_head_for_the_websocket():
    reader = RequestReader(max_body_bytes=10)
    reader.feed(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x85frame"
    )
    request = reader.next_request()
    assert request is not None and request.is_websocket_upgrade
    assert reader.leftover == b"\x81\x85frame"


def test_response_and_keep_alive():
    assert parse_head(b"GET / HTTP/1.0\r\n\r\n").keep_alive is False
    assert parse_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").keep_alive is True
    raw = response(200, b"hi", keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\nhi")
    assert b"Connection: close" in raw


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_text_frames_match_the_websockets_library(size):
    from websockets.frames import Frame, Opcode

    payload = b"x" * size
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])
