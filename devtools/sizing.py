"""Capacity and cost of a pubsock deployment, from the latest `make bench` results.

    python -m devtools.sizing --connections 100000 --messages-per-s 1000 --fanout 50
    python -m devtools.sizing --connections 10000 100000 1000000 --messages-per-s 10 100 1000

Every socket pod reads the whole topic (its own subscription), so every pod pays for every
message once (ingest) and for each of its local deliveries; presence announcements travel on the
same topic, so every pod also receives every pod's announcements. The model, its assumptions and
the sources of its prices are in docs/scaling.md; this module is that page's arithmetic.

The measured per-pod figures come from the newest full `bench/results/*.json` (or `--results`),
named in the output. Figures `make bench` does not measure (presence snapshot cost, history
entry size) are constants below with their provenance, and options to override them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.envelope import CHANNEL_ATTRIBUTE, KIND_ATTRIBUTE, PRESENCE_KIND, Envelope
from services.socket.presence import PART_MAX_BYTES
from services.socket.settings import SocketSettings

RESULTS_DIR = Path(__file__).resolve().parents[1] / "bench" / "results"

HOURS_PER_MONTH = 730  # Google's billing month
SECONDS_PER_MONTH = HOURS_PER_MONTH * 3600
GIB = 2**30
TIB = 2**40

# -- Pub/Sub billing rules (docs/scaling.md, "Sources") ---------------------------------------
MIN_BILLED_BYTES_PER_REQUEST = 1000  # "a minimum of 1000 bytes per publish, push or pull request"
PUBSUB_TIMESTAMP_BYTES = 20  # billed per message for its publish time
PUBSUB_MESSAGE_ID_BYTES = 16  # Pub/Sub's message ids are decimal strings of about 16 digits
ORDERING_KEY_MAX_BYTES_S = 1_000_000  # 1 MB/s per ordering key (= per channel)
STREAMING_PULL_MAX_BYTES_S = 10_000_000  # per stream; a pod opens one (unconfirmed, see docs)
PUBLISH_QUOTA_BYTES_S = 200_000_000  # per region, "large" regions; 50 MB/s in the others
SUBSCRIPTIONS_PER_TOPIC = 10_000

# -- What `make bench` does not measure (measured once, docs/scaling.md "What one pod holds") --
# One (channel, sub) entry of a presence snapshot: a 16-byte channel and a 24-byte sub in the
# announcement's JSON (services/socket/presence.py `_messages`, 20,000 entries: 69.0 B each).
PRESENCE_ENTRY_BYTES = 69.0
# CPU to apply one entry of another pod's snapshot (`Presence.on_announcement`, orjson parse
# included, an unchanged snapshot of 20,000 entries): 2.9-4.7 µs on the bench machine.
PRESENCE_ENTRY_US = 4.0
# Memory a pod holds per remote presence entry (tracemalloc, 5 pods x 20,000 entries).
PRESENCE_STATE_BYTES = 710.0
# A history entry beyond its frame (Entry, id, index slot; tracemalloc, 200,000 entries).
HISTORY_ENTRY_OVERHEAD_BYTES = 270.0
# A heartbeat/delta announcement: 59 B of JSON when nothing changed.
PRESENCE_DELTA_BYTES = 59.0
PRESENCE_POD_NAME_BYTES = 24  # ordering key `presence:<pod>`: a GKE pod name is about 24 chars

# -- Sizing policy -------------------------------------------------------------------------------
MIN_SOCKET_PODS = 2  # the HPA's minReplicas (k8s/base/autoscaling.yaml)
MIN_API_PODS = 2
MEMORY_HEADROOM = 0.8  # a pod's memory request is its estimate / 0.8, in 0.25 GiB steps
AUTOPILOT_MAX_GIB_PER_VCPU = 6.5  # Autopilot: 1 to 6.5 GiB per vCPU
API_POD_GIB = 1.0  # 1 vCPU / 1 GiB per api pod (Autopilot's smallest ratio)
SAMPLE_ID = "0" * 26  # a ULID, as the api assigns
SAMPLE_TS_MS = 1_764_000_000_000


@dataclass(frozen=True, slots=True)
class Prices:
    """List prices in USD (docs/scaling.md "Sources"); overridable on the command line."""

    vcpu_hour: float = 0.0445  # GKE Autopilot general-purpose pod, us-central1, read 2026-09
    gib_hour: float = 0.0049225  # same page, per GiB of memory
    cluster_hour: float = 0.10  # GKE cluster management fee
    pubsub_tib: float = 40.0  # Pub/Sub throughput (publish and delivery), per TiB
    pubsub_free_gib: float = 10.0  # free throughput per billing account and month
    storage_gib_month: float = 0.27  # messages retained by the topic


DEFAULT_PRICES = Prices()


@dataclass(frozen=True, slots=True)
class BenchFigures:
    """The per-pod figures `make bench` measured, as read from one results file."""

    path: Path
    date: str
    profile: str
    delivery_cpu_us: float  # socket pod CPU-µs per delivery, fan-out engine at its headline rate
    delivery_rate_msg_s: float  # that headline: messages/s ...
    delivery_subscribers: int  # ... to this many connections on one channel
    delivery_cpu_us_range: tuple[float, float]  # over every rate step the pod sustained
    max_deliveries_s: float  # highest delivery rate sustained (no loss, p99 within the limit)
    ingest_cpu_us: float  # socket pod CPU-µs per message taken from the subscription
    rss_per_connection_bytes: float  # RSS growth per idle subscribed connection
    rss_base_bytes: float  # the pod's RSS before those connections
    api_cpu_us: float  # api CPU-µs per accepted publish


@dataclass(frozen=True, slots=True)
class PodSettings:
    """The socket pod's defaults the model depends on (services/socket/settings.py)."""

    max_connections: int
    presence_interval_s: float
    presence_snapshot_s: float
    history_size: int
    history_age_s: float
    history_max_channels: int

    @classmethod
    def defaults(cls) -> PodSettings:
        fields = SocketSettings.model_fields

        def default(name: str) -> Any:
            return fields[name].default

        return cls(
            max_connections=int(default("max_connections")),
            presence_interval_s=float(default("presence_interval_s")),
            presence_snapshot_s=float(default("presence_snapshot_s")),
            history_size=int(default("history_size")),
            history_age_s=float(default("history_age_s")),
            history_max_channels=int(default("history_max_channels")),
        )


@dataclass(frozen=True, slots=True)
class Workload:
    """What is sized: connections, the topic's message rate and how far each message fans out."""

    connections: int
    messages_per_s: float
    fanout: float  # connections receiving each message, on average
    payload_bytes: int = 200  # the `data` of a message as JSON
    channel_bytes: int = 16
    subscriptions_per_connection: float = 1.0
    # Presence entries (channel, sub) per connection: one per subscription of an authenticated
    # connection (the default, None); anonymous connections on shared channels add far fewer.
    presence_entries_per_connection: float | None = None
    messages_per_request: float = 1.0  # per Publish and per pull response (1: worst case)
    target_utilization: float = 0.6  # of a pod's vCPU and of MAX_CONNECTIONS
    retention_s: float = 3600.0  # topic retention (make deploy: 1 h)
    presence_entry_bytes: float = PRESENCE_ENTRY_BYTES
    presence_entry_us: float = PRESENCE_ENTRY_US

    def __post_init__(self) -> None:
        if self.connections < 1 or self.messages_per_s < 0 or self.fanout < 0:
            raise ValueError("connections must be >= 1, messages/s and fanout >= 0")
        if self.fanout > self.connections:
            raise ValueError("fanout (subscribers per message) cannot exceed the connections")
        if not 0 < self.target_utilization <= 1:
            raise ValueError("target utilization must be in (0, 1]")
        if self.messages_per_request < 1:
            raise ValueError("messages per request must be >= 1")

    @property
    def deliveries_per_s(self) -> float:
        return self.messages_per_s * self.fanout

    @property
    def presence_entries(self) -> float:
        """(channel, sub) entries in all the pods' presence snapshots together."""
        per_connection = self.presence_entries_per_connection
        if per_connection is None:
            per_connection = self.subscriptions_per_connection
        return self.connections * per_connection


# -- message sizes --------------------------------------------------------------------------------
def envelope_bytes(payload_bytes: int, channel_bytes: int) -> int:
    """The message body as the api publishes it (services/core/envelope.py), for a `data` of
    `payload_bytes` of JSON on a channel named with `channel_bytes` characters."""
    body = Envelope(SAMPLE_ID, "c" * channel_bytes, None, SAMPLE_TS_MS).encode()
    return len(body) - len(b"null") + payload_bytes


def pubsub_message_bytes(body_bytes: int, channel_bytes: int) -> int:
    """A channel message's billable volume: body, attribute `channel`, timestamp, message id and
    the ordering key (counted as an optional field; the pricing page is not explicit)."""
    attribute = len(CHANNEL_ATTRIBUTE) + channel_bytes
    return body_bytes + attribute + PUBSUB_TIMESTAMP_BYTES + PUBSUB_MESSAGE_ID_BYTES + channel_bytes


def presence_overhead_bytes() -> int:
    """Billable volume of an announcement beyond its JSON body."""
    attribute = len(KIND_ATTRIBUTE) + len(PRESENCE_KIND)
    key = len("presence:") + PRESENCE_POD_NAME_BYTES
    return attribute + PUBSUB_TIMESTAMP_BYTES + PUBSUB_MESSAGE_ID_BYTES + key


def frame_bytes(body_bytes: int) -> int:
    """A server-to-client websocket text frame around `body_bytes` (RFC 6455 header)."""
    if body_bytes < 126:
        return body_bytes + 2
    if body_bytes < 65536:
        return body_bytes + 4
    return body_bytes + 10


def billed_bytes(requests_per_s: float, bytes_per_request: float) -> float:
    """Pub/Sub's billable volume: every request counts at least 1,000 bytes."""
    return requests_per_s * max(float(MIN_BILLED_BYTES_PER_REQUEST), bytes_per_request)


def pubsub_throughput_cost(gib_per_month: float, prices: Prices) -> float:
    """USD per month for that much publish + delivery volume, after the free tier."""
    return max(0.0, gib_per_month - prices.pubsub_free_gib) * GIB / TIB * prices.pubsub_tib


# -- the model ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Presence:
    """One pod's presence announcements (services/socket/presence.py): one per
    PRESENCE_INTERVAL_S, of which one per PRESENCE_SNAPSHOT_S is a full snapshot of every
    (channel, sub) the pod serves, in parts of at most PART_MAX_BYTES."""

    snapshot_bytes: float
    snapshot_parts: int
    announcements_per_s: float  # requests per pod and second (deltas and snapshot parts)
    bytes_per_s: float  # per pod: actual volume
    billed_bytes_per_s: float  # per pod: with the 1,000-byte minimum per request


def presence_per_pod(entries_per_pod: float, w: Workload, s: PodSettings) -> Presence:
    overhead = presence_overhead_bytes()
    snapshot = entries_per_pod * w.presence_entry_bytes + PRESENCE_DELTA_BYTES
    parts = max(1, math.ceil(snapshot / PART_MAX_BYTES))
    deltas_per_s = 1 / s.presence_interval_s - 1 / s.presence_snapshot_s  # a snapshot replaces one
    snapshots_per_s = 1 / s.presence_snapshot_s
    delta_bytes = PRESENCE_DELTA_BYTES + overhead
    snapshot_total = snapshot + parts * overhead
    return Presence(
        snapshot_bytes=snapshot,
        snapshot_parts=parts,
        announcements_per_s=deltas_per_s + parts * snapshots_per_s,
        bytes_per_s=deltas_per_s * delta_bytes + snapshots_per_s * snapshot_total,
        billed_bytes_per_s=billed_bytes(deltas_per_s, delta_bytes)
        + billed_bytes(parts * snapshots_per_s, snapshot_total / parts),
    )


@dataclass(frozen=True, slots=True)
class PodCpu:
    """One socket pod's CPU in µs per second, by what uses it."""

    ingest_us: float  # every channel message and every pod's announcements
    presence_us: float  # applying every other pod's snapshots
    deliveries_us: float  # writing the pod's share of the deliveries
    budget_us: float  # target utilization of one vCPU

    @property
    def total_us(self) -> float:
        return self.ingest_us + self.presence_us + self.deliveries_us


@dataclass(frozen=True, slots=True)
class PodMemory:
    base: float
    connections: float
    history: float
    history_entries: float
    presence: float

    @property
    def total(self) -> float:
        return self.base + self.connections + self.history + self.presence


@dataclass(frozen=True, slots=True)
class PubSubVolume:
    """Bytes per second through the topic; `*_billed` with the 1,000-byte minimum."""

    publish: float
    publish_billed: float
    subscribe: float
    subscribe_billed: float
    presence_publish: float
    presence_publish_billed: float
    presence_subscribe: float
    presence_subscribe_billed: float
    publish_requests_per_s: float
    per_pod_stream: float  # what one pod's StreamingPull carries

    @property
    def billed(self) -> float:
        return (
            self.publish_billed
            + self.subscribe_billed
            + self.presence_publish_billed
            + self.presence_subscribe_billed
        )

    @property
    def actual(self) -> float:
        return self.publish + self.subscribe + self.presence_publish + self.presence_subscribe


@dataclass(frozen=True, slots=True)
class Sizing:
    workload: Workload
    message_bytes: int  # billable volume of one channel message
    body_bytes: int
    pods: int
    pods_by_connections: int
    pods_by_cpu: int | None  # the fewest for CPU alone; None: no pod count fits (the ceiling)
    pods_by_deliveries: int
    fits: bool  # `pods` keeps every pod's CPU within the budget
    cpu: PodCpu
    memory: PodMemory
    vcpu_per_pod: float
    memory_gib_per_pod: float
    presence: Presence
    pubsub: PubSubVolume
    api_pods: int
    ceiling_messages_per_s: float  # topic rate at which ingest alone fills a pod's budget
    prices: Prices
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.fits

    @property
    def vcpu(self) -> float:
        return self.pods * self.vcpu_per_pod + self.api_pods

    @property
    def memory_gib(self) -> float:
        return self.pods * self.memory_gib_per_pod + self.api_pods * API_POD_GIB

    @property
    def pubsub_gib_month(self) -> float:
        return self.pubsub.billed * SECONDS_PER_MONTH / GIB

    @property
    def presence_gib_month(self) -> float:
        billed = self.pubsub.presence_publish_billed + self.pubsub.presence_subscribe_billed
        return billed * SECONDS_PER_MONTH / GIB

    @property
    def egress_gib_month(self) -> float:
        """Websocket frames to the clients (internet egress, not priced here)."""
        frame = frame_bytes(self.body_bytes)
        return self.workload.deliveries_per_s * frame * SECONDS_PER_MONTH / GIB

    @property
    def pubsub_cost(self) -> float:
        stored_gib = (self.pubsub.publish + self.pubsub.presence_publish) * (
            self.workload.retention_s / GIB
        )
        storage = stored_gib * self.prices.storage_gib_month
        return pubsub_throughput_cost(self.pubsub_gib_month, self.prices) + storage

    @property
    def compute_cost(self) -> float:
        p = self.prices
        hourly = self.vcpu * p.vcpu_hour + self.memory_gib * p.gib_hour + p.cluster_hour
        return hourly * HOURS_PER_MONTH


def _round_up(value: float, step: float) -> float:
    return math.ceil(value / step - 1e-9) * step


def pod_cpu(pods: int, w: Workload, s: PodSettings, bench: BenchFigures) -> tuple[PodCpu, Presence]:
    """CPU of each of `pods` socket pods: the message load is the same on all of them, the
    deliveries are shared."""
    entries = w.presence_entries
    presence = presence_per_pod(entries / pods, w, s)
    ingested_per_s = w.messages_per_s + pods * presence.announcements_per_s
    cpu = PodCpu(
        ingest_us=ingested_per_s * bench.ingest_cpu_us,
        presence_us=entries / s.presence_snapshot_s * w.presence_entry_us,
        deliveries_us=w.deliveries_per_s / pods * bench.delivery_cpu_us,
        budget_us=w.target_utilization * 1e6,
    )
    return cpu, presence


def pods_by_cpu(start: int, w: Workload, s: PodSettings, bench: BenchFigures) -> int | None:
    """The fewest pods (>= start) whose CPU stays within the budget, or None when none does:
    deliveries shrink with more pods, ingest does not, and presence ingest grows."""
    pods = max(1, start)
    while pods <= 1_000_000:
        cpu, _ = pod_cpu(pods, w, s, bench)
        if cpu.total_us <= cpu.budget_us:
            return pods
        if cpu.ingest_us + cpu.presence_us >= cpu.budget_us:
            return None  # more pods only add presence ingest
        spare = cpu.budget_us - cpu.ingest_us - cpu.presence_us
        pods = max(pods + 1, math.ceil(w.deliveries_per_s * bench.delivery_cpu_us / spare))
    return None


def size(
    w: Workload,
    bench: BenchFigures,
    settings: PodSettings | None = None,
    prices: Prices | None = None,
) -> Sizing:
    """Pods, vCPU, memory and Pub/Sub volume and cost for one workload."""
    s = settings or PodSettings.defaults()
    p = prices or Prices()
    notes: list[str] = []
    body = envelope_bytes(w.payload_bytes, w.channel_bytes)
    message = pubsub_message_bytes(body, w.channel_bytes)

    by_connections = math.ceil(w.connections / (s.max_connections * w.target_utilization))
    by_deliveries = math.ceil(w.deliveries_per_s / bench.max_deliveries_s)
    start = max(MIN_SOCKET_PODS, by_connections, by_deliveries)
    by_cpu = pods_by_cpu(1, w, s, bench)
    # More pods than CPU needs add presence ingest to each: check the final count too.
    fitted = None if by_cpu is None else pods_by_cpu(max(start, by_cpu), w, s, bench)
    pods = start if fitted is None else fitted
    cpu, presence = pod_cpu(pods, w, s, bench)
    if fitted is None:
        notes.append(
            "does not fit: ingest and presence alone exceed a pod's CPU budget "
            f"({(cpu.ingest_us + cpu.presence_us) / cpu.budget_us:.0%}); see the ceiling"
        )

    entries = w.presence_entries
    history_entries = min(
        w.messages_per_s * s.history_age_s, float(s.history_max_channels * s.history_size)
    )
    memory = PodMemory(
        base=bench.rss_base_bytes,
        connections=w.connections / pods * bench.rss_per_connection_bytes,
        history=history_entries * (frame_bytes(body) + HISTORY_ENTRY_OVERHEAD_BYTES),
        history_entries=history_entries,
        presence=entries * PRESENCE_STATE_BYTES,
    )
    memory_gib = max(1.0, _round_up(memory.total / MEMORY_HEADROOM / GIB, 0.25))
    vcpu_per_pod = max(1.0, _round_up(memory_gib / AUTOPILOT_MAX_GIB_PER_VCPU, 0.25))
    if vcpu_per_pod > 1:
        notes.append(
            f"memory {memory_gib:g} GiB per pod needs {vcpu_per_pod:g} vCPU on Autopilot "
            f"(at most {AUTOPILOT_MAX_GIB_PER_VCPU} GiB per vCPU); one event loop uses one"
        )

    per_request = w.messages_per_request * message
    requests = w.messages_per_s / w.messages_per_request
    publish_billed = billed_bytes(requests, per_request)
    pubsub = PubSubVolume(
        publish=w.messages_per_s * message,
        publish_billed=publish_billed,
        subscribe=pods * w.messages_per_s * message,
        subscribe_billed=pods * publish_billed,
        presence_publish=pods * presence.bytes_per_s,
        presence_publish_billed=pods * presence.billed_bytes_per_s,
        presence_subscribe=pods * pods * presence.bytes_per_s,
        presence_subscribe_billed=pods * pods * presence.billed_bytes_per_s,
        publish_requests_per_s=requests,
        per_pod_stream=w.messages_per_s * message + pods * presence.bytes_per_s,
    )
    if pubsub.per_pod_stream > STREAMING_PULL_MAX_BYTES_S:
        notes.append(
            f"each pod's StreamingPull carries {pubsub.per_pod_stream / 1e6:.1f} MB/s, over the "
            f"{STREAMING_PULL_MAX_BYTES_S / 1e6:.0f} MB/s per stream"
        )
    if pubsub.publish + pubsub.presence_publish > PUBLISH_QUOTA_BYTES_S:
        notes.append("publish volume is over the default regional quota (200 MB/s)")
    if pods > SUBSCRIPTIONS_PER_TOPIC:
        notes.append(f"more pods than subscriptions a topic allows ({SUBSCRIPTIONS_PER_TOPIC:,})")

    api_vcpu = w.messages_per_s * bench.api_cpu_us / (w.target_utilization * 1e6)
    api_pods = max(MIN_API_PODS, math.ceil(api_vcpu))
    presence_ingest = pods * presence.announcements_per_s * bench.ingest_cpu_us
    ceiling = (cpu.budget_us - cpu.presence_us - presence_ingest) / bench.ingest_cpu_us
    return Sizing(
        workload=w,
        message_bytes=message,
        body_bytes=body,
        pods=pods,
        pods_by_connections=by_connections,
        pods_by_cpu=by_cpu,
        pods_by_deliveries=by_deliveries,
        fits=fitted is not None,
        cpu=cpu,
        memory=memory,
        vcpu_per_pod=vcpu_per_pod,
        memory_gib_per_pod=memory_gib,
        presence=presence,
        pubsub=pubsub,
        api_pods=api_pods,
        ceiling_messages_per_s=max(0.0, ceiling),
        prices=p,
        notes=notes,
    )


# -- bench results --------------------------------------------------------------------------------
class ResultsError(Exception):
    """No usable bench results file."""


SCENARIOS_READ = ("fanout", "memory", "ingest", "publish_api")


def latest_results(directory: Path = RESULTS_DIR) -> Path:
    """The newest full `make bench` results file in `directory` (quick smoke runs and runs of
    some scenarios only skipped)."""
    newest: tuple[str, str, Path] | None = None
    for path in directory.glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("profile") != "full":
            continue
        measured = data.get("results")
        if not isinstance(measured, dict) or not all(k in measured for k in SCENARIOS_READ):
            continue  # a run of some scenarios only (`python -m bench --only ...`)
        key = (str(data.get("date", "")), path.name, path)
        if newest is None or key[:2] > newest[:2]:
            newest = key
    if newest is None:
        raise ResultsError(f"no full `make bench` results (*.json) in {directory}")
    return newest[2]


def load_bench(path: Path) -> BenchFigures:
    """Reads the per-pod figures from a `make bench` results file (bench/report.py's layout)."""
    try:
        data = json.loads(path.read_text())
        results = data["results"]
        fanout = results["fanout"]["summary"]
        headline = fanout["pubsock_at_headline"]
        steps = [
            float(step["server_cpu_us_per_delivery"])
            for step in results["fanout"]["steps"]["pubsock"]
            if step.get("ok")
        ]
        memory = results["memory"]["pubsock"]
        return BenchFigures(
            path=path,
            date=str(data["date"]),
            profile=str(data.get("profile", "")),
            delivery_cpu_us=float(headline["server_cpu_us_per_delivery"]),
            delivery_rate_msg_s=float(headline["rate_msg_s"]),
            delivery_subscribers=int(headline["subscribers"]),
            delivery_cpu_us_range=(min(steps), max(steps)),
            max_deliveries_s=float(fanout["pubsock_max_sustained_s"]),
            ingest_cpu_us=float(results["ingest"]["pubsock"]["cpu_us_per_message"]),
            rss_per_connection_bytes=float(memory["rss_per_connection_bytes"]),
            rss_base_bytes=float(memory["rss_before_bytes"]),
            api_cpu_us=float(results["publish_api"]["pubsock"]["cpu_us_per_publish"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ResultsError(f"{path}: not a usable `make bench` results file ({exc!r})") from exc


# -- output ---------------------------------------------------------------------------------------
def _n(value: float) -> str:
    return f"{value:,.0f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:,.1f} MiB" if value < GIB else f"{value / GIB:,.2f} GiB"


def _usd(value: float) -> str:
    return f"${value:,.0f}"


def describe_inputs(bench: BenchFigures, w: Workload, s: PodSettings, prices: Prices) -> list[str]:
    body = envelope_bytes(w.payload_bytes, w.channel_bytes)
    low, high = bench.delivery_cpu_us_range
    return [
        f"bench results: {bench.path} (make bench, {bench.profile}, {bench.date})",
        f"  per socket pod: {bench.delivery_cpu_us:.1f} CPU-µs per delivery (fan-out at "
        f"{bench.delivery_rate_msg_s:g} msg/s x {bench.delivery_subscribers:,}; "
        f"{low:.1f}-{high:.1f} over the rates), {_n(bench.max_deliveries_s)} deliveries/s "
        f"sustained, {bench.ingest_cpu_us:.0f} CPU-µs per ingested message, "
        f"{bench.rss_per_connection_bytes / 1024:.2f} KiB RSS per idle connection; "
        f"api {bench.api_cpu_us:,.0f} CPU-µs per publish",
        f"  pod settings: MAX_CONNECTIONS {s.max_connections:,}, presence every "
        f"{s.presence_interval_s:g} s (snapshot every {s.presence_snapshot_s:g} s), history "
        f"{s.history_size:,} per channel for {s.history_age_s:g} s "
        f"(at most {s.history_max_channels:,} channels)",
        f"  assumed: payload {w.payload_bytes} B -> envelope {body} B -> Pub/Sub message "
        f"{pubsub_message_bytes(body, w.channel_bytes)} B; {w.messages_per_request:g} message(s) "
        f"per Publish / pull response (each billed >= {MIN_BILLED_BYTES_PER_REQUEST:,} B); "
        f"{w.subscriptions_per_connection:g} subscription(s) per connection; presence entry "
        f"{w.presence_entry_bytes:g} B, {w.presence_entry_us:g} µs; target "
        f"{w.target_utilization:.0%} of 1 vCPU and of MAX_CONNECTIONS per pod",
        f"  prices (USD, list): Autopilot ${prices.vcpu_hour}/vCPU-h, ${prices.gib_hour}/GiB-h, "
        f"cluster ${prices.cluster_hour}/h; Pub/Sub ${prices.pubsub_tib:g}/TiB after "
        f"{prices.pubsub_free_gib:g} GiB/month, storage ${prices.storage_gib_month}/GiB-month "
        "(sources and dates: docs/scaling.md)",
    ]


TABLE_HEADER = (
    "| connections | msg/s | fanout | deliveries/s | socket pods | api pods | vCPU | memory GiB "
    "| Pub/Sub GiB/month (presence) | Pub/Sub $/month | compute $/month | total $/month |"
)
TABLE_RULE = "|" + " --- |" * 12


def table_row(r: Sizing) -> str:
    w = r.workload
    cells = [_n(w.connections), _n(w.messages_per_s), f"{w.fanout:,g}", _n(w.deliveries_per_s)]
    if not r.feasible:
        return "| " + " | ".join([*cells, "does not fit (ceiling)", *["-"] * 7]) + " |"
    cells += [
        f"{r.pods:,}",
        str(r.api_pods),
        f"{r.vcpu:,.0f}",
        f"{r.memory_gib:,.0f}",
        f"{_n(r.pubsub_gib_month)} ({_n(r.presence_gib_month)})",
        _usd(r.pubsub_cost),
        _usd(r.compute_cost),
        _usd(r.pubsub_cost + r.compute_cost),
    ]
    return "| " + " | ".join(cells) + " |"


def describe(r: Sizing, bench: BenchFigures, s: PodSettings) -> list[str]:
    """The arithmetic behind one row."""
    w, c, m, v = r.workload, r.cpu, r.memory, r.pubsub
    by_cpu = "none fits" if r.pods_by_cpu is None else f"{r.pods_by_cpu:,}"
    util = w.target_utilization
    lines = [
        f"{_n(w.connections)} connections, {_n(w.messages_per_s)} msg/s, fanout {w.fanout:,g}:",
        f"  pods = max(connections {_n(w.connections)} / ({s.max_connections:,} x {util:g}) -> "
        f"{r.pods_by_connections:,}, CPU -> {by_cpu}, "
        f"deliveries / {_n(bench.max_deliveries_s)} -> {r.pods_by_deliveries:,}, "
        f"minimum {MIN_SOCKET_PODS}) = {r.pods:,}",
        f"  CPU per pod (µs/s): ingest ({_n(w.messages_per_s)} + "
        f"{_n(r.pods * r.presence.announcements_per_s)} presence) msg/s x "
        f"{bench.ingest_cpu_us:g} = {_n(c.ingest_us)}; presence snapshots "
        f"{_n(w.presence_entries / s.presence_snapshot_s)} "
        f"entries/s x "
        f"{w.presence_entry_us:g} = {_n(c.presence_us)}; deliveries "
        f"{_n(w.deliveries_per_s / r.pods)}/s x {bench.delivery_cpu_us:.1f} = "
        f"{_n(c.deliveries_us)}; total {_n(c.total_us)} of {_n(c.budget_us)} "
        f"({c.total_us / 1e6:.0%} of a vCPU)",
        f"  ceiling: every pod ingests every message; at this size ingest alone fills a pod at "
        f"{_n(r.ceiling_messages_per_s)} msg/s (with no presence and no deliveries: "
        f"{_n(c.budget_us / bench.ingest_cpu_us)})",
        f"  memory per pod: base {_mib(m.base)} + connections {_mib(m.connections)} + history "
        f"{_n(m.history_entries)} entries {_mib(m.history)} + presence state {_mib(m.presence)} "
        f"= {_mib(m.total)} -> request {r.vcpu_per_pod:g} vCPU / {r.memory_gib_per_pod:g} GiB",
        f"  Pub/Sub bytes/s (billed): publish {_n(v.publish_requests_per_s)} requests "
        f"{_n(v.publish_billed)}, subscribe {r.pods:,} pods x that {_n(v.subscribe_billed)}, "
        f"presence publish {r.pods:,} pods x {_n(r.presence.billed_bytes_per_s)} = "
        f"{_n(v.presence_publish_billed)}, presence subscribe {r.pods:,} x {r.pods:,} x that = "
        f"{_n(v.presence_subscribe_billed)}; actual volume {_n(v.actual)} "
        f"(snapshot {_mib(r.presence.snapshot_bytes)} per pod in "
        f"{r.presence.snapshot_parts} part(s))",
        f"  limits: one pod's StreamingPull {v.per_pod_stream / 1e6:.2f} MB/s (10 MB/s per "
        f"stream); a channel at most {_n(ORDERING_KEY_MAX_BYTES_S / r.message_bytes)} msg/s "
        f"(1 MB/s per ordering key); {r.pods:,} of {SUBSCRIPTIONS_PER_TOPIC:,} subscriptions",
        f"  not priced: websocket egress to the clients, {_n(w.deliveries_per_s)} deliveries/s x "
        f"{frame_bytes(r.body_bytes)} B = {r.egress_gib_month / 1024:,.1f} TiB/month",
    ]
    lines.extend(f"  ! {note}" for note in r.notes)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.sizing",
        description="Socket pods, vCPU, memory and Pub/Sub cost for a pubsock deployment, from "
        "the latest `make bench` results (docs/scaling.md).",
    )
    parser.add_argument("--connections", type=int, nargs="+", required=True)
    parser.add_argument("--messages-per-s", type=float, nargs="+", required=True)
    parser.add_argument(
        "--fanout", type=float, required=True, help="connections receiving each message (mean)"
    )
    parser.add_argument("--results", type=Path, help="a bench results file (default: newest)")
    parser.add_argument("--message-bytes", type=int, default=200, help="payload (`data`) bytes")
    parser.add_argument("--channel-bytes", type=int, default=16)
    parser.add_argument("--subscriptions-per-connection", type=float, default=1.0)
    parser.add_argument(
        "--presence-entries-per-connection",
        type=float,
        help="(channel, sub) presence entries per connection (default: its subscriptions)",
    )
    parser.add_argument(
        "--messages-per-request",
        type=float,
        default=1.0,
        help="messages per Publish and per pull response (1: each billed >= 1,000 B)",
    )
    parser.add_argument("--target-utilization", type=float, default=0.6)
    parser.add_argument("--retention-s", type=float, default=3600.0)
    parser.add_argument("--presence-entry-bytes", type=float, default=PRESENCE_ENTRY_BYTES)
    parser.add_argument("--presence-entry-us", type=float, default=PRESENCE_ENTRY_US)
    parser.add_argument("--vcpu-hour", type=float, default=DEFAULT_PRICES.vcpu_hour)
    parser.add_argument("--gib-hour", type=float, default=DEFAULT_PRICES.gib_hour)
    parser.add_argument("--pubsub-tib", type=float, default=DEFAULT_PRICES.pubsub_tib)
    args = parser.parse_args(argv)

    try:
        bench = load_bench(args.results or latest_results())
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings = PodSettings.defaults()
    prices = Prices(vcpu_hour=args.vcpu_hour, gib_hour=args.gib_hour, pubsub_tib=args.pubsub_tib)
    try:
        workloads = [
            Workload(
                connections=connections,
                messages_per_s=rate,
                fanout=args.fanout,
                payload_bytes=args.message_bytes,
                channel_bytes=args.channel_bytes,
                subscriptions_per_connection=args.subscriptions_per_connection,
                presence_entries_per_connection=args.presence_entries_per_connection,
                messages_per_request=args.messages_per_request,
                target_utilization=args.target_utilization,
                retention_s=args.retention_s,
                presence_entry_bytes=args.presence_entry_bytes,
                presence_entry_us=args.presence_entry_us,
            )
            for connections in args.connections
            for rate in args.messages_per_s
        ]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    rows = [size(w, bench, settings, prices) for w in workloads]
    out = describe_inputs(bench, workloads[0], settings, prices)
    out += ["", TABLE_HEADER, TABLE_RULE, *map(table_row, rows), ""]
    for row in rows:
        out += [*describe(row, bench, settings), ""]
    print("\n".join(out).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
