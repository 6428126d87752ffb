"""Socket service settings, from the environment."""

from __future__ import annotations

import socket as _socket

from pydantic import Field, model_validator

from services.core.settings import CommonSettings


class SocketSettings(CommonSettings):
    port: int = Field(8081, ge=0, le=65535)
    pod_name: str = Field(default_factory=_socket.gethostname)
    # History: per channel, the newest HISTORY_SIZE messages no older than HISTORY_AGE_S, for at
    # most HISTORY_MAX_CHANNELS channels (least recently active dropped first).
    history_size: int = Field(1000, ge=1)
    history_age_s: float = Field(3600.0, gt=0)
    history_max_channels: int = Field(10000, ge=1)
    # A `@<ms>` position is resolved as "everything published after <ms> minus this slack".
    position_slack_ms: int = Field(2000, ge=0)
    # How long a subscribe waits for a `since` id that this pod has not received yet.
    recovery_wait_s: float = Field(2.0, ge=0)
    # The most a rewind (recent history on subscribe) may ask: messages, and seconds (0 = the
    # history window, HISTORY_AGE_S; more than that is refused at start: nothing older is kept).
    rewind_max_count: int = Field(100, ge=1)
    rewind_max_s: float = Field(0.0, ge=0)
    send_buffer_max_bytes: int = Field(1024 * 1024, ge=1024)
    max_frame_bytes: int = Field(65536 + 4096, ge=256)
    max_subscriptions_per_connection: int = Field(100, ge=1)
    ping_interval_s: float = Field(20.0, gt=0)
    ping_timeout_s: float = Field(20.0, gt=0)
    close_timeout_s: float = Field(5.0, gt=0)
    http_header_timeout_s: float = Field(10.0, gt=0)
    drain_close_window_s: float = Field(10.0, ge=0)
    max_request_bytes: int = Field(1024 * 1024, ge=1)
    max_connection_age_s: float = Field(3300.0, gt=0)
    presence_interval_s: float = Field(1.0, gt=0)
    presence_snapshot_s: float = Field(10.0, gt=0)
    presence_ttl_s: float = Field(30.0, gt=0)
    presence_members_max: int = Field(100, ge=0)
    # The pod hears its own presence announcements; none for this long means it is deaf.
    deaf_after_s: float = Field(10.0, gt=0)
    # Topic message retention as created by `make run`/`make deploy` (0 = none): a new pod's
    # history is complete back to min(this, HISTORY_AGE_S) after its warm start.
    topic_retention_s: float = Field(0.0, ge=0)
    warm_start_timeout_s: float = Field(15.0, ge=0)
    # The warm start's backlog is over after this long without a message of it (docs/pubsub.md).
    warm_quiet_s: float = Field(1.0, gt=0)
    shutdown_cleanup_s: float = Field(10.0, gt=0)
    max_connections: int = Field(20000, ge=1)
    client_frames_per_s: float = Field(20.0, gt=0)
    client_frames_burst: int = Field(40, ge=1)
    demo_tokens: bool = False
    demo_token_ttl_s: int = Field(900, ge=10)
    web_dir: str = ""
    # Base URL of the publish API as the demo page should call it; empty = same origin (/v1/...).
    public_api_url: str = ""
    # Server-Sent Events (`GET /sse`, docs/protocol.md): a keep-alive comment on a stream that
    # wrote nothing for this long, well inside the load balancers' idle timeouts (HAProxy 650 s,
    # GFE, and the 60 s of many proxies on the way).
    sse_enabled: bool = True
    sse_keepalive_s: float = Field(15.0, gt=0)
    # A stream opens only if its reconnect could carry every channel's position (the id, in the
    # URL and in Last-Event-ID) within what the proxies in front accept: HAProxy 15 KiB by
    # default; the pod itself 16 KiB. Positions count at their longest: 128 characters, the
    # longest message id the api accepts; 26 (its own ULIDs) when publishers never set ids.
    sse_resume_head_max_bytes: int = Field(15 * 1024, ge=2048, le=16 * 1024)
    sse_position_max_chars: int = Field(128, ge=14, le=128)
    # socket.io v4 clients (Engine.IO 4 / Socket.IO 5) on the same port: see docs/socketio.md.
    socketio_enabled: bool = True
    socketio_path: str = Field("/socket.io/", pattern=r"^(/[A-Za-z0-9._~-]+)+/$")
    # The event a channel message arrives as: args (data, meta, offset).
    socketio_event: str = Field("message", min_length=1, max_length=100)
    socketio_ping_interval_s: float = Field(25.0, gt=0)
    socketio_ping_timeout_s: float = Field(20.0, gt=0)
    socketio_upgrade_timeout_s: float = Field(10.0, gt=0)
    # A socket.io client that sends no CONNECT packet within this is dropped.
    socketio_connect_timeout_s: float = Field(45.0, gt=0)
    # Connection state recovery (socket.recovered): a signed session id and offsets on events.
    socketio_recovery: bool = True
    # HMAC key of the session ids (pid); empty = TOKEN_SECRET. The same on every pod.
    socketio_secret: str = ""

    @model_validator(mode="after")
    def _socketio_event_is_usable(self) -> SocketSettings:
        reserved = {"connect", "connect_error", "disconnect", "disconnecting"}
        if self.socketio_event in reserved or self.socketio_event.startswith("pubsock:"):
            raise ValueError("SOCKETIO_EVENT must not be a reserved socket.io or pubsock: event")
        if self.socketio_path in ("/ws/", "/v1/", "/sse/"):
            raise ValueError("SOCKETIO_PATH must not shadow /ws, /sse or /v1")
        return self

    @model_validator(mode="after")
    def _rewind_within_history(self) -> SocketSettings:
        if self.rewind_max_s == 0:
            self.rewind_max_s = self.history_age_s
        elif self.rewind_max_s > self.history_age_s:
            raise ValueError("REWIND_MAX_S must not exceed HISTORY_AGE_S (nothing older is kept)")
        return self

    @model_validator(mode="after")
    def _demo_needs_a_secret(self) -> SocketSettings:
        if self.demo_tokens and not self.token_secret:
            raise ValueError("DEMO_TOKENS=1 needs TOKEN_SECRET to sign the demo tokens")
        return self
