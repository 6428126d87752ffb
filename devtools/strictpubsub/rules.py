"""What the real Pub/Sub refuses and the emulator accepts: each rule a pure function.

Each returns None for a request the real service takes, or (code, message) as it would answer.
Limits from the Pub/Sub API reference and its quotas page ("Resource limits"), as of 2026-12.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

PUBLISH_MAX_MESSAGES = 1000
PUBLISH_MAX_BYTES = 10 * 1000 * 1000
MESSAGE_MAX_BYTES = 10 * 1000 * 1000
ORDERING_KEY_MAX_BYTES = 1024
ATTRIBUTES_MAX = 100
ATTRIBUTE_KEY_MAX_BYTES = 256
ATTRIBUTE_VALUE_MAX_BYTES = 1024
ACK_REQUEST_MAX_BYTES = 512 * 1024

Refusal = tuple[grpc.StatusCode, str] | None

MIXED_KEYS = (
    "In a single publish request, all messages must have no ordering key or they must all have "
    "the same ordering key."
)


def check_publish(request: Any) -> Refusal:
    """A PublishRequest (protobuf): one ordering key, counts and sizes within the limits."""
    messages = request.messages
    if not messages:
        return grpc.StatusCode.INVALID_ARGUMENT, "The request contains no messages."
    if len(messages) > PUBLISH_MAX_MESSAGES:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"The value for message_count is too large. You passed {len(messages)} in the "
            f"request, but the maximum value is {PUBLISH_MAX_MESSAGES}.",
        )
    size = request.ByteSize()
    if size > PUBLISH_MAX_BYTES:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"The value for request_size is too large. You passed {size} in the request, but the "
            f"maximum value is {PUBLISH_MAX_BYTES}.",
        )
    if len({message.ordering_key for message in messages}) > 1:
        return grpc.StatusCode.FAILED_PRECONDITION, MIXED_KEYS
    for message in messages:
        refusal = check_message(message)
        if refusal is not None:
            return refusal
    return None


def check_message(message: Any) -> Refusal:
    if len(message.data) > MESSAGE_MAX_BYTES:
        return grpc.StatusCode.INVALID_ARGUMENT, "Message data is larger than 10 MB."
    if len(message.ordering_key.encode()) > ORDERING_KEY_MAX_BYTES:
        return grpc.StatusCode.INVALID_ARGUMENT, "Ordering key is longer than 1024 bytes."
    if not message.data and not message.attributes:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            "A message must have data or at least one attribute.",
        )
    if len(message.attributes) > ATTRIBUTES_MAX:
        return grpc.StatusCode.INVALID_ARGUMENT, "A message may have at most 100 attributes."
    for key, value in message.attributes.items():
        if len(key.encode()) > ATTRIBUTE_KEY_MAX_BYTES:
            return grpc.StatusCode.INVALID_ARGUMENT, "An attribute key is longer than 256 bytes."
        if len(value.encode()) > ATTRIBUTE_VALUE_MAX_BYTES:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                "An attribute value is longer than 1024 bytes.",
            )
        if key.startswith("goog"):
            return grpc.StatusCode.INVALID_ARGUMENT, "Attribute keys may not start with 'goog'."
    return None


def check_ack_ids(*groups: Iterable[str]) -> Refusal:
    """Acknowledge, ModifyAckDeadline, or a StreamingPull request's ack ids: under 512 KB."""
    size = sum(len(ack_id.encode()) + 4 for group in groups for ack_id in group)
    if size > ACK_REQUEST_MAX_BYTES:
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Request payload size exceeds the limit: {ACK_REQUEST_MAX_BYTES} bytes "
            f"(ack ids take {size}).",
        )
    return None
