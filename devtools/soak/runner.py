"""`python -m devtools.soak --seconds N --seed S --clients N --out DIR`: the local cluster on the
strict Pub/Sub stand-in with three socket pods behind the load balancer, steady publishing,
clients of every kind through a TCP proxy, the nemesis; then the checker and the report.

The seed is printed first: a failing run replays with `--seed`. Exit code 0 only with no
violation and nothing left running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import psutil

from devtools.cluster import ROOT, ClusterConfig, LocalCluster, free_port, port_open
from devtools.lifetime import die_with_parent
from devtools.metrics import metric
from devtools.soak import checker
from devtools.soak.clients import install_node_modules, load_records, make_workers, plan_clients
from devtools.soak.nemesis import Nemesis
from devtools.soak.publishers import Publisher, load_log, plans
from devtools.soak.report import svg, table, timeline
from devtools.waiting import WaitTimeout, eventually
from services.core.auth import mint_token

API_KEY = "soak-key-0123456789"
SECRET = "soak-secret-0123456789abcdef0123456789abcdef"
SOCKET_ENV = {
    "DRAIN_CLOSE_WINDOW_S": "2",
    "CLOSE_TIMEOUT_S": "2",
    "DEAF_AFTER_S": "5",
    "PRESENCE_TTL_S": "10",
    "SOCKETIO_SECRET": SECRET,
    "LOG_LEVEL": "INFO",
}
API_ENV = {"PUBLISH_TIMEOUT_S": "5", "BROKER_PROBE_INTERVAL_S": "1", "PUBLISH_RATE_PER_S": "5000"}
FINISH_DEADLINE_S = 60.0
RAMPED_SHARE = 0.9  # the load starts once this share of the clients is connected


def now_ms() -> float:
    return time.time() * 1000


_T0 = time.monotonic()


def say(*parts: object) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s]", *parts, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devtools.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600, help="load duration (s)")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--publishers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=16.0, help="messages a second, in all")
    parser.add_argument("--fault-gap", type=float, default=12.0, help="mean seconds between faults")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--recheck", type=Path, default=None, help="judge a finished run again")
    return parser.parse_args(argv)


def proc_sample(pid: int | None) -> dict[str, Any]:
    if pid is None:
        return {}
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            rss_kb, fds = process.memory_info().rss // 1024, process.num_fds()
    except psutil.Error:
        return {"pid": pid, "gone": True}
    return {"pid": pid, "rss_kb": rss_kb, "fds": fds}


async def connected_sessions(cluster: LocalCluster) -> int:
    """Sessions of every kind open on the socket pods (their `pubsock_connections` gauges); a
    pod slow to answer counts none this time."""
    counts = [
        await metric(pod.url, "pubsock_connections", unreachable=0) for pod in cluster.sockets
    ]
    return int(sum(counts))


def pod_sample(nemesis: Nemesis) -> list[dict[str, Any]]:
    samples = []
    for slot in nemesis.slots:
        popen = slot.service.process.popen
        sample = proc_sample(popen.pid if popen else None)
        sample["pod"] = slot.pod
        samples.append(sample)
    return samples


def pod_marks(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What pods logged that makes `recovered: false` right: a marked break, a deaf stream
    resumed, a warm start without a seek or whose backlog was not known to be over."""
    marks = []
    for pod in pods:
        path = Path(pod["log"])
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = str(entry.get("message", ""))
            kind = None
            if message.startswith("subscription recreated"):
                kind = "break"
            elif message.startswith("subscription stream ended") and entry.get("deaf"):
                kind = "deaf"
            elif message.startswith("no warm start"):
                kind = "no_warm_start"
            elif message.startswith("warm start done") and entry.get("backlog_over") is False:
                kind = "warm_incomplete"
            if kind and entry.get("time"):
                t = datetime.fromisoformat(entry["time"]).timestamp() * 1000
                # A pod's log has every instance that ran on its port: keep this instance's.
                marks.append({"pod": pod["pod"], "t": t, "kind": kind})
    return marks


def messages_from_log(path: Path) -> tuple[dict[str, checker.Msg], dict[str, Any]]:
    messages: dict[str, checker.Msg] = {}
    stats: dict[str, Any] = {"attempts": 0, "statuses": {}}
    for attempt in load_log(path):
        stats["attempts"] += 1
        status = str(attempt["status"])
        stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
        for item in attempt["items"]:
            msg = messages.get(item["id"])
            if msg is None:
                msg = messages[item["id"]] = checker.Msg(
                    id=item["id"],
                    ch=item["ch"],
                    pub=attempt["pub"],
                    seq=item["seq"],
                    sent_ms=attempt["t0"],
                    accepted=False,
                )
            if attempt["status"] == 202:
                msg.accepted = True
    stats["accepted"] = sum(1 for m in messages.values() if m.accepted)
    stats["unknown"] = len(messages) - stats["accepted"]
    return messages, stats


def _in_groups(pgids: Collection[int]) -> Iterator[tuple[psutil.Process, int]]:
    """Every live process (zombies included) in one of the process groups, with its group."""
    for process in psutil.process_iter():
        try:
            pgid = os.getpgid(process.pid)
        except OSError:
            continue
        if pgid in pgids:
            yield process, pgid


def cpu_by_group(pgids: dict[int, str]) -> dict[str, float]:
    """CPU seconds (user + system) of every live process in the given process groups, by the
    group's name: what each part cost (the JVM of the emulator included)."""
    totals: dict[str, float] = {}
    for process, pgid in _in_groups(pgids):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        name = pgids[pgid]
        totals[name] = round(totals.get(name, 0.0) + times.user + times.system, 1)
    return totals


def leftovers(pgids: list[int], ports: list[int]) -> dict[str, list[Any]]:
    """Processes still in any group we started, and ports still listening."""
    alive: list[dict[str, Any]] = []
    for process, pgid in _in_groups(set(pgids)):
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(process.cmdline())
        except psutil.Error:
            continue
        alive.append({"pid": process.pid, "pgid": pgid, "cmd": cmd[:120]})
    listening = [p for p in ports if port_open(p)]
    return {"processes": alive, "ports": listening}


class Proxy:
    def __init__(self, listen: int, target: int, seed: int, log_dir: Path) -> None:
        self.port = listen
        log = (log_dir / "tcpproxy.log").open("ab")
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devtools.soak.tcpproxy",
                f"--listen={listen}",
                f"--target={target}",
                f"--seed={seed}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            preexec_fn=die_with_parent(),
            text=True,
        )
        log.close()
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        if '"listening"' not in line:
            self.stop()
            raise RuntimeError(f"the TCP proxy did not start: {line!r}")

    def cut(self, share: float) -> int:
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps({"cmd": "cut", "share": share}) + "\n")
        self.popen.stdin.flush()
        answer = json.loads(self.popen.stdout.readline())
        return int(answer["count"])

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.popen.stdin is not None
            self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)


async def soak(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(f"SOAK_SEED={seed}", flush=True)  # first: a failing run replays with it
    started = time.monotonic()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out: Path = args.out or ROOT / ".run" / "soak" / f"{seed}-{int(time.time())}"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    say(f"output: {out}")
    install_node_modules()
    rng = random.Random(seed)
    channels = [f"soak:c{i}" for i in range(args.channels)]
    socket_ports = (free_port(), free_port(), free_port())
    config = ClusterConfig(
        api_port=free_port(),
        socket_ports=socket_ports,
        lb_port=free_port(),
        emulator_port=free_port(),
        extra_env={"API_KEYS": API_KEY, "TOKEN_SECRET": SECRET},
        socket_env=SOCKET_ENV,
        api_env=API_ENV,
    )
    os.makedirs(out / "cluster")
    cluster = LocalCluster(config, work_dir=out / "cluster")
    proxy: Proxy | None = None
    workers = []
    pgids: list[int] = []
    ports = [config.api_port, *socket_ports, config.lb_port, config.emulator_port]
    report: dict[str, Any] = {"seed": seed, "seconds": args.seconds, "out": str(out)}
    publish_log_path = out / "publish.jsonl"
    publish_log: IO[str] = publish_log_path.open("w", buffering=1 << 16)
    nemesis: Nemesis | None = None
    publishers: list[Publisher] = []
    try:
        say("starting the cluster (emulator, strict stand-in, api, 3 socket pods, HAProxy) ...")
        await asyncio.to_thread(cluster.start)
        assert cluster.lb is not None and cluster.strict is not None
        ports += [cluster.strict.port, cluster.strict.admin_port]
        proxy_port = free_port()
        ports.append(proxy_port)
        proxy = Proxy(proxy_port, cluster.lb.port, rng.randrange(2**31), out)
        nemesis = Nemesis(
            cluster, rng.randrange(2**31), args.fault_gap, proxy.cut, deaf_after_s=5.0
        )
        resources_start = pod_sample(nemesis)
        token, _ = mint_token(SECRET, "soak", ["soak:*"], [], 6 * 3600)
        specs = plan_clients(args.clients, channels, rng.randrange(2**31))
        workers = make_workers(
            specs,
            out,
            ws_url=f"ws://127.0.0.1:{proxy_port}/ws",
            sio_url=f"http://127.0.0.1:{proxy_port}",
            token=token,
            pool=channels,
            seed=rng.randrange(2**31),
            ramp_s=min(20.0, args.clients / 20),
        )
        say(
            f"{args.clients} clients in {len(workers)} processes "
            f"(Python {len(specs['py'])}, browser {len(specs['browser'])}, "
            f"socket.io {len(specs['sio'])}) on {len(channels)} channels"
        )
        for worker in workers:
            await worker.start()
        for worker in workers:
            await worker.wait_line("started", 60)
        # The clients connect over the ramp; the load starts once most are in (some come and go
        # by design, so not all).
        wanted = RAMPED_SHARE * int(args.clients)

        def ramped(sessions: int) -> bool:
            return sessions >= wanted

        await eventually(
            functools.partial(connected_sessions, cluster),
            min(20.0, args.clients / 20) + 60,
            f"{RAMPED_SHARE:.0%} of the clients connected",
            interval_s=0.5,
            until=ramped,
        )
        publishers = [
            Publisher(plan, cluster.lb.url, API_KEY, publish_log)
            for plan in plans(channels, args.publishers, args.rate, rng.randrange(2**31))
        ]
        load_started = now_ms()
        report["load_started_ms"] = load_started
        say(
            f"load: {args.rate:g} messages/s from {len(publishers)} publishers; faults every "
            f"~{args.fault_gap:g} s; {args.seconds:g} s"
        )
        publishing = [asyncio.ensure_future(p.run()) for p in publishers]
        faulting = asyncio.ensure_future(nemesis.run())
        deadline = time.monotonic() + args.seconds
        next_note = time.monotonic() + 30
        while time.monotonic() < deadline:
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= next_note:
                next_note += 30
                accepted = sum(p.accepted for p in publishers)
                say(
                    f"  {time.monotonic() - deadline + args.seconds:5.0f} s: {accepted} accepted, "
                    f"{len(nemesis.faults)} faults"
                )
        say("stopping the nemesis and the publishers ...")
        await nemesis.stop()
        await faulting
        await asyncio.gather(*(w.calm() for w in workers))  # joins end before publishing does
        for publisher in publishers:
            publisher.stop()
        await asyncio.gather(*publishing)
        load_ended = now_ms()
        publish_log.flush()
        for slot in nemesis.slots:  # every pod serving again before the clients finish
            await asyncio.to_thread(slot.service.wait_ready, 90.0)
        messages, publishing_stats = messages_from_log(publish_log_path)
        # Every publisher has stopped: a client is complete once it has each publisher's last
        # accepted message of each of its channels (the channel's last one is among them).
        newest: dict[tuple[str, str], checker.Msg] = {}
        for msg in messages.values():
            key = (msg.ch, msg.pub)
            if msg.accepted and (key not in newest or msg.seq > newest[key].seq):
                newest[key] = msg
        last: dict[str, list[str]] = {}
        for (ch, _), msg in newest.items():
            last.setdefault(ch, []).append(msg.id)
        say("clients finishing: each waits for the last accepted message of its channels ...")
        done = await asyncio.gather(*(w.finish(last, FINISH_DEADLINE_S) for w in workers))
        resources_end = pod_sample(nemesis)
        report["finish"] = {w.name: d for w, d in zip(workers, done, strict=True)}
        report["load_ended_ms"] = load_ended
        report["faults"] = nemesis.faults
        report["pods"] = nemesis.pods
        report["publishing"] = publishing_stats
        report["resources"] = [
            {"slot": i + 1, "start": s, "end": e}
            for i, (s, e) in enumerate(zip(resources_start, resources_end, strict=True))
        ]
    finally:
        publish_log.close()
        groups = {w.pid: w.name for w in workers if w.pid}
        if proxy is not None:
            groups[proxy.popen.pid] = "tcpproxy"
        for process in (
            cluster.emulator.process,
            cluster.api.process,
            *(s.process for s in cluster.sockets),
            *([cluster.strict.process] if cluster.strict else []),
            *([cluster.lb.process] if cluster.lb else []),
        ):
            if process.popen is not None:
                groups[process.popen.pid] = process.name.split("-")[0]
        report["cpu_live_at_end_s"] = cpu_by_group(groups)
        say("stopping everything ...")
        for worker in workers:
            if worker.pid:
                pgids.append(worker.pid)
            await worker.kill()
        if proxy is not None:
            pgids.append(proxy.popen.pid)
            proxy.stop()
        all_processes = [cluster.emulator.process, cluster.api.process]
        if cluster.strict is not None:
            all_processes.append(cluster.strict.process)
        if cluster.lb is not None:
            all_processes.append(cluster.lb.process)
        all_processes += [s.process for s in cluster.sockets]
        for pod in nemesis.pods if nemesis else []:
            if pod.get("pid"):
                pgids.append(pod["pid"])
        await asyncio.to_thread(cluster.stop)
        pgids += [p.popen.pid for p in all_processes if p.popen is not None]
    # Killed processes take a moment to go (a SIGKILLed JVM closes its port as it exits).
    try:
        report["leftovers"] = await eventually(
            lambda: leftovers(pgids, ports),
            15,
            "every process and port of the run to be gone",
            interval_s=0.2,
            until=lambda left: not any(left.values()),
        )
    except WaitTimeout:
        report["leftovers"] = leftovers(pgids, ports)
    report["clients"] = {
        "total": args.clients,
        "py": len(specs["py"]),
        "browser": len(specs["browser"]),
        "sio": len(specs["sio"]),
        "channels": len(channels),
        "records": [str(w.out_path) for w in workers],
    }
    judge(report, messages)
    report["wall_s"] = time.monotonic() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = resource.getrusage(resource.RUSAGE_SELF)
    report["cpu_s"] = {
        "children": round(
            cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime, 1
        ),
        "runner": round(own.ru_utime + own.ru_stime, 1),
    }
    return write_report(report, out)


def judge(report: dict[str, Any], messages: dict[str, checker.Msg]) -> None:
    """The checker on a run's records; its results into the report."""
    say("checking ...")
    clients = load_records([Path(p) for p in report["clients"]["records"]])
    marks = pod_marks(report["pods"])
    result = checker.check(
        messages, clients, report["faults"], marks, checker.Settings(history_size=1000)
    )
    report["marks"] = marks
    report["check"] = {
        "deliveries": result.deliveries,
        "stretches": result.stretches,
        "recoveries": result.recoveries,
        "wire_duplicates": result.wire_duplicates,
        "messages_accepted": result.messages_accepted,
        "messages_unknown": result.messages_unknown,
    }
    report["violations"] = [v.as_dict() for v in result.violations]
    report["timeline"] = timeline(clients, report["load_started_ms"], report["load_ended_ms"])


def write_report(report: dict[str, Any], out: Path) -> int:
    seed = report["seed"]
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "timeline.svg").write_text(svg(report))
    text = table(report)
    (out / "table.md").write_text(text + "\n")
    for violation in report["violations"][:30]:
        say("VIOLATION", json.dumps(violation))
    say(text)
    say(f"report: {out / 'report.json'}  plot: {out / 'timeline.svg'}")
    left = report["leftovers"]
    ok = not report["violations"] and not left["processes"] and not left["ports"]
    say("SOAK " + ("PASSED" if ok else "FAILED") + f" (seed {seed})")
    return 0 if ok else 1


def recheck(out: Path) -> int:
    """The checker and the report again, on a finished run's records (e.g. after a checker
    change): `python -m devtools.soak --recheck DIR`."""
    report = json.loads((out / "report.json").read_text())
    report["clients"].setdefault("records", sorted(str(p) for p in out.glob("*clients-*.jsonl")))
    messages, _ = messages_from_log(out / "publish.jsonl")
    judge(report, messages)
    return write_report(report, out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.recheck is not None:
        return recheck(args.recheck)
    try:
        import uvloop

        return uvloop.run(soak(args))
    except ImportError:  # pragma: no cover
        return asyncio.run(soak(args))
