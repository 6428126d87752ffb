"""The work behind the publish routes, shared by the FastAPI routes and the fast path
(fastpath.py): admission (permission, rate), validation, publishing, answers and counts."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import HTTPException
from fastapi.responses import JSONResponse, Response

from services.api.auth import Principal
from services.api.metrics import ApiMetrics
from services.api.publisher import Publisher
from services.api.settings import ApiSettings
from services.core.broker import BrokerBusy, BrokerUnavailable
from services.core.channels import NamespaceLabeler
from services.core.envelope import Envelope
from services.core.ids import new_message_id
from services.core.messages import InvalidData, encode_data
from services.core.ratelimit import KeyedLimiter

_STATUS = {"not_json": 422, "too_large": 413}


def _now_ms() -> int:
    return int(time.time() * 1000)


class Publishing:
    def __init__(self, settings: ApiSettings, publisher: Publisher, metrics: ApiMetrics) -> None:
        self._max_message_bytes = settings.max_message_bytes
        self._publisher = publisher
        self._metrics = metrics
        self._labeler = NamespaceLabeler(settings.namespaces)
        self._limiter = KeyedLimiter(settings.publish_rate_per_s, settings.publish_burst)
        self._retry_after = {"Retry-After": str(settings.retry_after_s)}

    def _count(self, result: str, channels: Sequence[str]) -> None:
        for channel in channels:
            self._metrics.publishes.labels(result, self._labeler(channel)).inc()

    def _admit(self, principal: Principal, channels: Sequence[str]) -> None:
        """403 for a channel the credential may not publish to; 429 over the rate limit."""
        for channel in channels:
            if not principal.may_publish(channel):
                self._count("forbidden", channels)
                raise HTTPException(403, f"this credential may not publish to {channel}")
        wait_s = self._limiter.take(principal.rate_key, len(channels))
        if wait_s > 0:
            self._count("rate_limited", channels)
            self._metrics.rate_limited.inc()
            raise HTTPException(
                429, "publish rate limit reached", headers={"Retry-After": str(int(wait_s) + 1)}
            )

    def _envelopes(
        self, items: Sequence[tuple[str, Any, str | None]], principal: Principal
    ) -> list[Envelope]:
        """One envelope per (channel, data, id); 413/422 for data that cannot be published."""
        now = _now_ms()
        try:
            return [
                Envelope(
                    message_id or new_message_id(),
                    channel,
                    orjson.Fragment(encode_data(data, self._max_message_bytes)),
                    now,
                    principal.sub,
                )
                for channel, data, message_id in items
            ]
        except InvalidData as exc:
            self._count("rejected", [channel for channel, _, _ in items])
            raise HTTPException(_STATUS[exc.reason], exc.detail) from None

    async def _publish(self, envelopes: list[Envelope], what: str, ids: Any) -> Response | None:
        """None once Pub/Sub confirmed every envelope; else the 429 or 503 answer."""
        channels = [envelope.channel for envelope in envelopes]
        key = "id" if isinstance(ids, str) else "ids"
        try:
            await self._publisher.publish(envelopes)
        except BrokerBusy as exc:
            self._count("busy", channels)
            return JSONResponse(
                {"detail": f"{what} not published: {exc}; retry later", key: ids},
                status_code=429,
                headers=self._retry_after,
            )
        except BrokerUnavailable as exc:
            self._count("unavailable", channels)
            return JSONResponse(
                {"detail": f"{what} not confirmed by Pub/Sub: {exc}", key: ids},
                status_code=503,
                headers=self._retry_after,
            )
        self._count("accepted", channels)
        return None

    async def publish_one(
        self, channel: str, data: Any, message_id: str | None, principal: Principal
    ) -> Response:
        self._admit(principal, [channel])
        (envelope,) = self._envelopes([(channel, data, message_id)], principal)
        refused = await self._publish([envelope], "message", envelope.id)
        if refused is not None:
            return refused
        # Encoded here: a model returned would be validated and serialized again by FastAPI.
        return Response(
            orjson.dumps({"id": envelope.id, "channel": channel}),
            status_code=202,
            media_type="application/json",
        )

    async def publish_batch(
        self, items: Sequence[tuple[str, Any, str | None]], principal: Principal
    ) -> Response:
        """All or nothing: every message is admitted and published, or none is answered 202."""
        self._admit(principal, [channel for channel, _, _ in items])
        envelopes = self._envelopes(items, principal)
        ids = [envelope.id for envelope in envelopes]
        refused = await self._publish(envelopes, "batch", ids)
        if refused is not None:
            return refused
        return Response(orjson.dumps({"ids": ids}), status_code=202, media_type="application/json")
