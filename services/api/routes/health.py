"""/healthz, /readyz and /metrics: what the load balancer and Prometheus ask."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from services.api.models import Health


class Lifecycle:
    """Started once the publisher is; draining from SIGTERM on (readiness turns 503)."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False


def health_routes(lifecycle: Lifecycle, registry: CollectorRegistry) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", response_model=Health, summary="200 while the process lives")
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health, "description": "starting or draining"}},
        summary="200 once started, 503 while draining",
    )
    async def readyz() -> Any:
        if lifecycle.started and not lifecycle.draining:
            return Health(status="ready")
        return JSONResponse({"status": "draining" if lifecycle.draining else "starting"}, 503)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
