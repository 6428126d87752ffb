"""Prometheus metrics of a socket pod: what an operator watches. Labels are bounded."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SocketMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.broker_up = Gauge(
            "pubsock_broker_up", "1 while the pod's subscription stream is healthy", registry=r
        )
        self.messages_received = Counter(
            "pubsock_messages_received_total",
            "Channel messages taken from the subscription",
            ["namespace"],
            registry=r,
        )
        self.duplicates_dropped = Counter(
            "pubsock_duplicates_dropped_total",
            "Redeliveries and publish retries dropped by id",
            registry=r,
        )
        self.invalid_messages = Counter(
            "pubsock_invalid_messages_total",
            "Messages on the topic that could not be read (dropped)",
            registry=r,
        )
        self.frames_sent = Counter(
            "pubsock_frames_sent_total", "Message frames written to connections", registry=r
        )
        self.slow_consumer_closes = Counter(
            "pubsock_slow_consumer_closes_total",
            "Connections closed with 1013 because their unsent data passed the bound",
            registry=r,
        )
        self.recoveries = Counter(
            "pubsock_recoveries_total", "Subscribes with `since`, by result", ["result"], registry=r
        )
        self.rewinds = Counter(
            "pubsock_rewinds_total",
            "Rewinds served (recent history on subscribe), by whether the window was complete",
            ["result"],
            registry=r,
        )
        self.rewound_messages = Counter(
            "pubsock_rewound_messages_total", "Messages sent by rewinds", registry=r
        )
        self.stream_breaks = Counter(
            "pubsock_stream_breaks_total",
            "Times the subscription stream ended and was reopened",
            registry=r,
        )
        self.broker_refusals = Counter(
            "pubsock_broker_refusals_total",
            "Times Pub/Sub refused the subscription for good (permission, not found, ...), by code",
            ["code"],
            registry=r,
        )
        self.deaf = Counter(
            "pubsock_deaf_total",
            "Times the pod stopped hearing its own presence announcements and resubscribed",
            registry=r,
        )
        self.unprovable_breaks = Counter(
            "pubsock_unprovable_breaks_total",
            "Stream breaks where messages may be missing (sessions closed with 1013)",
            registry=r,
        )
        self.presence_announcements = Counter(
            "pubsock_presence_announcements_total",
            "Presence announcements this pod published",
            registry=r,
        )
        self.connections_opened = Counter(
            "pubsock_connections_opened_total",
            "Sessions accepted (native and socket.io websockets, socket.io polling, SSE)",
            registry=r,
        )
        self.handshake_rejections = Counter(
            "pubsock_handshake_rejections_total",
            "Websocket handshakes and SSE streams refused, by reason",
            ["reason"],
            registry=r,
        )
        self.client_errors = Counter(
            "pubsock_client_errors_total",
            "Error frames sent to clients, by code",
            ["code"],
            registry=r,
        )
        self.closes = Counter(
            "pubsock_closes_total",
            "Connections closed by the server, by close code",
            ["code"],
            registry=r,
        )
        self.floods_closed = Counter(
            "pubsock_floods_closed_total",
            "Connections closed with 1013 for flooding after a `limit` error",
            registry=r,
        )
        self.delivery_lag = Histogram(
            "pubsock_delivery_lag_seconds",
            "Time from Pub/Sub publish to fan-out on this pod",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.connections = Gauge(
            "pubsock_connections",
            "Open sessions of every kind (native websocket, socket.io, SSE)",
            registry=r,
        )
        self.sse_sessions = Gauge(
            "pubsock_sse_sessions",
            "Open Server-Sent Events streams (in pubsock_connections)",
            registry=r,
        )
        self.subscriptions = Gauge(
            "pubsock_subscriptions", "Channel subscriptions of open connections", registry=r
        )
        self.history_messages = Gauge(
            "pubsock_history_messages", "Messages held in history", registry=r
        )
        self.history_channels = Gauge(
            "pubsock_history_channels", "Channels held in history", registry=r
        )
        self.ready = Gauge("pubsock_ready", "1 while /readyz answers 200", registry=r)
