"""The publish fast path answers exactly as the FastAPI route does, and only when it should.

Every request is sent twice: as is (the fast path may take it) and with an `Origin` header,
which always goes through FastAPI (CORS). Status and body must be the same (ids aside)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import Request

from services.api.app import create_app
from services.api.auth import Authenticator, Principal
from services.api.settings import ApiSettings
from services.core.broker import OutgoingMessage
from services.core.broker.memory import MemoryBroker
from tests.support import mint

SECRET = "fast-path-secret-0123456789abcdef012345"
KEY = "publisher-key-0123456789"


class RecordingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.published: list[OutgoingMessage] = []

    async def publish(self, message: OutgoingMessage) -> None:
        self.published.append(message)
        await super().publish(message)


@pytest.fixture
async def api(monkeypatch: pytest.MonkeyPatch):
    calls = {"fastapi": 0}
    through_fastapi = Authenticator.__call__

    async def counted(self: Authenticator, request: Request) -> Principal:
        calls["fastapi"] += 1
        return await through_fastapi(self, request)

    monkeypatch.setattr(Authenticator, "__call__", counted)
    broker = RecordingBroker()
    settings = ApiSettings(
        broker="memory", api_keys=KEY, token_secret=SECRET, max_message_bytes=100
    )
    app = create_app(settings, broker)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://api"
        ) as client:
            yield client, calls, broker


KEY_AUTH = {"Authorization": f"Bearer {KEY}"}
CASES: list[tuple[str, dict[str, str], bytes | None, Any]] = [
    ("room:1", KEY_AUTH, None, {"data": {"text": "hi"}}),
    ("room:1", KEY_AUTH, None, {"data": None, "id": "client-id_1"}),
    ("room:1", {}, None, {"data": 1}),  # 401
    ("room:1", {"Authorization": "Bearer nope"}, None, {"data": 1}),  # 401
    ("room:1", KEY_AUTH, None, {"data": "x" * 200}),  # 413: data over MAX_MESSAGE_BYTES
    ("room:1", KEY_AUTH, None, {"data": 1, "extra": 2}),  # 422
    ("room:1", KEY_AUTH, None, {"id": "x"}),  # 422: no data
    ("room:1", KEY_AUTH, None, {"data": 1, "id": "bad id"}),  # 422
    ("room:1", KEY_AUTH, None, {"data": 1, "id": "abc\n"}),  # 422
    ("room:1", KEY_AUTH, None, [1, 2]),  # 422
    ("room:1", KEY_AUTH, b"{not json", None),  # 422
    ("room:1", KEY_AUTH, b'{"data": 123456789012345678901234567890}', None),  # big int: 202
    ("bad%20channel", KEY_AUTH, None, {"data": 1}),  # 422
]


def _shape(response: httpx.Response) -> tuple[int, Any]:
    body = response.json()
    if isinstance(body, dict) and "id" in body and response.status_code == 202:
        body = {**body, "id": "<id>"}
    return response.status_code, body


@pytest.mark.parametrize(("channel", "headers", "raw", "body"), CASES)
async def test_same_answer_with_or_without_the_fast_path(api, channel, headers, raw, body):
    client, calls, _ = api
    url = f"/v1/channels/{channel}/messages"
    kwargs: dict[str, Any] = {"content": raw} if raw is not None else {"json": body}
    if raw is not None:
        headers = {**headers, "Content-Type": "application/json"}
    fast = await client.post(url, headers=headers, **kwargs)
    slow = await client.post(url, headers={**headers, "Origin": "http://app"}, **kwargs)
    assert _shape(fast) == _shape(slow)
    assert slow.headers.get("access-control-allow-origin")  # the slow one went through CORS
    assert fast.headers.get("www-authenticate") == slow.headers.get("www-authenticate")


async def test_the_fast_path_takes_plain_publishes_and_publishes_the_same(api):
    client, calls, broker = api
    token = mint("ann", channels=[], publish=["room:*"], secret=SECRET)
    fast = await client.post(
        "/v1/channels/room:7/messages",
        json={"data": {"n": 1}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert fast.status_code == 202 and calls["fastapi"] == 0  # FastAPI never saw it
    slow = await client.post(
        "/v1/channels/room:7/messages",
        json={"data": {"n": 1}},
        headers={"Authorization": f"Bearer {token}", "Origin": "http://app"},
    )
    assert slow.status_code == 202 and calls["fastapi"] == 1
    first, second = broker.published
    assert first.attributes == second.attributes and first.ordering_key == "room:7"
    assert b'"sub":"ann"' in first.data and b'"sub":"ann"' in second.data
    forbidden = await client.post(
        "/v1/channels/other:1/messages",
        json={"data": 1},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert forbidden.status_code == 403 and calls["fastapi"] == 1
