"""Steady publishing over HTTP: several publishers at once, each sequential on its channels (it
waits for one request's answer before its next), single and batch. A 503 or a cut connection
means "outcome unknown": the same request is sent again with the same ids, as the contract says,
until a 202 or the publisher's retry deadline. Every attempt and its answer is a line of the
publish log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

RETRY_DEADLINE_S = 60.0  # a message still without a 202 by then stays "unknown"


@dataclass
class PublisherPlan:
    name: str
    channels: list[str]
    rate_per_s: float  # messages a second, on average
    batch_share: float = 0.3  # share of requests that are batches
    seed: int = 0


def _now_ms() -> float:
    return time.time() * 1000


class Publisher:
    def __init__(self, plan: PublisherPlan, base_url: str, api_key: str, log: IO[str]) -> None:
        self.plan = plan
        self.base_url = base_url
        self.api_key = api_key
        self.log = log
        self.accepted = 0  # messages; the log has every attempt and its answer
        self._random = random.Random(plan.seed)
        self._seq: dict[str, int] = dict.fromkeys(plan.channels, 0)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=httpx.Timeout(20.0, connect=5.0),
        ) as http:
            while not self._stopping.is_set():
                items = self._next_items()
                await self._send(http, items)
                # The pace of the load (exponential gaps), not a wait for a condition.
                gap = self._random.expovariate(self.plan.rate_per_s / self._mean_size())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), gap)
            # A last message on each of its channels, once the clients are calm (no more joins):
            # every client in a channel must get every publisher's last one.
            for channel in self.plan.channels:
                await self._send(http, [self._item(channel)])

    def _mean_size(self) -> float:
        return 1 + self.plan.batch_share * 2.5

    def _next_items(self) -> list[dict[str, Any]]:
        count = 1
        if self._random.random() < self.plan.batch_share:
            count = self._random.randint(2, 5)
        return [self._item(self._random.choice(self.plan.channels)) for _ in range(count)]

    def _item(self, channel: str) -> dict[str, Any]:
        seq = self._seq[channel]
        self._seq[channel] = seq + 1
        return {
            "channel": channel,
            "id": f"{self.plan.name}-{uuid.uuid4().hex[:16]}",
            "seq": seq,
            "data": {"p": self.plan.name, "n": seq},
        }

    async def _send(self, http: httpx.AsyncClient, items: list[dict[str, Any]]) -> None:
        """One request, sent again with the same ids until a 202 (or the retry deadline)."""
        batch = len(items) > 1
        if batch:
            path = "/v1/messages"
            body: dict[str, Any] = {
                "messages": [
                    {"channel": i["channel"], "id": i["id"], "data": i["data"]} for i in items
                ]
            }
        else:
            path = f"/v1/channels/{items[0]['channel']}/messages"
            body = {"id": items[0]["id"], "data": items[0]["data"]}
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            t0 = _now_ms()
            status: int | str
            retry_after = 0.5
            try:
                response = await http.post(path, json=body)
                status = response.status_code
                answer = response.text[:300]
                if status in (429, 503):
                    retry_after = float(response.headers.get("Retry-After", "1") or 1)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
                answer = str(exc)[:200]
            t1 = _now_ms()
            self._write(
                {
                    "pub": self.plan.name,
                    "attempt": attempt,
                    "kind": "batch" if batch else "single",
                    "items": [{"ch": i["channel"], "id": i["id"], "seq": i["seq"]} for i in items],
                    "t0": t0,
                    "t1": t1,
                    "status": status,
                    "answer": answer if status != 202 else None,
                }
            )
            if status == 202:
                self.accepted += len(items)
                return
            if isinstance(status, int) and status not in (429, 502, 503, 504):
                # Not a transient answer: a bug in the soak or the api. It stays in the log.
                return
            if time.monotonic() - started > RETRY_DEADLINE_S:
                return
            # Retry-After, jittered, capped: the contract's retry of an unknown outcome.
            await asyncio.sleep(min(retry_after, 2.0) * (0.5 + self._random.random()))

    def _write(self, record: dict[str, Any]) -> None:
        self.log.write(json.dumps(record, separators=(",", ":")) + "\n")


def plans(channels: list[str], count: int, total_rate: float, seed: int) -> list[PublisherPlan]:
    """`count` publishers on overlapping channel sets: every channel has one of its own (dealt
    round), and each publisher two more drawn from the seed (channels with several)."""
    rng = random.Random(seed)
    result = []
    for i in range(count):
        own = {c for j, c in enumerate(channels) if j % count == i}
        own.update(rng.sample(channels, k=min(len(channels), 2)))
        result.append(
            PublisherPlan(
                name=f"p{i + 1}",
                channels=sorted(own),
                rate_per_s=total_rate / count,
                seed=rng.randrange(2**31),
            )
        )
    return result


def load_log(path: Path) -> list[dict[str, Any]]:
    with path.open() as lines:
        return [json.loads(line) for line in lines if line.strip()]
