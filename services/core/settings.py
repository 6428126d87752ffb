"""Settings shared by both services, read from the environment (one object per service).

Each service subclasses `CommonSettings`; bad values fail loudly at startup, never mid-request.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

EMULATOR_PROJECT = "local-project"


def split_csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    broker: Literal["pubsub", "memory"] = "pubsub"
    google_cloud_project: str = ""
    pubsub_topic: str = "pubsock-messages"
    pubsub_emulator_host: str = ""
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    log_level: str = "INFO"
    allowed_origins: str = "*"
    metrics_namespaces: str = ""
    max_message_bytes: int = Field(65536, ge=1)
    http_keepalive_s: float = Field(620.0, gt=0)
    drain_delay_s: float = Field(0.0, ge=0)
    publish_timeout_s: float = Field(10.0, gt=0)
    publish_batch_latency_s: float = Field(0.002, ge=0)
    # Pub/Sub's endpoint, e.g. europe-west1-pubsub.googleapis.com:443 (regional: ordering holds
    # for publishers in one region). Empty: the global pubsub.googleapis.com.
    pubsub_api_endpoint: str = ""
    # One channel's publishes waiting for Pub/Sub (a key carries at most 1 MB/s): beyond, 429.
    publish_key_max_messages: int = Field(10_000, ge=1)
    publish_key_max_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    api_keys: str = ""
    token_secret: str = ""
    token_ttl_max_s: int = Field(86400, ge=1)

    @model_validator(mode="after")
    def _project_default(self) -> CommonSettings:
        if not self.google_cloud_project and (
            self.pubsub_emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
        ):
            self.google_cloud_project = EMULATOR_PROJECT
        if self.broker == "pubsub" and not self.google_cloud_project:
            raise ValueError("GOOGLE_CLOUD_PROJECT is required with BROKER=pubsub")
        return self

    @property
    def keys(self) -> list[str]:
        return split_csv(self.api_keys)

    @property
    def origins(self) -> list[str]:
        return split_csv(self.allowed_origins)

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset(split_csv(self.metrics_namespaces))

    @property
    def topic_path(self) -> str:
        return f"projects/{self.google_cloud_project}/topics/{self.pubsub_topic}"


def origin_allowed(origin: str | None, allowed: list[str]) -> bool:
    """No Origin header (a backend, not a browser) is allowed; `*` allows any."""
    return origin is None or "*" in allowed or origin in allowed
