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
when it reopens a stream. `ResumeBudget` sizes that request with every position at its longest;
a stream whose resume would not fit what the proxies accept is refused when it opens (a stream
that can never resume would lose messages on its first reconnect).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.core.channels import is_valid_channel
from services.core.ids import is_valid_message_id
from services.socket.history import parse_position_ms

PAIR_SEPARATOR = ","
POSITION_SEPARATOR = "="
LAST_EVENT_ID_PARAM = "last_event_id"
LAST_EVENT_ID_HEADER = "Last-Event-ID"
# Room left at the opening for what a reconnect adds: the load balancer's affinity cookie, a
# refreshed token that is a little longer.
RESUME_MARGIN_BYTES = 512


class BadEventId(ValueError):
    """A Last-Event-ID that is not a list of `<channel>=<position>` pairs."""


def is_valid_position(position: str) -> bool:
    return is_valid_message_id(position) or parse_position_ms(position) is not None


def encode_positions(pairs: Iterable[tuple[str, str]]) -> str:
    return PAIR_SEPARATOR.join(f"{channel}{POSITION_SEPARATOR}{p}" for channel, p in pairs)


def _escaped_in(channel: str) -> int:
    """How many characters of a channel name percent-encoding escapes (services/core/channels:
    of its alphabet, `:` and `@`)."""
    return channel.count(":") + channel.count("@")


@dataclass(frozen=True, slots=True)
class ResumeBudget:
    """Whether a stream could resume: its reconnect request, every channel's position at
    `position_chars` (SSE_POSITION_MAX_CHARS), must fit `head_max_bytes`
    (SSE_RESUME_HEAD_MAX_BYTES: what the proxies in front accept)."""

    position_chars: int
    head_max_bytes: int

    def head_bytes(self, head_without_id: int, channels: Sequence[str]) -> int:
        """The size of a request head that resumes `channels`: `head_without_id` (the opening
        request's head without any id) plus the longest id percent-encoded in the URL and as a
        header line, the blank line that ends the head, and the margin."""
        # Counted, not built (a stream's open pays this): each pair is `<channel>=<position>`,
        # pairs joined by `,`. Percent-encoding makes `=`, `,` and a channel's `:` and `@`
        # three characters each; everything else in a channel or a position is left as is.
        raw = sum(len(channel) for channel in channels) + len(channels) * (1 + self.position_chars)
        raw += len(channels) - 1  # the commas
        escaped = 2 * (2 * len(channels) - 1 + sum(_escaped_in(channel) for channel in channels))
        in_url = len(f"&{LAST_EVENT_ID_PARAM}=") + raw + escaped
        in_header = len(LAST_EVENT_ID_HEADER) + raw + 4  # ": " and CRLF
        return head_without_id + in_url + in_header + 2 + RESUME_MARGIN_BYTES

    def channels_that_fit(self, head_without_id: int, channels: Sequence[str]) -> int:
        """How many of the first `channels` one stream may carry: dropping a channel also
        takes its name (at least) out of the URL's channel list."""
        count, head = len(channels), head_without_id
        while count and self.head_bytes(head, channels[:count]) > self.head_max_bytes:
            count -= 1
            head -= len(channels[count]) + 1
        return count

    def refusal(
        self, head_without_id: int, channels: Sequence[str], positions: dict[str, str] | None
    ) -> str | None:
        """Why this stream may not open, or None. A reconnect whose id names every channel is
        never refused: the stream was accepted before and its request got here whole."""
        if positions is not None and all(channel in positions for channel in channels):
            return None
        needed = self.head_bytes(head_without_id, channels)
        if needed <= self.head_max_bytes:
            return None
        fit = self.channels_that_fit(head_without_id, channels)
        advice = (
            f"the first {fit} of these channels fit one stream: open another for the rest"
            if fit
            else "not one of these channels fits: shorten the token or the channel names"
        )
        return (
            f"this stream could not resume: a reconnect carries every channel's position (up to "
            f"{self.position_chars} characters, SSE_POSITION_MAX_CHARS) in the URL and in "
            f"Last-Event-ID, {needed} bytes here with a {RESUME_MARGIN_BYTES}-byte margin, over "
            f"SSE_RESUME_HEAD_MAX_BYTES {self.head_max_bytes}; {advice} (or use the websocket)"
        )


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
