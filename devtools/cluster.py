"""A local pubsock cluster out of real processes: the Pub/Sub emulator, the api, socket pods and
HAProxy playing the Google load balancer (cookie affinity, health checks on /readyz, failover).

Every process runs in its own process group and is stopped with its children; ports are freed.
Every process also dies with the process that started it, even when that one is SIGKILLed
(devtools/lifetime.py): nothing outlives `make run` or a test run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from devtools.lifetime import die_with_parent
from devtools.waiting import Interrupted, WaitTimeout, never, wait_until

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "local-project"
TOPIC = "pubsock-messages"
TOPIC_RETENTION_S = 3600  # = HISTORY_AGE_S: a new pod can fill its whole history window
AFFINITY_COOKIE = "GCLB"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def http_status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=1.0).status_code
    except httpx.HTTPError:
        return None


@functools.cache
def emulator_launcher() -> Path | None:
    """The emulator's own start script in the gcloud SDK, or None where it is not installed.

    `gcloud beta emulators pubsub start` runs this script as a child of its own, which execs the
    JVM; started directly, the JVM is our child and dies with us (die_with_parent)."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    try:
        root = subprocess.run(
            [gcloud, "info", "--format=value(installation.sdk_root)"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    script = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return script if script.is_file() else None


def emulator_available() -> bool:
    return emulator_launcher() is not None


class Process:
    """A child process in its own group, logging to a file, stopped with all its children."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
            cwd=ROOT,
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.popen is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    def wait(self, timeout_s: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        code = self.wait(timeout_s)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(5)
        with contextlib.suppress(ProcessLookupError):  # stray children of the group
            os.killpg(self.popen.pid, signal.SIGKILL)
        return code

    def stop_async(self) -> None:
        """SIGTERM only; `stop` later waits (stop many processes in parallel)."""
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Emulator:
    """The Pub/Sub emulator's JVM (any project id works with it; ours is PROJECT)."""

    def __init__(self, port: int, log_dir: Path) -> None:
        self.port = port
        self.host = f"127.0.0.1:{port}"
        launcher = emulator_launcher()
        self.process = Process(
            f"emulator-{port}",
            [str(launcher or "cloud-pubsub-emulator"), "--host=127.0.0.1", f"--port={port}"],
            os.environ,
            log_dir,
        )

    def start(self, timeout_s: float = 60.0, abort: Callable[[], bool] = never) -> None:
        self.process.start()
        try:
            wait_until(
                lambda: port_open(self.port) or not self.process.running,
                timeout_s,
                "the Pub/Sub emulator",
                abort=abort,
            )
        except (TimeoutError, Interrupted):
            self.process.stop()
            raise
        if not self.process.running:
            raise RuntimeError(f"the emulator exited:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop(10)

    def create_topic(self, topic: str = TOPIC, retention_s: int = TOPIC_RETENTION_S) -> None:
        """Creates the topic as `make run` and `make deploy` do: with message retention
        (none for 0)."""
        with emulator_env(self.host):
            from google.api_core.exceptions import AlreadyExists
            from google.cloud import pubsub_v1

            client = pubsub_v1.PublisherClient()
            request: dict[str, object] = {"name": f"projects/{PROJECT}/topics/{topic}"}
            if retention_s > 0:
                request["message_retention_duration"] = {"seconds": retention_s}
            with contextlib.suppress(AlreadyExists):
                client.create_topic(request=request)
            client.stop()


class StrictPubSub:
    """The strict stand-in (devtools/strictpubsub) in front of the emulator: the services reach
    it as they reach Pub/Sub on GKE, with no PUBSUB_EMULATOR_HOST: TLS to PUBSUB_API_ENDPOINT,
    Application Default Credentials from a (fake) GCE metadata server."""

    def __init__(
        self, upstream: str, work_dir: Path, stream_lifetime: str = "10:40", seed: int = 0
    ) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.dir = work_dir / "strictpubsub"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "gcloud-config").mkdir(exist_ok=True)
        self.process = Process(
            "strictpubsub",
            [
                sys.executable,
                "-m",
                "devtools.strictpubsub",
                f"--upstream={upstream}",
                f"--port={self.port}",
                f"--admin-port={self.admin_port}",
                f"--dir={self.dir}",
                f"--project={PROJECT}",
                f"--stream-lifetime={stream_lifetime}",
                f"--seed={seed}",
            ],
            {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"},
            work_dir,
        )

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def env(self, account: str = "default") -> dict[str, str]:
        """What a service needs to reach the stand-in as it would reach Pub/Sub."""
        metadata = f"127.0.0.1:{self.admin_port}"
        if account != "default":
            metadata += f"/as/{account}"
        return {
            "PUBSUB_API_ENDPOINT": f"127.0.0.1:{self.port}",
            "GCE_METADATA_HOST": metadata,
            "GCE_METADATA_IP": metadata,
            "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(self.dir / "tls" / "ca.pem"),
            "CLOUDSDK_CONFIG": str(self.dir / "gcloud-config"),  # empty: ADC looks there first
        }

    def start(self, timeout_s: float = 30.0) -> None:
        self.process.start()
        try:
            wait_until(
                lambda: (
                    (port_open(self.port) and port_open(self.admin_port))
                    or not self.process.running
                ),
                timeout_s,
                "the strict Pub/Sub stand-in",
            )
        except TimeoutError:
            self.process.stop()
            raise
        if not self.process.running:
            raise RuntimeError(f"the stand-in exited:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop(10)

    def control(self, action: str, **params: object) -> dict[str, object]:
        """POST /control/<action> (close-streams, unavailable, stall, unstall, seek-fails)."""
        response = httpx.post(
            f"{self.admin_url}/control/{action}",
            params={k: str(v) for k, v in params.items()},
            timeout=10,
        )
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def state(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.admin_url}/control/state", timeout=10).json()
        return result


# Variables that would steer a service away from the stand-in's production path.
_NOT_FOR_STRICT = ("PUBSUB_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS")


@contextlib.contextmanager
def emulator_env(host: str) -> Iterator[None]:
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous


@dataclass
class Service:
    """An api or socket process on a port."""

    name: str
    module: str
    port: int
    env: dict[str, str]
    log_dir: Path
    process: Process = field(init=False)

    def __post_init__(self) -> None:
        self.process = Process(
            self.name, [sys.executable, "-m", self.module], self.env, self.log_dir
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, wait_ready: bool = True, timeout_s: float = 60.0) -> None:
        self.process.start()
        if wait_ready:
            try:
                self.wait_ready(timeout_s)
            except BaseException:
                self.process.stop(5)  # never leave a half-started process behind
                raise

    def wait_ready(self, timeout_s: float = 60.0, abort: Callable[[], bool] = never) -> None:
        try:
            wait_until(
                lambda: not self.process.running or http_status(f"{self.url}/readyz") == 200,
                timeout_s,
                f"{self.name} to be ready",
                abort=abort,
            )
        except TimeoutError as exc:
            raise WaitTimeout(f"{exc}\n{self.process.log_tail()}") from None
        if not self.process.running:
            raise RuntimeError(f"{self.name} exited:\n{self.process.log_tail()}")


HAPROXY_CONFIG = """\
global
    maxconn 8000
    pidfile {pidfile}

defaults
    mode http
    timeout connect 2s
    timeout client 650s
    timeout server 650s
    timeout tunnel 3700s
    timeout http-keep-alive 620s
    option redispatch
    retries 3

# The rest goes to the socket pods: the demo page, /ws, /socket.io/ and /sse. An SSE stream is a
# response that lasts (up to MAX_CONNECTION_AGE_S); the pods write at least a keep-alive comment
# every SSE_KEEPALIVE_S (15 s), far inside `timeout server` and `timeout client`. No stream needs
# the affinity cookie: its Last-Event-ID resumes it on any pod.
frontend pubsock
    bind 127.0.0.1:{port}
{frontend_rules}    acl to_api path_beg /v1/
    use_backend api if to_api
    default_backend socket

backend api
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 1s fall 2 rise 1
{api_servers}

backend socket
    balance roundrobin
    cookie {cookie} insert indirect nocache httponly
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 500ms fall 1 rise 1
{socket_servers}
"""


# A network that lets no websocket through (some corporate proxies): upgrades refused with 403.
DENY_WEBSOCKETS = """\
    acl websocket_upgrade hdr(upgrade) -i websocket
    http-request deny deny_status 403 if websocket_upgrade
"""


class LoadBalancer:
    """HAProxy in the GCLB's part: `/v1/` to the api, the rest to socket pods with a cookie.

    `deny_websockets` plays a proxy that refuses websocket upgrades (browsers fall back to SSE).
    """

    def __init__(
        self,
        port: int,
        api_ports: list[int],
        socket_ports: list[int],
        work_dir: Path,
        deny_websockets: bool = False,
        name: str = "haproxy",
    ) -> None:
        self.port = port
        self.config_path = work_dir / f"{name}.cfg"
        api = "\n".join(f"    server api{i} 127.0.0.1:{p}" for i, p in enumerate(api_ports, 1))
        sockets = "\n".join(
            f"    server socket-{i} 127.0.0.1:{p} cookie socket-{i}"
            for i, p in enumerate(socket_ports, 1)
        )
        self.config_path.write_text(
            HAPROXY_CONFIG.format(
                port=port,
                pidfile=work_dir / f"{name}.pid",
                frontend_rules=DENY_WEBSOCKETS if deny_websockets else "",
                cookie=AFFINITY_COOKIE,
                api_servers=api,
                socket_servers=sockets,
            )
        )
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.process = Process(
            name, [haproxy, "-db", "-f", str(self.config_path)], os.environ, work_dir
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, abort: Callable[[], bool] = never) -> None:
        self.process.start()
        wait_until(
            lambda: port_open(self.port) or not self.process.running,
            20,
            "HAProxy to listen",
            abort=abort,
        )
        if not self.process.running:
            raise RuntimeError(f"HAProxy exited:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop(5)


@dataclass
class ClusterConfig:
    api_port: int = 8080
    socket_ports: tuple[int, ...] = (8081, 8082)
    lb_port: int = 8000
    emulator_port: int = 8085
    # Over the environment (tests pin their settings with it).
    extra_env: dict[str, str] = field(default_factory=dict)
    # Under it: only where the environment does not set them (make run's demo values).
    default_env: dict[str, str] = field(default_factory=dict)
    # The retention the topic is created with; the socket pods are told (TOPIC_RETENTION_S).
    topic_retention_s: int = TOPIC_RETENTION_S
    socket_env: dict[str, str] = field(default_factory=dict)
    api_env: dict[str, str] = field(default_factory=dict)
    with_lb: bool = True
    # The services talk to the strict stand-in (TLS, ADC, the real service's rules) in front of
    # the emulator; False: straight to the emulator (make run, make bench).
    strict: bool = True
    stream_lifetime: str = "10:40"


class LocalCluster:
    """Emulator + topic + api + socket pods (+ HAProxy); stop() undoes everything start() did."""

    def __init__(self, config: ClusterConfig, work_dir: Path | None = None) -> None:
        self.config = config
        self._own_dir = work_dir is None
        self.work_dir = work_dir or Path(tempfile.mkdtemp(prefix="pubsock-"))
        self.emulator = Emulator(config.emulator_port, self.work_dir)
        self.strict = (
            StrictPubSub(self.emulator.host, self.work_dir, config.stream_lifetime)
            if config.strict
            else None
        )
        wiring = (
            self.strict.env()
            if self.strict is not None
            else {"PUBSUB_EMULATOR_HOST": self.emulator.host}
        )
        inherited = {
            k: v for k, v in os.environ.items() if self.strict is None or k not in _NOT_FOR_STRICT
        }
        base = {
            **config.default_env,
            **inherited,
            "BROKER": "pubsub",
            **wiring,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "PUBSUB_TOPIC": TOPIC,
            "HOST": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
            **config.extra_env,
        }
        self.api = Service(
            "api",
            "services.api",
            config.api_port,
            {**base, "PORT": str(config.api_port), **config.api_env},
            self.work_dir,
        )
        self.sockets = [
            Service(
                f"socket-{i}",
                "services.socket",
                port,
                {
                    **base,
                    "PORT": str(port),
                    "POD_NAME": f"socket-{i}",
                    "TOPIC_RETENTION_S": str(config.topic_retention_s),
                    **config.socket_env,
                },
                self.work_dir,
            )
            for i, port in enumerate(config.socket_ports, 1)
        ]
        self.lb = (
            LoadBalancer(
                config.lb_port, [config.api_port], list(config.socket_ports), self.work_dir
            )
            if config.with_lb
            else None
        )

    def new_api(self, name: str, port: int, **env: str) -> Service:
        """Another api on the same emulator, with settings of its own."""
        return Service(
            name, "services.api", port, {**self.api.env, "PORT": str(port), **env}, self.work_dir
        )

    def new_socket(self, name: str, port: int, **env: str) -> Service:
        """Another socket pod on the same emulator (e.g. a cold pod started later)."""
        return Service(
            name,
            "services.socket",
            port,
            {**self.sockets[0].env, "PORT": str(port), "POD_NAME": name, **env},
            self.work_dir,
        )

    def start(self, abort: Callable[[], bool] = never) -> None:
        """Starts everything, or nothing: on any failure, or Interrupted as soon as `abort()`
        is true, what was started is stopped again."""
        try:
            self.emulator.start(abort=abort)
            self.emulator.create_topic(retention_s=self.config.topic_retention_s)
            if self.strict is not None:
                self.strict.start()
            for service in (self.api, *self.sockets):
                if abort():
                    raise Interrupted("stopped while starting the services")
                service.start(wait_ready=False)
            for service in (self.api, *self.sockets):
                service.wait_ready(abort=abort)
            if self.lb is not None:
                self.lb.start(abort=abort)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.lb is not None:
            self.lb.stop()
        services = (*self.sockets, self.api)
        for service in services:  # all drain at once
            service.process.stop_async()
        for service in services:
            service.process.stop()
        if self.strict is not None:
            self.strict.stop()
        self.emulator.stop()
        if self._own_dir and not os.environ.get("PUBSOCK_KEEP_LOGS"):
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
