"""Request and response bodies of the publish API (and so its OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from services.core.channels import CHANNEL_PATTERN
from services.core.ids import ID_PATTERN


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: JsonValue = Field(description="Any JSON value; delivered to subscribers as is.")
    id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description=(
            "Optional idempotency key, unique within the channel. A time-ordered one (ULID, "
            "UUIDv7) lets a pod that has not received it yet wait for it on a resume."
        ),
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


Pattern = Annotated[str, Field(pattern=r"^(?:[A-Za-z0-9_.:@-]{1,128}|[A-Za-z0-9_.:@-]{0,127}\*)$")]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sub: str = Field(min_length=1, max_length=256, description="The subject (user id).")
    channels: list[Pattern] = Field(
        max_length=100, description="Channels it may subscribe to; `room:*` matches a prefix."
    )
    publish: list[Pattern] = Field(default_factory=list, max_length=100)
    ttl: int = Field(ge=1, description="Seconds until it expires, at most TOKEN_TTL_MAX_S.")


class TokenOut(BaseModel):
    token: str
    expires_at: int


class Health(BaseModel):
    status: str
