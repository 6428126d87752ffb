"""The soak's client processes: Python clients (devtools.soak.pyclients), and Node processes with
browser clients and socket.io-client sockets (devtools/soak/nodeclients.mjs). Each process holds
many clients and writes every client's events as JSON lines to its own file; this module plans
them, starts them, tells them to finish, and reads their records back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.cluster import ROOT
from devtools.lifetime import die_with_parent
from devtools.node import npm_ci

HERE = Path(__file__).resolve().parent
PER_NODE_PROCESS = 100  # 50 browser clients and 50 socket.io sockets a process
PER_PYTHON_PROCESS = 100


def install_node_modules() -> None:
    """`npm ci` from package-lock.json when node_modules is missing."""
    npm_ci(HERE, ("ws", "socket.io-client"), "the soak's Node clients (Node 20)")


def plan_clients(count: int, channels: list[str], seed: int) -> dict[str, list[dict[str, Any]]]:
    """A third each: Python, browser (Node), socket.io (Node); overlapping channel sets; about
    a third of them change channels as they go."""
    rng = random.Random(seed)
    kinds = ("py", "browser", "sio")
    result: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    for i in range(count):
        kind = kinds[i % 3]
        n = len(result[kind])
        spec: dict[str, Any] = {
            "name": f"{kind}-{n:03d}",
            "kind": kind,
            "channels": rng.sample(channels, k=rng.randint(1, min(3, len(channels)))),
            "churn_s": round(rng.uniform(15, 45), 1) if rng.random() < 0.35 else None,
        }
        if kind == "sio":
            spec["transports"] = ["websocket"] if n % 2 else ["polling", "websocket"]
        result[kind].append(spec)
    return result


@dataclass
class Worker:
    name: str
    argv: list[str]
    plan_path: Path
    out_path: Path
    log_path: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            str(self.plan_path),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**os.environ, "NODE_NO_WARNINGS": "1", "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        log.close()

    async def wait_line(self, ev: str, timeout_s: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        async with asyncio.timeout(timeout_s):
            while line := await self.process.stdout.readline():
                record: dict[str, Any] = json.loads(line)
                if record.get("ev") == ev:
                    return record
        raise RuntimeError(f"{self.name} exited before {ev!r}; see {self.log_path}")

    async def calm(self) -> None:
        """No more joins and leaves from here on."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b'{"cmd": "calm"}\n')
        await self.process.stdin.drain()
        await self.wait_line("calm", 30)

    async def finish(self, last: dict[str, list[str]], deadline_s: float) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        command = {"cmd": "finish", "last": last, "deadline_s": deadline_s}
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        done = await self.wait_line("done", deadline_s + 30)
        await asyncio.wait_for(self.process.wait(), 15)
        return done

    async def kill(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 9)
        await self.process.wait()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


def make_workers(
    specs: dict[str, list[dict[str, Any]]],
    out_dir: Path,
    *,
    ws_url: str,
    sio_url: str,
    token: str,
    pool: list[str],
    seed: int,
    ramp_s: float,
) -> list[Worker]:
    workers: list[Worker] = []
    common = {"url": ws_url, "sio_url": sio_url, "token": token, "pool": pool, "ramp_s": ramp_s}
    python = specs["py"]
    for i in range(0, len(python), PER_PYTHON_PROCESS):
        name = f"pyclients-{i // PER_PYTHON_PROCESS + 1}"
        workers.append(
            _worker(
                name,
                [sys.executable, "-m", "devtools.soak.pyclients"],
                python[i : i + PER_PYTHON_PROCESS],
                out_dir,
                common,
                seed + len(workers),
            )
        )
    node = [s for pair in zip(specs["browser"], specs["sio"], strict=False) for s in pair]
    node += specs["browser"][len(specs["sio"]) :] + specs["sio"][len(specs["browser"]) :]
    for i in range(0, len(node), PER_NODE_PROCESS):
        name = f"nodeclients-{i // PER_NODE_PROCESS + 1}"
        workers.append(
            _worker(
                name,
                [shutil.which("node") or "node", str(HERE / "nodeclients.mjs")],
                node[i : i + PER_NODE_PROCESS],
                out_dir,
                common,
                seed + len(workers),
            )
        )
    return workers


def _worker(
    name: str,
    argv: list[str],
    clients: list[dict[str, Any]],
    out_dir: Path,
    common: dict[str, Any],
    seed: int,
) -> Worker:
    plan_path = out_dir / f"{name}.plan.json"
    out_path = out_dir / f"{name}.jsonl"
    plan = {**common, "clients": clients, "seed": seed, "out": str(out_path)}
    plan_path.write_text(json.dumps(plan, indent=1))
    return Worker(name, argv, plan_path, out_path, out_dir / f"{name}.log")


def load_records(paths: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """Every client's events in order, each `subd` and `msg` given the pod that served it (the
    pod the connection named next, before it closed; a socket.io CONNECT names its pod)."""
    clients: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for path in paths:
        if not path.exists():
            continue
        with path.open() as lines:
            for line in lines:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                clients[record["c"]].append(record)
    for events in clients.values():
        pending: list[dict[str, Any]] = []
        pod: str | None = None
        for event in events:
            kind = event["e"]
            if kind == "pod" or (kind == "sio" and event.get("pod")):
                pod = event.get("pod")
                for waiting in pending:
                    waiting["pod"] = pod
                pending.clear()
            elif kind == "state":  # a new connection names its pod after its subscribes
                if event.get("state") != "open":
                    pending.clear()
                pod = None
            elif kind in ("subd", "msg") and not event.get("pod"):
                if pod is not None:
                    event["pod"] = pod
                else:
                    pending.append(event)
    return dict(clients)
