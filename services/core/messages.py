"""What makes a message's data publishable, checked the same way wherever a message comes in:
the api's FastAPI routes and its fast path, and socket.io's `publish` on the socket pods."""

from __future__ import annotations

from typing import Any, Literal

from services.core.envelope import dumps


class InvalidData(Exception):
    """`reason` is `not_json` (cannot be encoded) or `too_large` (over MAX_MESSAGE_BYTES)."""

    def __init__(self, reason: Literal["not_json", "too_large"], detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def encode_data(data: Any, max_bytes: int) -> bytes:
    """The data as compact JSON, encoded once; its size is what MAX_MESSAGE_BYTES limits."""
    try:
        encoded = dumps(data)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidData("not_json", f"data cannot be encoded as JSON: {exc}") from None
    if len(encoded) > max_bytes:
        raise InvalidData("too_large", f"data is {len(encoded)} bytes; the limit is {max_bytes}")
    return encoded
