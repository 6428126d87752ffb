"""A process holding many Python clients (services.client.PubsockClient), each recording every
event to a JSON-lines file: `python -m devtools.soak.pyclients PLAN.json`.

The plan (written by devtools.soak.clients) names the url, the token, the clients, their first
channels and how often each changes its channels. Commands on stdin, one JSON object a line:
`{"cmd": "finish", "last": {channel: id}, "deadline_s": N}`: stop changing channels, wait (up to
the deadline) until every client has the last accepted id of each of its channels, write an `end`
record per client, print `{"ev": "done"}` and exit.

Records (one a line, `t` = wall-clock ms): join, leave, subd (a `subscribed` frame: pos, rec,
since), msg (handed to the application: id, ts), wiredup (an id the client dropped as already
delivered: the server sent it twice), state (open/closed, code), pod, end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from devtools.waiting import WaitTimeout, eventually
from services.client import PubsockClient

FLUSH_EVERY_S = 0.5


def now_ms() -> float:
    return time.time() * 1000


class Recorder:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, client: str, event: str, **fields: Any) -> None:
        record = {"c": client, "e": event, "t": round(now_ms(), 1), **fields}
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")


class SoakClient:
    def __init__(
        self, spec: dict[str, Any], plan: dict[str, Any], record: Recorder, rng: random.Random
    ) -> None:
        self.name: str = spec["name"]
        self.wanted: list[str] = list(spec["channels"])
        self.churn_s: float | None = spec.get("churn_s")
        self.pool: list[str] = plan["pool"]
        self.record = record
        self.rng = rng
        self.delivered: dict[str, set[str]] = {}
        self.wire: dict[str, set[Any]] = {}  # ids per channel on the current connection
        self.changed = asyncio.Event()
        self._since: dict[str, str | None] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.joined_ms: dict[str, float] = {}
        self.calm_ms = float("inf")
        self.client = PubsockClient(
            plan["url"],
            token=plan["token"],
            warmup=True,
            backoff_base_s=0.5,
            backoff_max_s=10.0,
            ping_interval_s=10.0,
            ping_timeout_s=10.0,
        )
        self.client.on("state", self._on_state)
        self.client.on("pod", lambda d: self.record(self.name, "pod", pod=d.get("pod")))
        self.client.on("gap", self._remember_since)
        self.client.on("recovered", self._remember_since)
        self.client.on("subscribed", self._on_subscribed)
        original = self.client._on_message

        async def on_message(frame: dict[str, Any]) -> None:
            # The contract: a connection gets each message at most once.
            channel = str(frame.get("channel"))
            sub = self.client._subs.get(channel)
            if sub is not None and sub.active:
                seen = self.wire.setdefault(channel, set())
                if frame.get("id") in seen:
                    self.record(self.name, "wiredup", ch=channel, id=frame.get("id"))
                seen.add(frame.get("id"))
            await original(frame)

        self.client._on_message = on_message  # type: ignore[method-assign]

    def _on_state(self, detail: dict[str, Any]) -> None:
        if detail.get("state") == "open":
            self.wire = {}
        self.record(self.name, "state", state=detail.get("state"), code=detail.get("code"))

    def _remember_since(self, detail: dict[str, Any]) -> None:
        self._since[str(detail.get("channel"))] = detail.get("since")

    def _on_subscribed(self, frame: dict[str, Any]) -> None:
        channel = str(frame.get("channel"))
        rec = frame.get("recovered")
        self.record(
            self.name,
            "subd",
            ch=channel,
            pos=frame.get("position"),
            rec=rec,
            since=self._since.pop(channel, None) if rec is not None else None,
        )

    def _handler(self, channel: str) -> Any:
        seen = self.delivered.setdefault(channel, set())

        def handle(frame: dict[str, Any]) -> None:
            message_id = frame.get("id")
            self.record(self.name, "msg", ch=channel, id=message_id, ts=frame.get("ts"))
            if isinstance(message_id, str):
                seen.add(message_id)
                self.changed.set()

        return handle

    async def join(self, channel: str) -> None:
        self.joined_ms[channel] = now_ms()
        self.record(self.name, "join", ch=channel)
        self.delivered[channel] = set()
        with contextlib.suppress(Exception):  # not answered yet: sent again on reconnect
            await self.client.subscribe(channel, self._handler(channel), timeout_s=60)

    async def leave(self, channel: str) -> None:
        self.record(self.name, "leave", ch=channel)
        self.delivered.pop(channel, None)
        await self.client.unsubscribe(channel)

    async def run(self, finishing: asyncio.Event) -> None:
        for channel in self.wanted:
            self.record(self.name, "join", ch=channel)
            self.delivered[channel] = set()
            # Registered before connect(): the first connection subscribes to all of them.
            self._spawn(self.client.subscribe(channel, self._handler(channel), timeout_s=120))
        with contextlib.suppress(Exception):
            await self.client.connect(timeout_s=120)
        while self.churn_s and not finishing.is_set():
            try:
                await asyncio.wait_for(finishing.wait(), self.rng.expovariate(1 / self.churn_s))
                return
            except TimeoutError:
                pass
            joined = list(self.delivered)
            others = [c for c in self.pool if c not in self.delivered]
            if len(joined) > 1 and (not others or self.rng.random() < 0.5):
                self._spawn(self.leave(self.rng.choice(joined)))
            elif others:
                self._spawn(self.join(self.rng.choice(others)))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def has(self, last: dict[str, list[str]]) -> bool:
        """Every last id of each channel joined before the calm (a later join may stand past
        them: the checker judges it, the finish does not wait for it)."""
        return all(
            m in seen
            for c, seen in self.delivered.items()
            if self.joined_ms.get(c, 0) <= self.calm_ms
            for m in last.get(c, ())
        )


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    with Path(plan["out"]).open("w", buffering=1 << 16) as out:
        asyncio.run(run(plan, out))


async def run(plan: dict[str, Any], out: IO[str]) -> None:
    record = Recorder(out)
    rng = random.Random(plan["seed"])
    clients = [
        SoakClient(spec, plan, record, random.Random(rng.random())) for spec in plan["clients"]
    ]
    finishing = asyncio.Event()
    calm_ms = float("inf")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def flush() -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)  # a period, not a condition
            out.flush()

    flusher = asyncio.ensure_future(flush())
    runners: list[asyncio.Future[None]] = []

    async def ramp() -> None:
        for client in clients:
            runners.append(asyncio.ensure_future(client.run(finishing)))
            await asyncio.sleep(plan.get("ramp_s", 0) / max(1, len(clients)))  # spread the start

    ramping = asyncio.ensure_future(ramp())
    print(json.dumps({"ev": "started"}), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    command: dict[str, Any] = {}
    stopping = asyncio.ensure_future(stop.wait())
    reading = asyncio.ensure_future(reader.readline())
    while True:
        done, _ = await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading not in done or not reading.result():
            break
        command = json.loads(reading.result())
        if command.get("cmd") != "calm":
            break
        # No more channel changes: what was joined until now is waited for at the finish.
        finishing.set()
        calm_ms = now_ms()
        print(json.dumps({"ev": "calm"}), flush=True)
        reading = asyncio.ensure_future(reader.readline())
    drained = command.get("cmd") == "finish"
    finishing.set()
    if drained:
        for client in clients:
            client.calm_ms = calm_ms
        last: dict[str, list[str]] = command.get("last", {})
        deadline = loop.time() + float(command.get("deadline_s", 60))
        for client in clients:

            def caught_up(client: SoakClient = client) -> bool:
                return client.has(last) or stop.is_set()

            # Short of the deadline the record says what is missing; the checker judges it.
            with contextlib.suppress(WaitTimeout):
                await eventually(
                    caught_up,
                    max(0.0, deadline - loop.time()),
                    f"{client.name} to have the last messages",
                    wake=client.changed,
                )
    for client in clients:
        record(client.name, "end", drained=drained, state=client.client.state)
    await asyncio.gather(*(c.client.close() for c in clients), return_exceptions=True)
    leftover: list[asyncio.Future[Any]] = [ramping, *runners, flusher, reading, stopping]
    leftover += [t for c in clients for t in c.tasks]
    for task in leftover:
        task.cancel()
    out.flush()
    print(
        json.dumps(
            {"ev": "done", "complete": sum(c.has(command.get("last", {})) for c in clients)}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1])
