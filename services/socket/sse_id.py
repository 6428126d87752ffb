"""The `id:` of a Server-Sent Events stream: where every channel of the stream stands.

A browser's `EventSource` keeps only the last `id:` it received and sends it back as the
`Last-Event-ID` header when it reconnects, to whichever pod the load balancer picks. A stream
carries several channels, so one id names the position of each of them:

    <channel>=<position>[,<channel>=<position>...]      room:1=01HV5X...,room:2=@1712345678901

in the order of the stream's `channels`. Channel names never contain `,` or `=`
(services/core/channels.py); positions are message ids (`[A-Za-z0-9_-]`) or `@<ms>`
(docs/protocol.md). So the string needs no escaping and is plain ASCII, as an HTTP header must be.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.core.channels import is_valid_channel
from services.core.ids import is_valid_message_id
from services.socket.history import parse_position_ms

PAIR_SEPARATOR = ","
POSITION_SEPARATOR = "="


class BadEventId(ValueError):
    """A Last-Event-ID that is not a list of `<channel>=<position>` pairs."""


def is_valid_position(position: str) -> bool:
    return is_valid_message_id(position) or parse_position_ms(position) is not None


def encode_positions(pairs: Iterable[tuple[str, str]]) -> str:
    return PAIR_SEPARATOR.join(f"{channel}{POSITION_SEPARATOR}{p}" for channel, p in pairs)


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
