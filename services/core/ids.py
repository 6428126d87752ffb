"""Message ids: time-ordered (ULID) when the API assigns them, any contract-valid string otherwise.

Ids are global recovery cursors: every pod sees the same id for a message. Their embedded time is
only a hint (ids from different api pods are roughly ordered); membership in history decides.
"""

from __future__ import annotations

import re
import uuid

from ulid import ULID

ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)
_ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-7[0-9a-fA-F]{3}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def new_message_id() -> str:
    """A unique id whose first 48 bits are the current time in milliseconds."""
    return str(ULID())


def is_valid_message_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.match(value) is not None and "\n" not in value


def id_time_ms(message_id: str) -> int | None:
    """The creation time embedded in a ULID or UUIDv7, or None for ids that carry no time."""
    if _ULID_RE.match(message_id):
        try:
            return ULID.from_str(message_id.upper()).milliseconds
        except ValueError:
            return None
    if _UUID_RE.match(message_id):
        return uuid.UUID(message_id).int >> 80
    return None
