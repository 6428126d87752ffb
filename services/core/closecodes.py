"""Websocket close codes of the contract, as data."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    TOKEN_EXPIRED = 1008  # policy violation: reconnect with a fresh token
    TOO_LARGE = 1009  # a client frame over the limit
    INTERNAL_ERROR = 1011
    RESTART = 1012  # draining, or the connection reached its maximum age: reconnect at once
    TRY_AGAIN_LATER = 1013  # too slow, flooding or overloaded: reconnect with backoff
