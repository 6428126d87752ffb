"""Who may open a session and with which token: the one admission and token path of every kind
of session (native websocket, socket.io, later ones)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from services.core.auth import Claims, InvalidToken, verify_token
from services.core.settings import origin_allowed


class Refusal(NamedTuple):
    """Why a new session is refused."""

    status: int
    reason: str  # metric label
    detail: str


class TokenRefused(Exception):
    """A token that does not do: `code` is the wire's error code (`unauthorized`, `forbidden`,
    `bad_request`)."""

    def __init__(self, code: str, message: str, reason: str = "bad_token") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason  # metric label of a refused handshake


class Access:
    def __init__(
        self,
        token_secret: str,
        origins: list[str],
        is_ready: Callable[[], bool],
        is_full: Callable[[], bool],
    ) -> None:
        self.tokens_required = bool(token_secret)
        self._secret = token_secret
        self._origins = origins
        self._is_ready = is_ready
        self._is_full = is_full

    def admit(self, origin: str | None) -> Refusal | None:
        """Readiness, origin and the pod's connection limit (every kind of session counts)."""
        if not self._is_ready():
            return Refusal(503, "not_ready", "this pod is draining or not ready; try another")
        if not origin_allowed(origin, self._origins):
            return Refusal(403, "origin", "origin not allowed")
        if self._is_full():
            return Refusal(503, "capacity", "this pod is at its connection limit; try another")
        return None

    def allows_origin(self, origin: str | None) -> bool:
        """`ALLOWED_ORIGINS` alone (a request that opens no session: a preflight, a query)."""
        return origin_allowed(origin, self._origins)

    def authenticate(self, token: str | None, how: str) -> Claims | None:
        """The claims of a session's token (None when tokens are off); `how` says where a
        missing token goes."""
        if not self._secret:
            return None
        if not token:
            raise TokenRefused("unauthorized", f"a token is required: {how}", "no_token")
        try:
            return verify_token(token, self._secret)
        except InvalidToken:
            raise TokenRefused("unauthorized", "invalid or expired token") from None

    def refresh(self, current: Claims | None, token: object) -> Claims:
        """A fresh token for a session: valid, and for the same `sub`. The caller then drops
        the channels the new claims no longer allow."""
        if not self._secret:
            raise TokenRefused("bad_request", "this server does not use tokens")
        if not isinstance(token, str):
            raise TokenRefused("bad_request", "refresh takes a token")
        try:
            claims = verify_token(token, self._secret)
        except InvalidToken:
            raise TokenRefused("forbidden", "invalid or expired token") from None
        if current is not None and claims.sub != current.sub:
            raise TokenRefused("forbidden", "the new token is for another sub")
        return claims
