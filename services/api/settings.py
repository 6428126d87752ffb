"""API settings, from the environment."""

from __future__ import annotations

from pydantic import Field

from services.core.settings import CommonSettings


class ApiSettings(CommonSettings):
    port: int = Field(8080, ge=0, le=65535)
    max_request_bytes: int = Field(1024 * 1024, ge=1)
    max_batch: int = Field(1000, ge=1)
    broker_probe_interval_s: float = Field(5.0, gt=0)
    retry_after_s: int = Field(2, ge=1)
    # Per credential (a publisher key, a token's `sub`, or the client address when open).
    publish_rate_per_s: float = Field(500.0, gt=0)
    publish_burst: int = Field(1000, ge=1)
