"""`make run`: the whole system on this machine until Ctrl-C or SIGTERM.

The Pub/Sub emulator (topic with retention), one api, two socket pods and HAProxy in front with
cookie affinity, as the Google load balancer does on GKE. Without the emulator: one process with
BROKER=memory. Ports: LB_PORT, API_PORT, SOCKET_PORTS, EMULATOR_PORT; topic retention:
TOPIC_RETENTION_S (3600). Every other service setting in the environment wins over the demo
values (devtools/demo.py).

Stopping: SIGINT and SIGTERM are read, never handled (devtools/lifetime.py), at any point, as
often as they come; a stop while starting undoes the start. Every child dies with this process,
even when it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from devtools.cluster import (
    TOPIC,
    TOPIC_RETENTION_S,
    ClusterConfig,
    LocalCluster,
    emulator_available,
    port_open,
)
from devtools.demo import (
    DEMO_ENV,
    DEMO_KEY,
    curl_authorization,
    demo_defaults,
    describe_credentials,
)
from devtools.lifetime import StopSignals, die_with_parent
from devtools.waiting import Interrupted

__all__ = ["DEMO_ENV", "DEMO_KEY", "main"]


def _ports() -> tuple[int, int, tuple[int, ...], int]:
    lb = int(os.environ.get("LB_PORT", "8000"))
    api = int(os.environ.get("API_PORT", "8080"))
    sockets = tuple(int(p) for p in os.environ.get("SOCKET_PORTS", "8081,8082").split(",") if p)
    emulator = int(os.environ.get("EMULATOR_PORT", "8085"))
    return lb, api, sockets, emulator


def _say(text: str) -> None:
    """Prints; a supervisor that closed our output must not keep us from stopping."""
    with contextlib.suppress(OSError):
        print(text, flush=True)


def main() -> int:
    stop = StopSignals()  # first: every child and thread inherits the blocked signals
    lb_port, api_port, socket_ports, emulator_port = _ports()
    busy = [p for p in (lb_port, api_port, *socket_ports, emulator_port) if port_open(p)]
    if busy:
        _say(f"ports already in use: {busy}; set LB_PORT, API_PORT, SOCKET_PORTS, EMULATOR_PORT")
        return 1
    defaults = demo_defaults(os.environ)
    if not emulator_available():
        return run_memory(stop, api_port, socket_ports[0], defaults)
    retention_s = int(float(os.environ.get("TOPIC_RETENTION_S", TOPIC_RETENTION_S)))
    cluster = LocalCluster(
        ClusterConfig(
            api_port=api_port,
            socket_ports=socket_ports,
            lb_port=lb_port,
            emulator_port=emulator_port,
            default_env=defaults,
            topic_retention_s=retention_s,
            strict=False,  # the plain emulator; the tests run on the strict stand-in
        )
    )
    _say("starting the Pub/Sub emulator, the api, socket pods and the load balancer ...")
    try:
        cluster.start(abort=stop.requested)
    except Interrupted:
        _say("stopped before everything was up")
        return 0
    try:
        _say(_banner(cluster, lb_port, api_port, socket_ports, emulator_port, defaults))
        stop.wait()
    finally:
        _say("stopping ...")
        cluster.stop()
        _say("stopped")
    return 0


def _banner(
    cluster: LocalCluster,
    lb_port: int,
    api_port: int,
    socket_ports: tuple[int, ...],
    emulator_port: int,
    defaults: dict[str, str],
) -> str:
    retention_s = cluster.config.topic_retention_s
    sockets = ", ".join(f"http://127.0.0.1:{p}" for p in socket_ports)
    auth = curl_authorization(defaults, os.environ)
    auth_header = f"-H 'Authorization: {auth}' " if auth else ""
    return "\n".join(
        [
            "",
            f"pubsock is running (logs in {cluster.work_dir})",
            f"  demo page        http://127.0.0.1:{lb_port}/          (open it in two tabs)",
            f"  publish API      http://127.0.0.1:{lb_port}/v1/...    "
            f"(docs: http://127.0.0.1:{api_port}/docs)",
            f"  websocket        ws://127.0.0.1:{lb_port}/ws",
            f"  event stream     http://127.0.0.1:{lb_port}/sse?channels=demo:lobby&token=...  "
            f"(demo page over SSE: /?transport=sse)",
            f"  socket pods      {sockets}",
            f"  emulator         127.0.0.1:{emulator_port} (project local-project, topic {TOPIC},"
            f" retention {retention_s} s)",
            *describe_credentials(os.environ, defaults),
            f"  try it           curl {auth_header}\\",
            "                     -H 'Content-Type: application/json'"
            """ -d '{"data": {"text": "hi"}}' \\""",
            f"                     http://127.0.0.1:{lb_port}/v1/channels/demo:lobby/messages",
            "Ctrl-C stops everything.",
        ]
    )


def run_memory(stop: StopSignals, api_port: int, socket_port: int, defaults: dict[str, str]) -> int:
    _say("the Pub/Sub emulator is not installed: running one process with BROKER=memory")
    env = {
        "PUBLIC_API_URL": f"http://127.0.0.1:{api_port}",
        **defaults,
        **os.environ,
        "BROKER": "memory",
        "HOST": "127.0.0.1",
        "API_PORT": str(api_port),
        "SOCKET_PORT": str(socket_port),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "devtools.single"], env=env, preexec_fn=die_with_parent()
    )
    _say(
        f"  demo page http://127.0.0.1:{socket_port}/   publish API http://127.0.0.1:{api_port}/v1/"
    )
    for line in describe_credentials(os.environ, defaults):
        _say(line)
    try:
        stop.wait()
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
