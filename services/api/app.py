"""The publish API as a FastAPI app: `create_app(settings, broker)`.

No `from __future__ import annotations` here: the request models are built per app from the
settings (so the OpenAPI schema states the configured limits) and FastAPI must see them.
"""

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.auth import Authenticator, Principal
from services.api.bodylimit import BodyLimitMiddleware
from services.api.fastpath import PublishFastPath
from services.api.metrics import ApiMetrics
from services.api.models import (
    Accepted,
    BatchAccepted,
    BatchIn,
    BatchItem,
    BatchUnavailableBody,
    ErrorBody,
    Health,
    MessageIn,
    TokenIn,
    TokenOut,
    UnavailableBody,
)
from services.api.publisher import Publisher
from services.api.settings import ApiSettings
from services.core.auth import mint_token
from services.core.broker import Broker, BrokerBusy, BrokerUnavailable, create_broker
from services.core.channels import CHANNEL_PATTERN, NamespaceLabeler
from services.core.envelope import Envelope, dumps
from services.core.ids import new_message_id
from services.core.ratelimit import KeyedLimiter

log = logging.getLogger(__name__)

ChannelPath = Annotated[
    str, Path(pattern=CHANNEL_PATTERN, max_length=128, description="Channel name, e.g. room:42")
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no or bad credential"},
    403: {"model": ErrorBody, "description": "credential not allowed on this channel"},
    413: {"model": ErrorBody, "description": "data or request body too large"},
    422: {"model": ErrorBody, "description": "malformed body or channel name"},
    429: {
        "model": ErrorBody,
        "description": "rate limit, or the channel's backlog for Pub/Sub is full (nothing was "
        "published); retry after Retry-After seconds",
    },
}


class AppState:
    def __init__(self) -> None:
        self.started = False
        self.draining = False


def _now_ms() -> int:
    return int(time.time() * 1000)


def create_app(settings: ApiSettings, broker: Broker | None = None) -> FastAPI:
    metrics = ApiMetrics()
    publisher = Publisher(
        broker or create_broker(settings), metrics, settings.broker_probe_interval_s
    )
    state = AppState()
    labeler = NamespaceLabeler(settings.namespaces)
    retry_after = {"Retry-After": str(settings.retry_after_s)}
    authenticate = Authenticator(settings)

    class Batch(BatchIn):
        messages: list[BatchItem] = Field(min_length=1, max_length=settings.max_batch)

    class TokenRequest(TokenIn):
        ttl: int = Field(
            ge=1, le=settings.token_ttl_max_s, description="Seconds, at most TOKEN_TTL_MAX_S."
        )

    limiter = KeyedLimiter(settings.publish_rate_per_s, settings.publish_burst)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        authenticate.warn_if_open()
        await publisher.start()
        state.started = True
        if settings.origins == ["*"]:
            log.info("CORS and origins: any origin allowed (ALLOWED_ORIGINS=*)")
        yield
        state.draining = True
        await publisher.close()

    app = FastAPI(
        title="pubsock publish API",
        version="1",
        summary="Publish messages to channels; every socket pod delivers them to its subscribers.",
        lifespan=lifespan,
    )
    app.state.pubsock = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    origins = settings.origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if "*" in origins else origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After"],
        max_age=600,
    )

    def encode_data(data: Any) -> orjson.Fragment:
        """The data as compact JSON, once; its size is what MAX_MESSAGE_BYTES limits."""
        try:
            encoded = dumps(data)
        except (TypeError, ValueError, RecursionError) as exc:
            raise HTTPException(422, f"data cannot be encoded as JSON: {exc}") from None
        if len(encoded) > settings.max_message_bytes:
            raise HTTPException(
                413, f"data is {len(encoded)} bytes; the limit is {settings.max_message_bytes}"
            )
        return orjson.Fragment(encoded)

    def count(result: str, channels: list[str]) -> None:
        for channel in channels:
            metrics.publishes.labels(result, labeler(channel)).inc()

    def admit(principal: Principal, channels: list[str]) -> None:
        """403 for a channel the credential may not publish to; 429 over the rate limit."""
        for channel in channels:
            if not principal.may_publish(channel):
                count("forbidden", channels)
                raise HTTPException(403, f"this credential may not publish to {channel}")
        wait_s = limiter.take(principal.rate_key, len(channels))
        if wait_s > 0:
            count("rate_limited", channels)
            metrics.rate_limited.inc()
            raise HTTPException(
                429, "publish rate limit reached", headers={"Retry-After": str(int(wait_s) + 1)}
            )

    @app.post(
        "/v1/channels/{channel}/messages",
        status_code=202,
        response_model=Accepted,
        responses={
            **_ERRORS,
            503: {
                "model": UnavailableBody,
                "description": "Pub/Sub unavailable or not confirming in time: retry with the id",
            },
        },
        summary="Publish one message",
    )
    async def publish_message(
        channel: ChannelPath, message: MessageIn, principal: Principal = Depends(authenticate)
    ) -> Any:
        return await publish_one(channel, message.data, message.id, principal)

    async def publish_one(
        channel: str, data: Any, message_id: str | None, principal: Principal
    ) -> Response:
        """The route's work, shared with the fast path (services/api/fastpath.py)."""
        admit(principal, [channel])
        message_id = message_id or new_message_id()
        try:
            envelope = Envelope(message_id, channel, encode_data(data), _now_ms(), principal.sub)
        except HTTPException:
            count("rejected", [channel])
            raise
        try:
            await publisher.publish([envelope])
        except BrokerBusy as exc:
            count("busy", [channel])
            return JSONResponse(
                {"detail": f"not published: {exc}; retry later", "id": message_id},
                status_code=429,
                headers=retry_after,
            )
        except BrokerUnavailable as exc:
            count("unavailable", [channel])
            return JSONResponse(
                {"detail": f"message not confirmed by Pub/Sub: {exc}", "id": message_id},
                status_code=503,
                headers=retry_after,
            )
        count("accepted", [channel])
        # Encoded here: a model returned would be validated and serialized again by FastAPI.
        return Response(
            orjson.dumps({"id": message_id, "channel": channel}),
            status_code=202,
            media_type="application/json",
        )

    @app.post(
        "/v1/messages",
        status_code=202,
        response_model=BatchAccepted,
        responses={
            **_ERRORS,
            503: {
                "model": BatchUnavailableBody,
                "description": "Pub/Sub unavailable: retry the same batch with these ids",
            },
        },
        summary="Publish a batch of messages (all or nothing)",
    )
    async def publish_batch(batch: Batch, principal: Principal = Depends(authenticate)) -> Any:
        if len(batch.messages) > settings.max_batch:
            raise HTTPException(413, f"at most {settings.max_batch} messages per batch")
        now = _now_ms()
        channels = [item.channel for item in batch.messages]
        admit(principal, channels)
        try:
            envelopes = [
                Envelope(
                    item.id or new_message_id(),
                    item.channel,
                    encode_data(item.data),
                    now,
                    principal.sub,
                )
                for item in batch.messages
            ]
        except HTTPException:
            count("rejected", channels)
            raise
        ids = [envelope.id for envelope in envelopes]
        try:
            await publisher.publish(envelopes)
        except BrokerBusy as exc:
            count("busy", channels)
            return JSONResponse(
                {"detail": f"batch not published: {exc}; retry later", "ids": ids},
                status_code=429,
                headers=retry_after,
            )
        except BrokerUnavailable as exc:
            count("unavailable", channels)
            return JSONResponse(
                {"detail": f"batch not confirmed by Pub/Sub: {exc}", "ids": ids},
                status_code=503,
                headers=retry_after,
            )
        count("accepted", channels)
        return Response(orjson.dumps({"ids": ids}), status_code=202, media_type="application/json")

    @app.post(
        "/v1/tokens",
        response_model=TokenOut,
        responses={
            401: _ERRORS[401],
            403: {"model": ErrorBody, "description": "needs a publisher key (API_KEYS)"},
            413: _ERRORS[413],
            422: _ERRORS[422],
        },
        summary="Mint a client token (publisher keys only)",
    )
    async def mint(request: TokenRequest, principal: Principal = Depends(authenticate)) -> TokenOut:
        if principal.kind != "key":
            raise HTTPException(403, "minting tokens needs a publisher key from API_KEYS")
        if not settings.token_secret:
            raise HTTPException(403, "minting tokens needs TOKEN_SECRET on the server")
        if request.ttl > settings.token_ttl_max_s:
            raise HTTPException(422, f"ttl over TOKEN_TTL_MAX_S ({settings.token_ttl_max_s})")
        token, expires_at = mint_token(
            settings.token_secret, request.sub, request.channels, request.publish, request.ttl
        )
        return TokenOut(token=token, expires_at=expires_at)

    @app.get("/healthz", response_model=Health, summary="200 while the process lives")
    async def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health, "description": "starting or draining"}},
        summary="200 once started, 503 while draining",
    )
    async def readyz() -> Any:
        if state.started and not state.draining:
            return Health(status="ready")
        return JSONResponse({"status": "draining" if state.draining else "starting"}, 503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with FastAPI's details, except a batch over MAX_BATCH, which is "too large"."""
        for error in exc.errors():
            if error.get("type") == "too_long" and tuple(error.get("loc", ())) == (
                "body",
                "messages",
            ):
                return JSONResponse(
                    {"detail": f"at most {settings.max_batch} messages per batch"}, 413
                )
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc)

    # Outermost of our middlewares: a well-formed single publish skips FastAPI's stack.
    app.add_middleware(
        PublishFastPath,
        publish=publish_one,
        authenticate=authenticate.principal,
        error_response=error_response,
        max_body_bytes=settings.max_request_bytes,
    )
    return app


def error_response(exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): malformed = 422
        status = 422
    return JSONResponse({"detail": exc.detail}, status, headers=exc.headers)
