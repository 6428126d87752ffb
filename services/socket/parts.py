"""What every session of a kind shares on a pod, whatever the kind (native websocket, SSE):
the narrow dependencies the pod (the composition root) hands them, never the pod itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from services.socket.access import Access
from services.socket.hub import Hub
from services.socket.metrics import SocketMetrics
from services.socket.presence import Presence
from services.socket.sessions import SessionRegistry
from services.socket.settings import SocketSettings


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """The settings sessions read: a slice of SocketSettings."""

    pod_name: str
    max_connection_age_s: float
    send_buffer_max_bytes: int
    client_frames_per_s: float
    client_frames_burst: int
    max_subscriptions_per_connection: int
    presence_members_max: int
    close_timeout_s: float
    ping_interval_s: float
    ping_timeout_s: float
    sse_keepalive_s: float
    sse_resume_head_max_bytes: int
    sse_position_max_chars: int
    rewind_max_count: int
    rewind_max_s: float

    @classmethod
    def from_settings(cls, settings: SocketSettings) -> SessionLimits:
        return cls(**{name: getattr(settings, name) for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class SessionParts:
    """What every session of a pod shares (built by the pod)."""

    hub: Hub
    presence: Presence
    access: Access
    registry: SessionRegistry
    metrics: SocketMetrics
    limits: SessionLimits
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
