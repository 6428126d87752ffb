"""Prometheus metrics of the publish API."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.broker_up = Gauge(
            "pubsock_broker_up", "1 while Pub/Sub answers and confirms publishes", registry=r
        )
        self.publishes = Counter(
            "pubsock_publishes_total",
            "Messages by outcome: accepted (202), unavailable (503), rejected (4xx)",
            ["result", "namespace"],
            registry=r,
        )
        self.publish_latency = Histogram(
            "pubsock_publish_seconds",
            "Time from request to Pub/Sub confirmation, per request",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.rate_limited = Counter(
            "pubsock_rate_limited_total", "Publish requests refused with 429", registry=r
        )
        self.in_flight = Gauge(
            "pubsock_publishes_in_flight", "Publish requests waiting for Pub/Sub", registry=r
        )
