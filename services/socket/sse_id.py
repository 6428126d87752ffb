"""The `id:` of a Server-Sent Events stream: where every channel of the stream stands.

A browser's `EventSource` keeps only the last `id:` it received and sends it back as the
`Last-Event-ID` header when it reconnects, to whichever pod the load balancer picks. A stream
carries several channels, so one id names the position of each of them:

    <channel>=<position>[,<channel>=<position>...]      room:1=01HV5X...,room:2=@1712345678901

in the order of the stream's `channels`. Channel names never contain `,` or `=`
(services/core/channels.py); positions are message ids (`[A-Za-z0-9_-]`) or `@<ms>`
(docs/protocol.md). So the string needs no escaping and is plain ASCII, as an HTTP header must be.

The id grows with the stream's channels, and a reconnect carries it twice: in the
`Last-Event-ID` header EventSource adds, and in the URL's `last_event_id` the browser client sets
when it reopens a stream. `resume_head_bytes` is that request's size with every position at its
longest; a stream whose resume would not fit what proxies accept is refused when it opens (a
stream that can never resume would lose messages on its first reconnect).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote

from services.core.channels import is_valid_channel
from services.core.ids import is_valid_message_id
from services.socket.history import parse_position_ms

PAIR_SEPARATOR = ","
POSITION_SEPARATOR = "="
LAST_EVENT_ID_PARAM = "last_event_id"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
# The longest position: a message id (services/core/ids.py); an `@<ms>` mark is shorter.
POSITION_MAX_CHARS = 128
# What a resuming request may take: HAProxy's default buffer (16 KiB) less its rewrite reserve
# (1 KiB) is the request head it accepts; the pod's own bound is 16 KiB (services/socket/http.py).
RESUME_HEAD_MAX_BYTES = 15 * 1024


class BadEventId(ValueError):
    """A Last-Event-ID that is not a list of `<channel>=<position>` pairs."""


def is_valid_position(position: str) -> bool:
    return is_valid_message_id(position) or parse_position_ms(position) is not None


def encode_positions(pairs: Iterable[tuple[str, str]]) -> str:
    return PAIR_SEPARATOR.join(f"{channel}{POSITION_SEPARATOR}{p}" for channel, p in pairs)


def resume_head_bytes(head_without_id: int, channels: Sequence[str]) -> int:
    """The size of a request head that resumes `channels` with every position at its longest:
    `head_without_id` (the opening request's head without any id) plus the id percent-encoded
    in the URL and the id as a header line."""
    longest = encode_positions((channel, "-" * POSITION_MAX_CHARS) for channel in channels)
    in_url = len(f"&{LAST_EVENT_ID_PARAM}=") + len(quote(longest, safe=""))
    in_header = len(LAST_EVENT_ID_HEADER) + len(longest) + 4  # ": " and CRLF
    return head_without_id + in_url + in_header


def channels_that_resume(head_without_id: int, channels: Sequence[str]) -> int:
    """How many of the first `channels` one stream may carry and still resume: dropping a
    channel also takes its name (at least) out of the URL's channel list."""
    count = len(channels)
    head = head_without_id
    while count and resume_head_bytes(head, channels[:count]) > RESUME_HEAD_MAX_BYTES:
        count -= 1
        head -= len(channels[count]) + 1
    return count


def decode_positions(text: str, max_channels: int) -> dict[str, str]:
    """channel -> position; BadEventId for anything else (a malformed pair, an invalid channel
    or position, a channel twice, more than `max_channels` pairs). An empty string is no
    position at all."""
    if not text:
        return {}
    parts = text.split(PAIR_SEPARATOR)
    if len(parts) > max_channels:
        raise BadEventId(f"more than {max_channels} channels")
    positions: dict[str, str] = {}
    for part in parts:
        channel, separator, position = part.partition(POSITION_SEPARATOR)
        if not separator or not is_valid_channel(channel) or not is_valid_position(position):
            raise BadEventId("expected <channel>=<position> pairs separated by ','")
        if channel in positions:
            raise BadEventId("a channel appears twice")
        positions[channel] = position
    return positions
