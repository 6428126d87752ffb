"""Where a pod is in its life: starting, ready, draining. Read by readiness and admission."""

from __future__ import annotations


class Lifecycle:
    __slots__ = ("draining", "started")

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        """Started (subscription open, warm start done) and not draining. A broker outage does
        not count: every pod shares it, and emptying the load balancer would only turn 503s
        into 502s (the outage shows in `pubsock_broker_up`)."""
        return self.started and not self.draining
