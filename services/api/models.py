"""Request and response bodies of the publish API (and so its OpenAPI schema)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from services.core.channels import CHANNEL_PATTERN
from services.core.ids import ID_PATTERN


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: JsonValue = Field(description="Any JSON value; delivered to subscribers as is.")
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Optional idempotency key, unique within the channel (a UUID is right).",
    )


class BatchItem(MessageIn):
    channel: str = Field(pattern=CHANNEL_PATTERN, max_length=128)


class BatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    messages: list[BatchItem] = Field(min_length=1)


class Accepted(BaseModel):
    id: str
    channel: str


class BatchAccepted(BaseModel):
    ids: list[str]


class ErrorBody(BaseModel):
    detail: str | list[dict[str, object]]


class UnavailableBody(BaseModel):
    detail: str
    id: str


class BatchUnavailableBody(BaseModel):
    detail: str
    ids: list[str]


class Health(BaseModel):
    status: str
