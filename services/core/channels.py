"""Channel names: validation, namespaces and the metric label derived from them."""

from __future__ import annotations

import re

CHANNEL_MAX_CHARS = 128
CHANNEL_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
_CHANNEL_RE = re.compile(CHANNEL_PATTERN)

OTHER_NAMESPACE = "other"


def is_valid_channel(name: object) -> bool:
    """True when `name` is a channel name the contract allows."""
    return isinstance(name, str) and _CHANNEL_RE.match(name) is not None and "\n" not in name


def namespace_of(channel: str) -> str:
    """`room:42` is in namespace `room`; a name without `:` is its own namespace."""
    return channel.split(":", 1)[0]


class NamespaceLabeler:
    """Maps a channel to a bounded metric label: listed namespaces keep theirs, others `other`.

    Labels never carry raw channel names: clients choose those, and unbounded label values would
    blow up every Prometheus server that scrapes us.
    """

    def __init__(self, namespaces: frozenset[str]) -> None:
        self._namespaces = namespaces

    def __call__(self, channel: str) -> str:
        namespace = namespace_of(channel)
        return namespace if namespace in self._namespaces else OTHER_NAMESPACE
