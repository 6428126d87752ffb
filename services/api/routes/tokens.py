"""POST /v1/tokens: client tokens minted for a publisher key.

No `from __future__ import annotations`: the request model is built from the settings.
"""

from fastapi import APIRouter, Depends, HTTPException
from pydantic import Field

from services.api.auth import Authenticator, Principal
from services.api.models import ErrorBody, TokenIn, TokenOut
from services.api.routes.errors import ERRORS
from services.core.auth import mint_token


def token_routes(token_secret: str, ttl_max_s: int, authenticate: Authenticator) -> APIRouter:
    router = APIRouter()

    class TokenRequest(TokenIn):
        ttl: int = Field(ge=1, le=ttl_max_s, description="Seconds, at most TOKEN_TTL_MAX_S.")

    @router.post(
        "/v1/tokens",
        response_model=TokenOut,
        responses={
            401: ERRORS[401],
            403: {"model": ErrorBody, "description": "needs a publisher key (API_KEYS)"},
            413: ERRORS[413],
            422: ERRORS[422],
        },
        summary="Mint a client token (publisher keys only)",
    )
    async def mint(request: TokenRequest, principal: Principal = Depends(authenticate)) -> TokenOut:
        if principal.kind != "key":
            raise HTTPException(403, "minting tokens needs a publisher key from API_KEYS")
        if not token_secret:
            raise HTTPException(403, "minting tokens needs TOKEN_SECRET on the server")
        if request.ttl > ttl_max_s:
            raise HTTPException(422, f"ttl over TOKEN_TTL_MAX_S ({ttl_max_s})")
        token, expires_at = mint_token(
            token_secret, request.sub, request.channels, request.publish, request.ttl
        )
        return TokenOut(token=token, expires_at=expires_at)

    return router
