"""pubsock client for Python backends, tests and benchmarks (websockets + httpx).

The same reconnect and recovery rules as the browser client, web/pubsock.js; see docs/client.md.
"""

from services.client.client import (
    CLOSE_ABNORMAL,
    CLOSE_NORMAL,
    CLOSE_RESTART,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_AGAIN_LATER,
    EVENTS,
    PublishError,
    PubsockClient,
    PubsockError,
    decode_jwt_payload,
    full_jitter,
    token_expiry,
)

__all__ = [
    "CLOSE_ABNORMAL",
    "CLOSE_NORMAL",
    "CLOSE_RESTART",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TRY_AGAIN_LATER",
    "EVENTS",
    "PublishError",
    "PubsockClient",
    "PubsockError",
    "decode_jwt_payload",
    "full_jitter",
    "token_expiry",
]
