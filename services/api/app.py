"""The publish API as a FastAPI app: `create_app(settings, broker)` composes it.

The app owns the parts' lifecycle (the publisher starts and drains with it) and hands each route
module only what it needs: routes/messages.py (publishing, through publishing.py, shared with
the fast path), routes/tokens.py, routes/health.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.auth import Authenticator
from services.api.bodylimit import BodyLimitMiddleware
from services.api.fastpath import PublishFastPath
from services.api.metrics import ApiMetrics
from services.api.publisher import Publisher
from services.api.publishing import Publishing
from services.api.routes.errors import error_response
from services.api.routes.health import Lifecycle, health_routes
from services.api.routes.messages import message_routes
from services.api.routes.tokens import token_routes
from services.api.settings import ApiSettings
from services.core.broker import Broker, create_broker

log = logging.getLogger(__name__)


def create_app(settings: ApiSettings, broker: Broker | None = None) -> FastAPI:
    metrics = ApiMetrics()
    publisher = Publisher(
        broker or create_broker(settings), metrics, settings.broker_probe_interval_s
    )
    publishing = Publishing(settings, publisher, metrics)
    lifecycle = Lifecycle()
    authenticate = Authenticator(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        authenticate.warn_if_open()
        await publisher.start()
        lifecycle.started = True
        if settings.origins == ["*"]:
            log.info("CORS and origins: any origin allowed (ALLOWED_ORIGINS=*)")
        yield
        lifecycle.draining = True
        await publisher.close()

    app = FastAPI(
        title="pubsock publish API",
        version="1",
        summary="Publish messages to channels; every socket pod delivers them to its subscribers.",
        lifespan=lifespan,
    )
    app.state.pubsock = lifecycle
    app.include_router(message_routes(settings.max_batch, publishing, authenticate))
    app.include_router(token_routes(settings.token_secret, settings.token_ttl_max_s, authenticate))
    app.include_router(health_routes(lifecycle, metrics.registry))

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

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        """422 with FastAPI's details, except a batch over MAX_BATCH, which is "too large"."""
        assert isinstance(exc, RequestValidationError)
        for error in exc.errors():
            if error.get("type") == "too_long" and tuple(error.get("loc", ())) == (
                "body",
                "messages",
            ):
                return JSONResponse(
                    {"detail": f"at most {settings.max_batch} messages per batch"}, 413
                )
        return await request_validation_exception_handler(request, exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)

    # Outermost of our middlewares: a well-formed single publish skips FastAPI's stack.
    app.add_middleware(
        PublishFastPath,
        publish=publishing.publish_one,
        authenticate=authenticate.principal,
        error_response=error_response,
        max_body_bytes=settings.max_request_bytes,
    )
    return app
