"""Error answers shared by the routes and the OpenAPI schema."""

from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.api.models import ErrorBody

ERRORS: dict[int | str, dict[str, Any]] = {
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


def error_response(exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    if status == 400:  # FastAPI's "error parsing the body" (e.g. not UTF-8): malformed = 422
        status = 422
    return JSONResponse({"detail": exc.detail}, status, headers=exc.headers)
