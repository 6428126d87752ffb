"""Who is publishing: a publisher key (any channel), a client token (its `publish` channels), or
nobody when both API_KEYS and TOKEN_SECRET are empty (publishing is open)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from fastapi import HTTPException, Request

from services.api.settings import ApiSettings
from services.core.auth import Claims, InvalidToken, key_matches, verify_token

log = logging.getLogger(__name__)

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "open", "key" or "token"
    rate_key: str
    claims: Claims | None = None

    @property
    def sub(self) -> str | None:
        return self.claims.sub if self.claims is not None else None

    def may_publish(self, channel: str) -> bool:
        return self.claims is None or self.claims.may_publish(channel)


class Authenticator:
    def __init__(self, settings: ApiSettings) -> None:
        self._keys = settings.keys
        self._secret = settings.token_secret
        self.open = not self._keys and not self._secret

    def warn_if_open(self) -> None:
        if self.open:
            log.warning("publishing is open: API_KEYS and TOKEN_SECRET are both empty")
        elif not self._keys:
            log.warning("API_KEYS is empty: only client tokens can publish; /v1/tokens is off")

    async def __call__(self, request: Request) -> Principal:
        """A FastAPI dependency: 401 unless the request carries a valid credential.

        Async although it never awaits: FastAPI runs a sync dependency in its thread pool, a
        thread hop per request that cost the publish route about a fifth of its CPU."""
        host = request.client.host if request.client else "unknown"
        return self.principal(request.headers.get("authorization", ""), host)

    def principal(self, authorization: str, host: str) -> Principal:
        """Who sends a request with this Authorization header; HTTPException 401 if nobody."""
        if self.open:
            return Principal("open", f"open:{host}")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise HTTPException(401, "missing bearer credential", headers=BEARER_CHALLENGE)
        if self._keys and key_matches(credential, self._keys):
            digest = hashlib.sha256(credential.encode()).hexdigest()[:16]
            return Principal("key", f"key:{digest}")
        if self._secret:
            try:
                claims = verify_token(credential, self._secret)
            except InvalidToken:
                raise HTTPException(401, "invalid credential", headers=BEARER_CHALLENGE) from None
            return Principal("token", f"sub:{claims.sub}", claims)
        raise HTTPException(401, "invalid credential", headers=BEARER_CHALLENGE)
