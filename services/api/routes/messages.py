"""POST /v1/channels/{channel}/messages and POST /v1/messages.

No `from __future__ import annotations`: the batch model is built from the settings (so the
OpenAPI schema states the configured limit) and FastAPI must see the annotations.
"""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import Field

from services.api.auth import Authenticator, Principal
from services.api.models import (
    Accepted,
    BatchAccepted,
    BatchIn,
    BatchItem,
    BatchUnavailableBody,
    MessageIn,
    UnavailableBody,
)
from services.api.publishing import Publishing
from services.api.routes.errors import ERRORS
from services.core.channels import CHANNEL_PATTERN

ChannelPath = Annotated[
    str, Path(pattern=CHANNEL_PATTERN, max_length=128, description="Channel name, e.g. room:42")
]


def message_routes(
    max_batch: int, publishing: Publishing, authenticate: Authenticator
) -> APIRouter:
    router = APIRouter()

    class Batch(BatchIn):
        messages: list[BatchItem] = Field(min_length=1, max_length=max_batch)

    @router.post(
        "/v1/channels/{channel}/messages",
        status_code=202,
        response_model=Accepted,
        responses={
            **ERRORS,
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
        return await publishing.publish_one(channel, message.data, message.id, principal)

    @router.post(
        "/v1/messages",
        status_code=202,
        response_model=BatchAccepted,
        responses={
            **ERRORS,
            503: {
                "model": BatchUnavailableBody,
                "description": "Pub/Sub unavailable: retry the same batch with these ids",
            },
        },
        summary="Publish a batch of messages (all or nothing)",
    )
    async def publish_batch(batch: Batch, principal: Principal = Depends(authenticate)) -> Any:
        if len(batch.messages) > max_batch:
            raise HTTPException(413, f"at most {max_batch} messages per batch")
        return await publishing.publish_batch(
            [(item.channel, item.data, item.id) for item in batch.messages], principal
        )

    return router
