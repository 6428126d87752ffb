"""Credentials: publisher keys and client tokens (HS256 JWTs), and channel patterns.

A client token carries `sub`, `channels` (may subscribe), `publish` (may publish) and `exp`
(required). A pattern ending in `*` matches every channel with that prefix. PyJWT does the
cryptography; keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
PATTERN_RE = re.compile(r"^(?:[A-Za-z0-9_.:@-]{1,128}|[A-Za-z0-9_.:@-]{0,127}\*)$")
SUB_MAX_CHARS = 256
PATTERNS_MAX = 100


class InvalidToken(Exception):
    """Missing, malformed, foreign-signed, expired or incomplete token."""


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str
    channels: tuple[str, ...]
    publish: tuple[str, ...]
    exp: int

    def may_subscribe(self, channel: str) -> bool:
        return matches(self.channels, channel)

    def may_publish(self, channel: str) -> bool:
        return matches(self.publish, channel)


def matches(patterns: Iterable[str], channel: str) -> bool:
    for pattern in patterns:
        if pattern.endswith("*"):
            if channel.startswith(pattern[:-1]):
                return True
        elif pattern == channel:
            return True
    return False


def is_valid_pattern(pattern: object) -> bool:
    return isinstance(pattern, str) and PATTERN_RE.match(pattern) is not None


def _patterns(value: object, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if (
        not isinstance(value, list)
        or len(value) > PATTERNS_MAX
        or not all(is_valid_pattern(p) for p in value)
    ):
        raise InvalidToken(f"claim {name} must be a list of channel patterns")
    return tuple(value)


def verify_token(token: str, secret: str, leeway_s: float = 0.0) -> Claims:
    """The token's claims, or InvalidToken; `exp` is required and checked."""
    if not token or not secret:
        raise InvalidToken("no token")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=leeway_s,
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    sub = payload.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= SUB_MAX_CHARS:
        raise InvalidToken("claim sub must be a non-empty string")
    exp = payload["exp"]
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise InvalidToken("claim exp must be a number")
    return Claims(
        sub=sub,
        channels=_patterns(payload.get("channels"), "channels"),
        publish=_patterns(payload.get("publish"), "publish"),
        exp=int(exp),
    )


def mint_token(
    secret: str, sub: str, channels: Sequence[str], publish: Sequence[str], ttl_s: int
) -> tuple[str, int]:
    """A signed token and its expiry (unix seconds)."""
    expires_at = int(time.time()) + ttl_s
    payload = {"sub": sub, "channels": list(channels), "publish": list(publish), "exp": expires_at}
    return jwt.encode(payload, secret, algorithm=ALGORITHM), expires_at


def key_matches(candidate: str, keys: Sequence[str]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    found = False
    encoded = candidate.encode()
    for key in keys:
        found |= hmac.compare_digest(encoded, key.encode())
    return found
