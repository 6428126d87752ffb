"""The seven scenarios. Each starts what it measures, measures pubsock and its baseline side by
side (interleaved where it runs in steps, so a change in the machine's load hits both), stops
everything it started, and returns plain data for the report."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.control import Child, ChildError, call_all
from bench.generator import BURST_RATE
from bench.stats import CpuMeter, merge, rss_bytes
from devtools.cluster import (
    PROJECT,
    TOPIC,
    ClusterConfig,
    LocalCluster,
    emulator_env,
    free_port,
)

ROOT = Path(__file__).resolve().parents[1]
SERVER_CPU = {0}  # engine scenarios: the server under test on one core ...
CLIENT_CPU = {1}  # ... its clients on the other, so neither steals the other's core


@dataclass(frozen=True)
class Profile:
    name: str
    fanout_connections: int
    fanout_rates: Sequence[float]
    fanout_step_s: float
    fanout_repeats: int
    full_repeats: int
    full_connections: int
    full_channels: int
    full_rates: Sequence[float]
    full_headline_rate: float
    full_step_s: float
    ingest_rate: float
    ingest_s: float
    api_rate: float
    api_s: float
    memory_connections: int
    recovery_clients: int
    recovery_missed: int = 100
    # 7. rewind: each step delivers `rewind_rounds` rewinds of `rewind_count` to every client,
    # beside the same number of messages live at `rewind_live_rate` and as a burst.
    rewind_clients: int = 1000
    rewind_count: int = 50
    rewind_rounds: int = 4
    rewind_live_rate: float = 100.0
    rewind_repeats: int = 4
    latency_limit_ms: float = 250.0
    api_channels: int = 8
    # The emulator hands out one ordering key's messages at ~50-70/s at most: spread the ingest
    # load over enough keys, and batch the producer so it does not eat the cores it measures.
    ingest_channels: int = 32
    ingest_batch_latency_s: float = 0.05
    wrk_connections: int = 16
    client_tick_ms: float = 2.0
    # 8. SSE against native websockets (bench.socketio_bench): clients per kind, messages, rate.
    sse_clients: int = 500
    sse_messages: int = 1500
    sse_rate: float = 100.0
    sse_rounds: int = 2
    settle_s: float = 1.0  # pauses before RSS and idle-CPU readings


FULL = Profile(
    name="full",
    fanout_connections=1000,
    fanout_rates=(10, 25, 50, 75, 100, 125, 150),
    fanout_step_s=2.5,
    fanout_repeats=2,
    full_repeats=2,
    full_connections=1000,
    full_channels=10,
    full_rates=(25, 50, 100),
    full_headline_rate=100,
    full_step_s=10.0,
    ingest_rate=1000,
    ingest_s=10.0,
    api_rate=300,
    api_s=12.0,
    memory_connections=10_000,
    recovery_clients=1000,
)

QUICK = Profile(
    name="quick",
    fanout_connections=1000,
    fanout_rates=(10, 50),
    fanout_step_s=1.5,
    fanout_repeats=1,
    full_repeats=1,
    full_connections=1000,
    full_channels=10,
    full_rates=(100,),
    full_headline_rate=100,
    full_step_s=3.0,
    ingest_rate=1000,
    ingest_s=3.0,
    api_rate=300,
    api_s=3.0,
    memory_connections=2000,
    recovery_clients=1000,
    settle_s=0.5,
    rewind_rounds=2,
    rewind_repeats=2,
    sse_clients=200,
    sse_messages=300,
    sse_rounds=1,
)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Bench:
    profile: Profile
    log_dir: Path
    pin: bool = True
    profile_pod: bool = False
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def child(
        self,
        name: str,
        module: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        stack: contextlib.ExitStack | None = None,
        wait: bool = True,
    ) -> Child:
        """Starts a bench child; whatever happens later, `stack` (or the run's) stops it."""
        child = Child(name, module, list(args), self.log_dir, env)
        (stack or self.stack).callback(child.stop)
        child.launch()
        if cpus and self.pin:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(child.pid, cpus)
        if wait:
            child.wait_started()
        return child

    def loadgens(
        self,
        stack: contextlib.ExitStack,
        prefix: str,
        port: int,
        connections: int,
        processes: int,
        order: str = "strict",
        cpus: set[int] | None = None,
        channel: str = "bench",
        channels: int = 1,
        tick_ms: float | None = None,
    ) -> list[Child]:
        """Client processes, started together; each opens its share and subscribes."""
        share = [connections // processes + (i < connections % processes) for i in range(processes)]
        children = [
            self.child(
                f"{prefix}-clients{i}",
                "bench.loadgen",
                [
                    f"--port={port}",
                    f"--connections={n}",
                    f"--order={order}",
                    f"--channel={channel}",
                    f"--channels={channels}",
                    f"--tick-ms={tick_ms or self.profile.client_tick_ms}",
                    "--concurrency=100",
                ],
                cpus=cpus,
                stack=stack,
                wait=False,
            )
            for i, n in enumerate(share)
        ]
        for child, n in zip(children, share, strict=True):
            hello = child.wait_started(120)
            if hello["connected"] != n:
                raise RuntimeError(f"{child.name}: {hello['connected']} of {n} connected")
        return children


# -- machine load ----------------------------------------------------------------------------
class LoadMeter:
    """How much CPU went to processes this bench did not start (other people's work).

    A thread samples the bench's own process tree twice a second, so the CPU of a child that
    exits before `stop()` still counts as the bench's."""

    SAMPLE_S = 0.5

    def start(self) -> LoadMeter:
        self._busy = self._machine_busy()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._done = threading.Event()
        self._sample()
        self._at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="load-meter", daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _machine_busy() -> float:
        times = psutil.cpu_times()
        return times.user + times.nice + times.system + times.irq + times.softirq

    def _sample(self) -> None:
        me = psutil.Process()
        initial = not self._last  # processes already running: count from now on
        processes = [me]
        with contextlib.suppress(psutil.Error):
            processes += me.children(recursive=True)
        for process in processes:
            with contextlib.suppress(psutil.Error):
                cpu = process.cpu_times()
                used = cpu.user + cpu.system
                self._first.setdefault(process.pid, used if initial else 0.0)
                self._last[process.pid] = used

    def _run(self) -> None:
        while not self._done.wait(self.SAMPLE_S):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._done.set()
        self._thread.join(5)
        self._sample()
        elapsed = time.monotonic() - self._at
        busy = self._machine_busy() - self._busy
        ours = sum(used - self._first.get(pid, 0.0) for pid, used in self._last.items())
        return {
            "wall_s": elapsed,
            "machine_busy_cores": busy / elapsed,
            "bench_cores": ours / elapsed,
            "other_cores": max(0.0, busy - ours) / elapsed,
        }


# -- helpers ---------------------------------------------------------------------------------
def drain(loadgens: Sequence[Child], expected: int, timeout_s: float) -> float:
    """Waits until the clients got `expected` frames (or stop making progress); returns the wait."""
    started = time.monotonic()
    last, last_change = -1, started
    while time.monotonic() - started < timeout_s:
        got = sum(reply["frames"] for reply in call_all(loadgens, {"cmd": "count"}))
        if got >= expected:
            break
        if got != last:
            last, last_change = got, time.monotonic()
        elif time.monotonic() - last_change > 3.0:
            break
        time.sleep(0.05)
    return time.monotonic() - started


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


# -- 1. fan-out engine -----------------------------------------------------------------------
def fanout_step(
    server: Child, loadgens: list[Child], rate: float, duration_s: float, limit_ms: float
) -> dict[str, Any]:
    call_all(loadgens, {"cmd": "reset"})
    subscribers = server.call({"cmd": "stats"})["subscribers"]
    server_cpu = CpuMeter([server.pid]).start()
    client_cpu = CpuMeter([c.pid for c in loadgens]).start()
    started = time.monotonic()
    run = server.call({"cmd": "run", "rate": rate, "duration_s": duration_s}, duration_s * 10 + 30)
    expected = run["sent"] * subscribers
    drain(loadgens, expected, timeout_s=10.0)
    wall_s = time.monotonic() - started
    server_s = server_cpu.stop()
    client_s = client_cpu.stop()
    snaps = call_all(loadgens, {"cmd": "snapshot"})
    frames = sum(s["frames"] for s in snaps)
    gaps = sum(s["gaps"] for s in snaps)
    backwards = sum(s["backwards"] for s in snaps)
    closes: dict[str, int] = {}
    for s in snaps:
        for code, n in s["closes"].items():
            closes[code] = closes.get(code, 0) + n
    latency = merge(s["latency"] for s in snaps)
    lost = max(0, expected - frames)
    ok = (
        lost == 0
        and gaps == 0
        and backwards == 0
        and not closes
        and latency["p99_ms"] is not None
        and latency["p99_ms"] <= limit_ms
    )
    return {
        "rate_msg_s": rate,
        "subscribers": subscribers,
        "sent": run["sent"],
        "generator_late_s": run["worst_late_s"],
        "server_loop_lag_p99_ms": run.get("loop_lag_p99_ms"),
        "server_loop_lag_max_ms": run.get("loop_lag_max_ms"),
        "offered_deliveries_s": rate * subscribers,
        "delivered": frames,
        "expected": expected,
        "delivered_s": frames / max(wall_s, run["elapsed_s"], duration_s),
        "lost": lost,
        "gaps": gaps,
        "reordered_or_duplicated": backwards,
        "closes": closes,
        "latency": latency,
        "server_cpu_s": server_s,
        "client_cpu_s": client_s,
        "server_cpu_us_per_delivery": server_s / frames * 1e6 if frames else None,
        "deliveries_per_cpu_s": frames / server_s if server_s else None,
        "client_cpu_us_per_delivery": client_s / frames * 1e6 if frames else None,
        "ok": ok,
    }


ENGINE_SERVERS = (("pubsock", "bench.engine_pod"), ("bare", "bench.bare_server"))


def fanout(bench: Bench) -> dict[str, Any]:
    profile = bench.profile
    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[Child, list[Child]]] = {}
        for key, module in ENGINE_SERVERS:
            server = bench.child(f"fanout-{key}", module, cpus=SERVER_CPU, stack=stack)
            clients = bench.loadgens(
                stack,
                f"fanout-{key}",
                server.hello["port"],
                profile.fanout_connections,
                2,
                cpus=CLIENT_CPU,
            )
            servers[key] = (server, clients)
        say(f"fan-out: 2 servers x {profile.fanout_connections} connections up")
        for server, clients in servers.values():  # warm-up, not measured
            fanout_step(server, clients, 20, 1.0, profile.latency_limit_ms)
        steps: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in ENGINE_SERVERS}
        alive = {key: True for key, _ in ENGINE_SERVERS}
        for index, rate in enumerate(profile.fanout_rates):
            # A B B A (B A A B at the next rate): each server runs twice, and a moment of load
            # from elsewhere hits both; each keeps its better run (lower p99), both are in JSON.
            pair = list(servers) if index % 2 == 0 else list(reversed(servers))
            order = (pair + pair[::-1])[: 2 * profile.fanout_repeats]
            runs: dict[str, list[dict[str, Any]]] = {key: [] for key in servers}
            for key in order:
                if not alive[key]:
                    continue
                server, clients = servers[key]
                runs[key].append(
                    fanout_step(
                        server, clients, rate, profile.fanout_step_s, profile.latency_limit_ms
                    )
                )
            for key in pair:
                if not runs[key]:
                    continue
                step = min(runs[key], key=lambda r: (not r["ok"], r["latency"]["p99_ms"] or 1e12))
                step["runs"] = [{k: v for k, v in r.items() if k != "runs"} for r in runs[key]]
                steps[key].append(step)
                alive[key] = step["ok"]
                lat = step["latency"]
                say(
                    f"fan-out {key:8s} {rate:5.0f} msg/s: {step['delivered_s']:8.0f} deliveries/s, "
                    f"{step['server_cpu_us_per_delivery'] or 0:5.1f} CPU-us each, "
                    f"p99 {lat['p99_ms'] or 0:7.1f} ms, lost {step['lost']}, "
                    f"clients {step['client_cpu_us_per_delivery'] or 0:4.1f} us/frame, "
                    f"server loop lag max {step['server_loop_lag_max_ms'] or 0:.0f} ms"
                    + (f" (best of {len(runs[key])})" if len(runs[key]) > 1 else "")
                    + ("" if step["ok"] else "  <- limit")
                )
            if not any(alive.values()):
                break
        summary = fanout_summary(steps)
        profile_top = None
        if bench.profile_pod:
            passed = [s["rate_msg_s"] for s in steps["pubsock"] if s["ok"]]
            rate = max(passed) if passed else profile.fanout_rates[0]
            server, clients = servers["pubsock"]
            profile_top = py_spy_profile(bench, server, clients, rate, profile.fanout_step_s + 2)
    return {"steps": steps, "summary": summary, "py_spy": profile_top}


def py_spy_profile(
    bench: Bench, server: Child, clients: list[Child], rate: float, duration_s: float
) -> dict[str, Any] | None:
    """An extra, unmeasured step with py-spy sampling the pod: where its CPU goes."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        say("py-spy is not installed: no profile")
        return None
    raw = bench.log_dir / "pod-profile.txt"
    sampler = subprocess.Popen(
        [
            py_spy,
            "record",
            "--nonblocking",
            "--rate",
            "250",
            "--format",
            "raw",
            "--duration",
            f"{duration_s:.0f}",
            "--output",
            str(raw),
            "--pid",
            str(server.pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        fanout_step(server, clients, rate, duration_s - 1.5, bench.profile.latency_limit_ms)
        sampler.wait(duration_s + 30)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait(5)
    if not raw.exists():
        return None
    own: dict[str, int] = {}
    total_in: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total_in[frame] = total_in.get(frame, 0) + n

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:15]
        return [(frame, round(100 * n / samples, 1)) for frame, n in ranked]

    result = {"rate_msg_s": rate, "samples": samples, "self": top(own), "inclusive": top(total_in)}
    say(f"py-spy, pod at {rate:g} msg/s ({samples} samples), top self time:")
    for frame, share in result["self"][:10]:
        say(f"  {share:5.1f}%  {frame}")
    return result


def fanout_summary(steps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Headline: the highest rate both servers sustained. If one of them sustained none (a busy
    machine), CPU per delivery is still comparable at the lowest rate both ran without loss."""
    passed = {key: [s for s in series if s["ok"]] for key, series in steps.items()}
    pod_by_rate = {s["rate_msg_s"]: s for s in passed["pubsock"]}
    bare_by_rate = {s["rate_msg_s"]: s for s in passed["bare"]}
    common = sorted(set(pod_by_rate) & set(bare_by_rate))
    headline_ok = bool(common)
    if not common:
        lossless = {
            key: {s["rate_msg_s"]: s for s in series if s["lost"] == 0 and s["gaps"] == 0}
            for key, series in steps.items()
        }
        pod_by_rate, bare_by_rate = lossless["pubsock"], lossless["bare"]
        common = sorted(set(pod_by_rate) & set(bare_by_rate))[:1]
    per_rate = [
        {
            "rate_msg_s": rate,
            "deliveries_per_cpu_s_ratio": ratio(
                pod_by_rate[rate]["deliveries_per_cpu_s"],
                bare_by_rate[rate]["deliveries_per_cpu_s"],
            ),
        }
        for rate in common
    ]
    headline = common[-1] if common else None

    def best(key: str) -> dict[str, Any] | None:
        return max(passed[key], key=lambda s: s["delivered_s"], default=None)

    pod_best, bare_best = best("pubsock"), best("bare")
    all_runs = [run for series in steps.values() for s in series for run in s.get("runs", [s])]
    return {
        "headline_rate_msg_s": headline,
        "headline_within_limits": headline_ok,
        "pubsock_at_headline": pod_by_rate.get(headline) if headline else None,
        "bare_at_headline": bare_by_rate.get(headline) if headline else None,
        "deliveries_per_cpu_s_ratio": per_rate[-1]["deliveries_per_cpu_s_ratio"]
        if per_rate
        else None,
        "per_rate": per_rate,
        "pubsock_max_sustained_s": pod_best["delivered_s"] if pod_best else None,
        "bare_max_sustained_s": bare_best["delivered_s"] if bare_best else None,
        "max_sustained_ratio": ratio(
            pod_best["delivered_s"] if pod_best else None,
            bare_best["delivered_s"] if bare_best else None,
        ),
        "lost_total": sum(r["lost"] for r in all_runs),
        "reordered_total": sum(r["reordered_or_duplicated"] for r in all_runs),
        "delivered_total": sum(r["delivered"] for r in all_runs),
    }


# -- 5. memory per idle connection -----------------------------------------------------------
def memory(bench: Bench) -> dict[str, Any]:
    profile = bench.profile
    results: dict[str, Any] = {}
    for key, module in ENGINE_SERVERS:
        with contextlib.ExitStack() as stack:
            server = bench.child(f"memory-{key}", module, stack=stack)
            port = server.hello["port"]
            warm = bench.loadgens(stack, f"memory-{key}-warm", port, 200, 1)
            call_all(warm, {"cmd": "close"})
            for child in warm:
                child.stop()
            time.sleep(profile.settle_s)
            before = rss_bytes(server.pid)
            started = time.monotonic()
            processes = 4 if profile.memory_connections >= 4000 else 2
            bench.loadgens(stack, f"memory-{key}", port, profile.memory_connections, processes)
            connect_s = time.monotonic() - started
            time.sleep(profile.settle_s * 2)
            sessions = server.call({"cmd": "stats"})["subscribers"]
            after = rss_bytes(server.pid)
            results[key] = {
                "connections": sessions,
                "rss_before_bytes": before,
                "rss_after_bytes": after,
                "rss_per_connection_bytes": (after - before) / sessions if sessions else None,
                "connect_s": connect_s,
            }
            say(
                f"memory {key:8s}: {sessions} idle connections, "
                f"{(after - before) / max(1, sessions) / 1024:.1f} KiB each "
                f"(RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB)"
            )
    results["ratio"] = ratio(
        results["pubsock"]["rss_per_connection_bytes"], results["bare"]["rss_per_connection_bytes"]
    )
    return results


# -- 6. recovery storm -----------------------------------------------------------------------
def recovery(bench: Bench) -> dict[str, Any]:
    profile = bench.profile
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for key, module in ENGINE_SERVERS:
            server = bench.child(f"recovery-{key}", module, cpus=SERVER_CPU, stack=stack)
            clients = bench.loadgens(
                stack,
                f"recovery-{key}",
                server.hello["port"],
                profile.recovery_clients,
                2,
                cpus=CLIENT_CPU,
            )
            fanout_step(
                server, clients, 20, 0.5, profile.latency_limit_ms
            )  # every client has an id
            call_all(clients, {"cmd": "disconnect"})
            deadline = time.monotonic() + 15
            while server.call({"cmd": "stats"})["sessions"] and time.monotonic() < deadline:
                time.sleep(0.05)
            burst = server.call({"cmd": "burst", "count": profile.recovery_missed})
            cpu = CpuMeter([server.pid]).start()
            replies = call_all(
                clients,
                {"cmd": "reconnect", "expect": profile.recovery_missed, "timeout_s": 60},
                90,
            )
            server_s = cpu.stop()
            started = min(r["started"] for r in replies)
            finished = max(r["finished"] for r in replies)
            complete = sum(r["complete"] for r in replies)
            result = {
                "clients": profile.recovery_clients,
                "missed_messages": burst["sent"],
                "reconnected": sum(r["reconnected"] for r in replies),
                "complete": complete,
                "recovered_true": sum(r["recovered_true"] for r in replies),
                "recovered_false": sum(r["recovered_false"] for r in replies),
                "frames": sum(r["frames"] for r in replies),
                "gaps": sum(r["gaps"] for r in replies),
                "reordered_or_duplicated": sum(r["backwards"] for r in replies),
                "time_s": finished - started if complete == profile.recovery_clients else None,
                "server_cpu_s": server_s,
                "ok": complete == profile.recovery_clients,
            }
            results[key] = result
            say(
                f"recovery {key:8s}: {complete}/{profile.recovery_clients} complete "
                f"(recovered true {result['recovered_true']}) in "
                f"{(result['time_s'] or float('nan')) * 1000:.0f} ms, "
                f"server CPU {server_s * 1000:.0f} ms"
            )
    results["time_ratio"] = ratio(results["pubsock"]["time_s"], results["bare"]["time_s"])
    results["cpu_ratio"] = ratio(
        results["pubsock"]["server_cpu_s"], results["bare"]["server_cpu_s"]
    )
    return results


# -- 7. rewind ---------------------------------------------------------------------------------
def rewind_step(
    server: Child, loadgens: list[Child], profile: Profile, step: int
) -> dict[str, Any]:
    """Every client subscribes to a channel holding `rewind_count` messages with a rewind of
    them, `rewind_rounds` times (new channels); the pod's CPU over all of it."""
    history_s = 0.0
    server_s = client_s = 0.0
    replies: list[dict[str, Any]] = []
    wall_s = 0.0
    for round_ in range(profile.rewind_rounds):
        channel = f"rewind-{step}-{round_}"
        filled = time.monotonic()
        burst = server.call({"cmd": "burst", "count": profile.rewind_count, "channel": channel})
        if not burst["in_history"]:
            raise RuntimeError(f"the pod did not take {channel}'s messages into its history")
        history_s += time.monotonic() - filled
        server_cpu = CpuMeter([server.pid]).start()
        client_cpu = CpuMeter([c.pid for c in loadgens]).start()
        started = time.monotonic()
        replies += call_all(
            loadgens,
            {"cmd": "rewind", "channel": channel, "count": profile.rewind_count, "timeout_s": 60},
            90,
        )
        wall_s += time.monotonic() - started
        server_s += server_cpu.stop()
        client_s += client_cpu.stop()
    clients = sum(r["clients"] for r in replies)
    frames = sum(r["frames"] for r in replies)
    expected = clients * profile.rewind_count
    return {
        "rewinds": clients,
        "count": profile.rewind_count,
        "delivered": frames,
        "expected": expected,
        "lost": max(0, expected - frames),
        "gaps": sum(r["gaps"] for r in replies),
        "reordered_or_duplicated": sum(r["backwards"] for r in replies),
        "complete": sum(r["complete"] for r in replies),
        "rewound_announced": sum(r["rewound"] for r in replies),
        "rewound_incomplete": sum(r["rewound_incomplete"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "wall_s": wall_s,
        "server_cpu_s": server_s,
        "client_cpu_s": client_s,
        "server_cpu_us_per_delivery": server_s / frames * 1e6 if frames else None,
        "deliveries_per_cpu_s": frames / server_s if server_s else None,
        "ok": (
            frames == expected
            and sum(r["gaps"] + r["backwards"] + r["errors"] for r in replies) == 0
            and sum(r["complete"] for r in replies) == clients
            and sum(r["rewound"] for r in replies) == expected
        ),
    }


def rewind(bench: Bench) -> dict[str, Any]:
    """A rewind's cost per delivered message next to live delivery of as many messages of the
    same size to the same clients, on one pod, interleaved (rewind, live, burst; then rotated)."""
    profile = bench.profile
    total = profile.rewind_count * profile.rewind_rounds  # messages per client per step
    steps: dict[str, list[dict[str, Any]]] = {"rewind": [], "live": [], "burst": []}
    with contextlib.ExitStack() as stack:
        server = bench.child("rewind-pubsock", "bench.engine_pod", cpus=SERVER_CPU, stack=stack)
        loadgens = bench.loadgens(
            stack, "rewind", server.hello["port"], profile.rewind_clients, 2, cpus=CLIENT_CPU
        )
        kinds = list(steps)
        for step in range(profile.rewind_repeats):
            for kind in kinds[step % 3 :] + kinds[: step % 3]:
                if kind == "rewind":
                    result = rewind_step(server, loadgens, profile, step)
                else:
                    rate = profile.rewind_live_rate if kind == "live" else BURST_RATE
                    result = fanout_step(
                        server, loadgens, rate, total / rate, profile.latency_limit_ms
                    )
                steps[kind].append(result)
                say(
                    f"rewind {kind:6s}: {result['delivered']:,} deliveries, "
                    f"{result['server_cpu_us_per_delivery'] or float('nan'):.2f} server CPU-us "
                    "each"
                )

    def median_cost(kind: str) -> float | None:
        costs = [s["server_cpu_us_per_delivery"] for s in steps[kind]]
        values = [c for c in costs if c is not None]
        return statistics.median(values) if values else None

    rewind_us, live_us, burst_us = (median_cost(k) for k in ("rewind", "live", "burst"))
    return {
        "clients": profile.rewind_clients,
        "count": profile.rewind_count,
        "live_rate_msg_s": profile.rewind_live_rate,
        "steps": steps,
        "rewind_cpu_us": rewind_us,
        "live_cpu_us": live_us,
        "burst_cpu_us": burst_us,
        "live_ratio": ratio(rewind_us, live_us),
        "burst_ratio": ratio(rewind_us, burst_us),
    }


# -- 8. Server-Sent Events against native websockets ------------------------------------------
SSE_KINDS = ["native", "sse", "sse-10ch"]


def sse(bench: Bench) -> dict[str, Any]:
    """The pod's CPU per delivery for N SSE streams against N native websockets, one channel,
    the same messages, in the same run (interleaved); and with ten channels on each stream, so
    that every event's id carries ten positions (bench.socketio_bench)."""
    from bench.socketio_bench import compare

    p = bench.profile
    say(
        f"sse: {p.sse_clients} clients of each kind ({', '.join(SSE_KINDS)}), "
        f"{p.sse_messages} messages at {p.sse_rate:g}/s, {p.sse_rounds} round(s)"
    )
    kinds = compare(SSE_KINDS, p.sse_clients, p.sse_messages, p.sse_rate, p.sse_rounds, False)
    return {
        "clients": p.sse_clients,
        "messages": p.sse_messages,
        "rate": p.sse_rate,
        "rounds": p.sse_rounds,
        "kinds": kinds,
    }


# -- the emulator scenarios (2, 4, 3) --------------------------------------------------------
def create_topic(emulator_host: str, topic: str) -> None:
    """A topic without retention: a new subscription starts empty."""
    with emulator_env(emulator_host):
        from google.api_core.exceptions import AlreadyExists
        from google.cloud import pubsub_v1

        client = pubsub_v1.PublisherClient()
        with contextlib.suppress(AlreadyExists):
            client.create_topic(request={"name": f"projects/{PROJECT}/topics/{topic}"})
        client.stop()


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def ordering_check(records: list[list[Any]], references: dict[str, list[int]]) -> dict[str, Any]:
    """The contract's guarantee 2 on the delivered order, per channel: if A's 202 came back
    before B was sent, A must come first. Also how far the order strays from send order."""
    violations = 0
    inversions = 0
    for channel, reference in references.items():
        position = {seq: i for i, seq in enumerate(reference)}
        mine = [r for r in records if r[3] == channel]
        sent_order = sorted(mine, key=lambda r: r[1])
        acked_order = sorted(mine, key=lambda r: r[2])
        highest = -1
        j = 0
        for seq, sent_at, _, _ in sent_order:
            while j < len(acked_order) and acked_order[j][2] < sent_at:
                highest = max(highest, position.get(acked_order[j][0], -1))
                j += 1
            if seq in position and highest > position[seq]:
                violations += 1
        inversions += sum(1 for a, b in itertools.pairwise(reference) if b < a)
    return {"guarantee2_violations": violations, "adjacent_out_of_seq": inversions}


def pod_lag(url: str, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pod's own publish-to-fan-out lag (pubsock_delivery_lag_seconds): sum and count, and
    with `before` the mean over the interval. It splits the path: emulator->pod, pod->client."""
    lag_sum = metric_sum(url, "pubsock_delivery_lag_seconds_sum")
    lag_count = metric_sum(url, "pubsock_delivery_lag_seconds_count")
    result: dict[str, Any] = {"sum": lag_sum, "count": lag_count, "mean_ms": None}
    if before is not None and lag_count > before["count"]:
        result["mean_ms"] = (lag_sum - before["sum"]) / (lag_count - before["count"]) * 1000
    return result


def tree_pids(pid: int) -> list[int]:
    """A process and its descendants."""
    try:
        root = psutil.Process(pid)
        return [pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return [pid]


@contextlib.contextmanager
def cluster_running(bench: Bench) -> Iterator[LocalCluster]:
    config = ClusterConfig(
        api_port=free_port(),
        socket_ports=(free_port(), free_port()),
        lb_port=free_port(),
        emulator_port=free_port(),
        with_lb=False,
        extra_env={"LOG_LEVEL": "WARNING"},
        strict=False,  # measured on the emulator, as the baselines are
    )
    work_dir = bench.log_dir / "cluster"
    work_dir.mkdir(exist_ok=True)
    cluster = LocalCluster(config, work_dir=work_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def full_path(bench: Bench, cluster: LocalCluster, stack: contextlib.ExitStack) -> dict[str, Any]:
    """api -> emulator -> 2 pods -> clients vs bare publisher -> emulator -> bare subscriber, at
    the same rate over the same ordering keys, interleaved rate by rate."""
    profile = bench.profile
    env = {"PUBSUB_EMULATOR_HOST": cluster.emulator.host}
    channels = profile.full_channels
    create_topic(cluster.emulator.host, "bench-baseline")
    clients: list[Child] = []
    for pod in cluster.sockets:
        clients += bench.loadgens(
            stack,
            f"full-{pod.name}",
            pod.port,
            profile.full_connections // len(cluster.sockets),
            1,
            order="shared",
            channel="bench-full",
            channels=channels,
        )
    publisher = bench.child(
        "full-httppub", "bench.httppub", [f"--url={cluster.api.url}"], stack=stack
    )
    bare_pub = bench.child(
        "pubsub-publisher", "bench.pubsub_bare", ["publisher"], env=env, stack=stack
    )
    bare_sub = bench.child(
        "full-baseline-subscriber",
        "bench.pubsub_bare",
        ["subscriber", "--topic=bench-baseline", "--subscription=bench-baseline", "--mode=check"],
        env=env,
        stack=stack,
    )
    say(
        f"full path: api, 2 pods, {profile.full_connections} clients on {channels} channels, "
        "baseline subscriber up"
    )
    pods = [pod.process.popen.pid for pod in cluster.sockets]  # type: ignore[union-attr]
    api_pid = cluster.api.process.popen.pid  # type: ignore[union-attr]
    emulator = tree_pids(cluster.emulator.process.popen.pid)  # type: ignore[union-attr]
    publish = {"cmd": "run", "channel": "bench-full", "channels": channels}
    bare_publish = {"cmd": "run", "topic": "bench-baseline", "channels": channels}
    bare_publish["prefix"] = "bench-full"
    # Warm-up (not measured): the first publishes open gRPC channels and ordering keys.
    warm = publisher.call({**publish, "rate": 20, "duration_s": 1}, 60)
    drain(clients, warm["accepted"] * profile.full_connections, 10)
    bare_pub.call({**bare_publish, "rate": 20, "duration_s": 1}, 60)

    def run_pubsock(rate: float) -> dict[str, Any]:
        call_all(clients, {"cmd": "reset"})
        meters = {
            "pods": CpuMeter(pods).start(),
            "api": CpuMeter([api_pid]).start(),
            "emulator": CpuMeter(emulator).start(),
            "clients": CpuMeter([c.pid for c in clients]).start(),
            "publisher": CpuMeter([publisher.pid]).start(),
        }
        lag_before = [pod_lag(pod.url) for pod in cluster.sockets]
        started = time.monotonic()
        run = publisher.call(
            {**publish, "rate": rate, "duration_s": profile.full_step_s},
            profile.full_step_s * 5 + 60,
        )
        expected = run["accepted"] * profile.full_connections
        drain(clients, expected, 20)
        wall_s = time.monotonic() - started
        cores = {name: meter.stop() / wall_s for name, meter in meters.items()}
        lags = [
            pod_lag(pod.url, before)
            for pod, before in zip(cluster.sockets, lag_before, strict=True)
        ]
        snaps = call_all(clients, {"cmd": "snapshot"})
        orders = call_all(clients, {"cmd": "orders"})
        frames = sum(s["frames"] for s in snaps)
        latency = merge(s["latency"] for s in snaps)
        accepted_seqs = {r[0] for r in run["records"]}
        references = [o["reference"] for o in orders]
        reference = references[0]
        signatures: dict[str, int] = {}
        for o in orders:
            for signature, n in o["hashes"].items():
                signatures[signature] = signatures.get(signature, 0) + n
        delivered_seqs = [seq for seq_list in reference.values() for seq in seq_list]
        pubsock = {
            "channels": channels,
            "accepted": run["accepted"],
            "statuses": run["statuses"],
            "expected": expected,
            "delivered": frames,
            "lost": max(0, expected - frames),
            "duplicates_in_reference": len(delivered_seqs) - len(set(delivered_seqs)),
            "reference_complete": set(delivered_seqs) == accepted_seqs,
            "one_order_everywhere": all(r == reference for r in references)
            and len(signatures) == 1,
            "distinct_orders": len(signatures),
            **ordering_check(run["records"], reference),
            "delivered_s": frames / max(wall_s, profile.full_step_s),
            "latency": latency,
            "http_latency": merge([run["http_latency"]]),
            "cores": cores,
            "pod_receive_lag_mean_ms": [lag["mean_ms"] for lag in lags],
            "closes": {k: v for s in snaps for k, v in s["closes"].items()},
            "_lags": lags,
        }
        pubsock["ok"] = (
            pubsock["lost"] == 0
            and pubsock["duplicates_in_reference"] == 0
            and pubsock["reference_complete"]
            and pubsock["one_order_everywhere"]
            and pubsock["guarantee2_violations"] == 0
            and run["accepted"] == run["sent"]
        )
        return pubsock

    def run_baseline(rate: float) -> dict[str, Any]:
        # baseline: bare publisher -> emulator -> bare streaming-pull subscriber
        bare_sub.call({"cmd": "reset"})
        base_meters = {
            "subscriber": CpuMeter([bare_sub.pid]).start(),
            "publisher": CpuMeter([bare_pub.pid]).start(),
            "emulator": CpuMeter(emulator).start(),
        }
        started = time.monotonic()
        pub = bare_pub.call(
            {**bare_publish, "rate": rate, "duration_s": profile.full_step_s},
            profile.full_step_s * 5 + 60,
        )
        deadline = time.monotonic() + 20
        while (
            bare_sub.call({"cmd": "count"})["received"] < pub["ok_count"]
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        wall_s = time.monotonic() - started
        snap = bare_sub.call({"cmd": "snapshot"})
        baseline = {
            "sent": pub["sent"],
            "published": pub["ok_count"],
            "received": snap["received"],
            "lost": max(0, pub["ok_count"] - snap["received"]),
            "duplicates": snap["duplicates"],
            "reordered": snap["backwards"],
            "latency": merge([snap["latency"]]),
            "cores": {name: meter.stop() / wall_s for name, meter in base_meters.items()},
        }
        baseline["ok"] = baseline["lost"] == 0 and baseline["reordered"] == 0
        return baseline

    steps: list[dict[str, Any]] = []
    for rate in profile.full_rates:
        # A B B A, as the fan-out steps: a burst of load from elsewhere hits both sides, and
        # each keeps its better run (lower p99); every run is in the JSON.
        runs: dict[str, list[dict[str, Any]]] = {"pubsock": [], "baseline": []}
        order = ["pubsock", "baseline", "baseline", "pubsock"][: 2 * profile.full_repeats]
        for side in order:
            runs[side].append(run_pubsock(rate) if side == "pubsock" else run_baseline(rate))
        pubsock = dict(_best_run(runs["pubsock"]))
        baseline = _best_run(runs["baseline"])
        latency = pubsock["latency"]
        cores = pubsock["cores"]
        lags = pubsock.pop("_lags")
        for run in runs["pubsock"]:
            run.pop("_lags", None)
        step = {
            "rate_msg_s": rate,
            "offered_deliveries_s": rate * profile.full_connections,
            "pubsock": pubsock,
            "baseline": baseline,
            "runs": runs,
            "p99_ratio": ratio(latency["p99_ms"], baseline["latency"]["p99_ms"]),
            "p50_ratio": ratio(latency["p50_ms"], baseline["latency"]["p50_ms"]),
        }
        steps.append(step)
        busy = " ".join(f"{k} {v:.2f}" for k, v in cores.items())
        say(
            f"full path {rate:4.0f} msg/s: {pubsock['delivered_s']:7.0f} deliveries/s, "
            f"p50/p99/max {latency['p50_ms'] or 0:.0f}/{latency['p99_ms'] or 0:.0f}/"
            f"{latency['max_ms'] or 0:.0f} ms, lost {pubsock['lost']}, one order "
            f"{pubsock['one_order_everywhere']}; baseline p50/p99 "
            f"{baseline['latency']['p50_ms'] or 0:.0f}/{baseline['latency']['p99_ms'] or 0:.0f} ms"
            f" (pods' own publish->fan-out lag, mean: "
            + "/".join(f"{lag['mean_ms'] or float('nan'):.0f}" for lag in lags)
            + f" ms; cores: {busy})"
        )
    call_all(clients, {"cmd": "close"})
    for child in clients:
        child.stop()
    headline = next((s for s in steps if s["rate_msg_s"] == profile.full_headline_rate), steps[-1])
    return {"channels": channels, "steps": steps, "headline": headline}


def _best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the lowest p99; a run that lost or reordered anything is never the best."""
    return min(runs, key=lambda r: (not r["ok"], r["latency"]["p99_ms"] or float("inf")))


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (bench/setup.sh installs it)")
    return found


def publish_api(bench: Bench, cluster: LocalCluster, stack: contextlib.ExitStack) -> dict[str, Any]:
    """The api under wrk vs a bare PublisherClient loop, same rate, same keys, same topic."""
    profile = bench.profile
    for pod in cluster.sockets:  # nobody subscribed: the pods would only compete for the cores
        pod.process.stop()
    api_pid = cluster.api.process.popen.pid  # type: ignore[union-attr]
    env = {"PUBSUB_EMULATOR_HOST": cluster.emulator.host}
    bare_pub = bench.child(
        "api-baseline-publisher", "bench.pubsub_bare", ["publisher"], env=env, stack=stack
    )
    script = Path(__file__).with_name("wrk_publish.lua")
    argv = [
        wrk_binary(),
        "-t1",
        f"-c{profile.wrk_connections}",
        f"-d{profile.api_s:.0f}s",
        "--timeout=10s",
        "-s",
        str(script),
        cluster.api.url,
        "--",
        str(profile.api_rate),
        str(profile.api_channels),
    ]
    # warm-up: open the api's publisher channels and keys
    warm = [*argv]
    warm[3] = "-d2s"
    subprocess.run(warm, capture_output=True, timeout=60, check=False)
    bare_pub.call(
        {
            "cmd": "run",
            "topic": TOPIC,
            "rate": 50,
            "duration_s": 1,
            "channels": profile.api_channels,
        },
        60,
    )
    api_cpu = CpuMeter([api_pid]).start()
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=profile.api_s + 60, check=False
    )
    api_s = api_cpu.stop()
    match = re.search(r"BENCH_JSON (\{.*\})", completed.stdout)
    if match is None:
        raise RuntimeError(f"wrk said:\n{completed.stdout}\n{completed.stderr}")
    wrk = json.loads(match.group(1))
    failures = (
        wrk["connect_errors"]
        + wrk["read_errors"]
        + wrk["write_errors"]
        + wrk["status_errors"]
        + wrk["timeouts"]
    )
    accepted = wrk["requests"] - wrk["status_errors"]
    pubsock = {
        "tool": f"wrk -t1 -c{profile.wrk_connections} -d{profile.api_s:.0f}s, Lua delay() pacing",
        "requests": wrk["requests"],
        "accepted": accepted,
        "failures": failures,
        "achieved_rate_s": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "latency": {
            "p50_ms": wrk["p50_us"] / 1000,
            "p90_ms": wrk["p90_us"] / 1000,
            "p99_ms": wrk["p99_us"] / 1000,
            "max_ms": wrk["max_us"] / 1000,
        },
        "api_cpu_s": api_s,
        "cpu_us_per_publish": api_s / accepted * 1e6 if accepted else None,
        "wrk_output": completed.stdout[-2000:],
    }
    pub_cpu = CpuMeter([bare_pub.pid]).start()
    run = bare_pub.call(
        {
            "cmd": "run",
            "topic": TOPIC,
            "rate": profile.api_rate,
            "duration_s": profile.api_s,
            "channels": profile.api_channels,
        },
        profile.api_s * 5 + 60,
    )
    pub_s = pub_cpu.stop()
    baseline = {
        "sent": run["sent"],
        "accepted": run["ok_count"],
        "failures": run["failed"],
        "achieved_rate_s": run["sent"] / run["elapsed_s"],
        "latency": merge([run["latency"]]),
        "publisher_cpu_s": pub_s,
        "cpu_us_per_publish": pub_s / run["ok_count"] * 1e6 if run["ok_count"] else None,
    }
    result = {
        "rate_msg_s": profile.api_rate,
        "channels": profile.api_channels,
        "pubsock": pubsock,
        "baseline": baseline,
        "cpu_ratio": ratio(pubsock["cpu_us_per_publish"], baseline["cpu_us_per_publish"]),
        "p99_ratio": ratio(pubsock["latency"]["p99_ms"], baseline["latency"]["p99_ms"]),
    }
    say(
        f"publish api: {pubsock['achieved_rate_s']:.0f}/s, "
        f"{pubsock['cpu_us_per_publish'] or 0:.0f} CPU-us per publish, "
        f"p99 {pubsock['latency']['p99_ms']:.1f} ms; bare publisher "
        f"{baseline['cpu_us_per_publish'] or 0:.0f} CPU-us, "
        f"p99 {baseline['latency']['p99_ms'] or 0:.1f} ms"
    )
    return result


def ingest(bench: Bench, cluster: LocalCluster, stack: contextlib.ExitStack) -> dict[str, Any]:
    """CPU per message of a pod with no clients taking messages from its subscription, vs a
    bare streaming-pull subscriber that only acks; each on its own topic, one after the other."""
    profile = bench.profile
    host = cluster.emulator.host
    env = {"PUBSUB_EMULATOR_HOST": host}
    publisher = bench.child(
        "ingest-publisher", "bench.pubsub_bare", ["publisher"], env=env, stack=stack
    )
    results: dict[str, Any] = {}

    def feed(topic: str, consumer_pid: int, received: Callable[[], float]) -> dict[str, Any]:
        time.sleep(profile.settle_s)
        idle = CpuMeter([consumer_pid]).start()
        time.sleep(profile.settle_s * 2)
        idle_cpu_s_per_s = idle.stop() / (profile.settle_s * 2)
        base = received()
        cpu = CpuMeter([consumer_pid]).start()
        started = time.monotonic()
        run = publisher.call(
            {
                "cmd": "run",
                "topic": topic,
                "rate": profile.ingest_rate,
                "duration_s": profile.ingest_s,
                "channels": profile.ingest_channels,
                "prefix": "ingest",
                "batch_latency_s": profile.ingest_batch_latency_s,
            },
            profile.ingest_s * 5 + 60,
        )
        deadline = time.monotonic() + 30
        got = received() - base
        while got < run["ok_count"] and time.monotonic() < deadline:
            time.sleep(0.25)
            got = received() - base
        wall_s = time.monotonic() - started
        cpu_s = cpu.stop()
        return {
            "published": run["ok_count"],
            "received": got,
            "lost": max(0, run["ok_count"] - got),
            "publish_rate_s": run["sent"] / run["elapsed_s"],
            "receive_rate_s": got / wall_s,
            "cpu_s": cpu_s,
            "cpu_us_per_message": cpu_s / got * 1e6 if got else None,
            "idle_cpu_s_per_s": idle_cpu_s_per_s,
            "cpu_us_per_message_minus_idle": (cpu_s - idle_cpu_s_per_s * wall_s) / got * 1e6
            if got
            else None,
        }

    create_topic(host, "bench-ingest-pod")
    pod = cluster.new_socket("ingest-pod", free_port(), PUBSUB_TOPIC="bench-ingest-pod")
    stack.callback(pod.process.stop)
    pod.start()
    pod_pid = pod.process.popen.pid  # type: ignore[union-attr]
    results["pubsock"] = feed(
        "bench-ingest-pod", pod_pid, lambda: metric_sum(pod.url, "pubsock_messages_received_total")
    )
    pod.process.stop()
    create_topic(host, "bench-ingest-bare")
    subscriber = bench.child(
        "ingest-bare-subscriber",
        "bench.pubsub_bare",
        [
            "subscriber",
            "--topic=bench-ingest-bare",
            "--subscription=bench-ingest-bare",
            "--mode=ack",
        ],
        env=env,
        stack=stack,
    )
    results["bare"] = feed(
        "bench-ingest-bare", subscriber.pid, lambda: subscriber.call({"cmd": "count"})["received"]
    )
    subscriber.stop()
    results["cpu_ratio"] = ratio(
        results["pubsock"]["cpu_us_per_message"], results["bare"]["cpu_us_per_message"]
    )
    for key in ("pubsock", "bare"):
        r = results[key]
        say(
            f"ingest {key:8s}: {r['received']:.0f}/{r['published']} messages at "
            f"{r['receive_rate_s']:.0f}/s, {r['cpu_us_per_message'] or 0:.0f} CPU-us each"
        )
    return results


def emulator_scenarios(bench: Bench, wanted: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with cluster_running(bench) as cluster, contextlib.ExitStack() as stack:
        say(
            f"cluster up: emulator {cluster.emulator.host}, api {cluster.api.port}, "
            f"pods {[p.port for p in cluster.sockets]}"
        )
        for name, run in (
            ("full_path", full_path),
            ("publish_api", publish_api),
            ("ingest", ingest),
        ):
            if name not in wanted:
                continue
            meter = LoadMeter().start()
            try:
                results[name] = run(bench, cluster, stack)
            except (ChildError, RuntimeError, TimeoutError, OSError) as exc:
                results[name] = {"error": str(exc)}
                say(f"{name} failed: {exc}")
            results[name]["machine"] = meter.stop()
    return results
