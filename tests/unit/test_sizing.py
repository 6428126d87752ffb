"""devtools/sizing.py: the capacity and cost formulas on hand-checked inputs, reading `make bench`
results, and the calculator's output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devtools import sizing
from devtools.sizing import (
    BenchFigures,
    PodSettings,
    Prices,
    ResultsError,
    Workload,
    billed_bytes,
    envelope_bytes,
    frame_bytes,
    latest_results,
    load_bench,
    pod_cpu,
    pods_by_cpu,
    presence_per_pod,
    pubsub_message_bytes,
    pubsub_throughput_cost,
    size,
)
from services.core.envelope import Envelope

MIB = 2**20

# Round figures, so that every expected value below can be checked by hand.
BENCH = BenchFigures(
    path=Path("bench/results/test.json"),
    date="2026-01-01T00:00:00",
    profile="full",
    delivery_cpu_us=10.0,
    delivery_rate_msg_s=75,
    delivery_subscribers=1000,
    delivery_cpu_us_range=(5.0, 20.0),
    max_deliveries_s=100_000.0,
    ingest_cpu_us=50.0,
    rss_per_connection_bytes=8192.0,
    rss_base_bytes=50.0 * MIB,
    api_cpu_us=1000.0,
)
SETTINGS = PodSettings(
    max_connections=10_000,
    presence_interval_s=1.0,
    presence_snapshot_s=10.0,
    history_size=1000,
    history_age_s=3600.0,
    history_max_channels=10_000,
)


def workload(**overrides: Any) -> Workload:
    values: dict[str, Any] = {
        "connections": 10_000,
        "messages_per_s": 100.0,
        "fanout": 10.0,
        "target_utilization": 0.5,
    }
    values.update(overrides)
    return Workload(**values)


# -- message sizes and billing ---------------------------------------------------------------------
def test_envelope_size_matches_the_real_envelope() -> None:
    # {"id":"<26>","channel":"<16>","data":<200>,"ts":<13>} = 75 + 16 + 200
    assert envelope_bytes(200, 16) == 291
    real = Envelope("0" * 26, "c" * 16, "x" * 198, 1_764_000_000_000).encode()  # "x..." is 200 B
    assert len(real) == 291


def test_pubsub_message_volume() -> None:
    # body 291 + attribute "channel"=16 chars (7 + 16) + timestamp 20 + message id 16 + key 16
    assert pubsub_message_bytes(291, 16) == 366


def test_every_request_is_billed_at_least_1000_bytes() -> None:
    assert billed_bytes(10, 366) == 10_000
    assert billed_bytes(2, 1500) == 3000


def test_throughput_cost_after_the_free_tier() -> None:
    prices = Prices()
    assert pubsub_throughput_cost(10.0, prices) == 0
    assert pubsub_throughput_cost(1034.0, prices) == pytest.approx(40.0)  # 1 TiB after 10 GiB


def test_websocket_frame_header() -> None:
    assert frame_bytes(125) == 127
    assert frame_bytes(126) == 130
    assert frame_bytes(65536) == 65546


# -- presence --------------------------------------------------------------------------------------
def test_presence_of_one_pod() -> None:
    w = workload()
    presence = presence_per_pod(5000, w, SETTINGS)
    # 5,000 entries x 69 B + the 59 B header; parts of at most 256 KiB
    assert presence.snapshot_bytes == 5000 * 69 + 59
    assert presence.snapshot_parts == 2
    # 0.9 deltas a second (the snapshot replaces every tenth) + 2 parts every 10 s
    assert presence.announcements_per_s == pytest.approx(1.1)
    overhead = sizing.presence_overhead_bytes()
    assert presence.billed_bytes_per_s == pytest.approx(0.9 * 1000 + (345_059 + 2 * overhead) / 10)


def test_presence_traffic_grows_with_the_square_of_the_pods() -> None:
    # Heartbeats only (no entries): each pod publishes 1 announcement/s, billed 1,000 B.
    small = size(workload(presence_entries_per_connection=0.0), BENCH, SETTINGS)
    big = size(workload(connections=20_000, presence_entries_per_connection=0.0), BENCH, SETTINGS)
    assert (small.pods, big.pods) == (2, 4)
    assert small.presence.billed_bytes_per_s == pytest.approx(1000)
    assert small.pubsub.presence_subscribe_billed == pytest.approx(2 * 2 * 1000)
    assert big.pubsub.presence_subscribe_billed == pytest.approx(4 * 4 * 1000)


# -- pods, CPU, memory ------------------------------------------------------------------------------
def test_cpu_of_each_pod() -> None:
    cpu, presence = pod_cpu(2, workload(), SETTINGS, BENCH)
    assert presence.announcements_per_s == pytest.approx(1.1)
    assert cpu.ingest_us == pytest.approx((100 + 2 * 1.1) * 50)  # every message, on every pod
    assert cpu.presence_us == pytest.approx(10_000 / 10 * 4.0)  # every pod's snapshot entries
    assert cpu.deliveries_us == pytest.approx(1000 / 2 * 10)  # its share of 100 x 10 deliveries
    assert cpu.budget_us == 500_000


def test_pods_by_connections() -> None:
    r = size(workload(connections=100_000), BENCH, SETTINGS)
    assert r.pods_by_connections == 20  # 100,000 / (10,000 x 0.5)
    assert r.pods == 20


def test_pods_by_cpu_is_the_fewest_that_fit() -> None:
    # 1,000 msg/s to 1,000 connections each: 1,000,000 deliveries/s x 10 µs = 10 CPU-s/s.
    w = workload(connections=1000, messages_per_s=1000.0, fanout=1000.0)
    r = size(w, BENCH, SETTINGS)
    assert r.pods_by_deliveries == 10  # 1,000,000 / 100,000 measured
    assert r.pods_by_cpu is not None and r.pods == r.pods_by_cpu
    assert pod_cpu(r.pods, w, SETTINGS, BENCH)[0].total_us <= 500_000
    assert pod_cpu(r.pods - 1, w, SETTINGS, BENCH)[0].total_us > 500_000
    # ingest 1,000 x 50 = 50,000 of 500,000 µs: about 10e6 / 450,000 pods
    assert r.pods == 23


def test_the_ingest_ceiling() -> None:
    # 10,000 msg/s x 50 µs fills the 500,000 µs budget of every pod, whatever the pod count.
    w = workload(messages_per_s=10_000.0, fanout=1.0)
    assert pods_by_cpu(1, w, SETTINGS, BENCH) is None
    r = size(w, BENCH, SETTINGS)
    assert not r.feasible
    assert "does not fit" in sizing.table_row(r)
    fits = size(workload(messages_per_s=5_000.0, fanout=1.0), BENCH, SETTINGS)
    assert fits.feasible
    # (500,000 - presence 4,000 - 2 pods x 1.1 announcements x 50) / 50
    assert fits.ceiling_messages_per_s == pytest.approx((500_000 - 4_000 - 110) / 50)


def test_pods_needed_for_connections_can_break_the_cpu_budget() -> None:
    # 9,000 msg/s x 50 µs fits a pod, but 2,000 pods (for the connections) announce 2,000
    # presence messages a second that every pod ingests too: (9,000 + 2,000) x 50 > 500,000.
    w = workload(
        connections=10_000_000,
        messages_per_s=9000.0,
        fanout=1.0,
        presence_entries_per_connection=0.0,
    )
    r = size(w, BENCH, SETTINGS)
    assert r.pods_by_cpu is not None and r.pods_by_cpu < 10
    assert r.pods_by_connections == 2000
    assert not r.feasible


def test_memory_of_each_pod() -> None:
    r = size(workload(), BENCH, SETTINGS)
    m = r.memory
    assert m.base == 50 * MIB
    assert m.connections == 5000 * 8192  # 10,000 connections on 2 pods
    assert m.history_entries == 360_000  # 100 msg/s for HISTORY_AGE_S
    assert m.history == 360_000 * (295 + sizing.HISTORY_ENTRY_OVERHEAD_BYTES)
    assert m.presence == 10_000 * sizing.PRESENCE_STATE_BYTES
    # 50 + 39 + 194 + 7 MiB = 290 MiB, / 0.8 -> 0.35 GiB -> Autopilot's 1 GiB per vCPU
    assert r.memory_gib_per_pod == 1.0
    history_capped = size(workload(messages_per_s=5000.0, fanout=1.0), BENCH, SETTINGS)
    assert history_capped.memory.history_entries == 10_000_000  # 10,000 channels x 1,000


def test_pubsub_volume_and_cost() -> None:
    r = size(workload(), BENCH, SETTINGS)
    v = r.pubsub
    assert v.publish_requests_per_s == 100  # one message per Publish (one channel per request)
    assert v.publish_billed == 100 * 1000  # 366 B each, billed 1,000
    assert v.subscribe_billed == 2 * 100 * 1000  # every pod receives every message
    assert v.presence_subscribe_billed == pytest.approx(2 * v.presence_publish_billed)
    gib = v.billed * sizing.SECONDS_PER_MONTH / 2**30
    assert r.pubsub_gib_month == pytest.approx(gib)
    storage = (v.publish + v.presence_publish) * 3600 / 2**30 * 0.27
    assert r.pubsub_cost == pytest.approx((gib - 10) / 1024 * 40 + storage)
    # websocket egress, not priced: 1,000 deliveries/s of a 295-byte frame
    assert r.egress_gib_month == pytest.approx(1000 * 295 * sizing.SECONDS_PER_MONTH / 2**30)
    # 2 socket pods (1 vCPU, 1 GiB) + 2 api pods (1 vCPU, 1 GiB) + the cluster fee
    assert r.compute_cost == pytest.approx((4 * 0.0445 + 4 * 0.0049225 + 0.10) * 730)


def test_batched_requests_are_billed_at_their_size() -> None:
    r = size(workload(messages_per_request=10.0), BENCH, SETTINGS)
    assert r.pubsub.publish_requests_per_s == 10
    assert r.pubsub.publish_billed == pytest.approx(10 * 3660)


def test_workload_checks() -> None:
    with pytest.raises(ValueError):
        workload(fanout=20_000.0)
    with pytest.raises(ValueError):
        workload(target_utilization=0.0)


# -- bench results ----------------------------------------------------------------------------------
def results(date: str, profile: str = "full") -> dict[str, Any]:
    """The parts of a `make bench` results file the calculator reads (bench/report.py)."""
    step = {"server_cpu_us_per_delivery": 12.0, "ok": True}
    return {
        "date": date,
        "profile": profile,
        "results": {
            "fanout": {
                "summary": {
                    "pubsock_at_headline": {
                        "rate_msg_s": 75,
                        "subscribers": 1000,
                        "server_cpu_us_per_delivery": 10.5,
                    },
                    "pubsock_max_sustained_s": 146_000.0,
                },
                "steps": {
                    "pubsock": [step, {**step, "server_cpu_us_per_delivery": 6.0}, {"ok": False}]
                },
            },
            "ingest": {"pubsock": {"cpu_us_per_message": 67.0}},
            "memory": {
                "pubsock": {"rss_per_connection_bytes": 7734.0, "rss_before_bytes": 55_000_000}
            },
            "publish_api": {"pubsock": {"cpu_us_per_publish": 1077.0}},
        },
    }


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_reads_the_figures_of_a_results_file(tmp_path: Path) -> None:
    bench = load_bench(write(tmp_path / "2026-01-01.json", results("2026-01-01T10:00:00")))
    assert bench.date == "2026-01-01T10:00:00"
    assert bench.delivery_cpu_us == 10.5
    assert (bench.delivery_rate_msg_s, bench.delivery_subscribers) == (75, 1000)
    assert bench.delivery_cpu_us_range == (6.0, 12.0)  # the failed step is left out
    assert bench.max_deliveries_s == 146_000
    assert bench.ingest_cpu_us == 67
    assert (bench.rss_per_connection_bytes, bench.rss_base_bytes) == (7734, 55_000_000)
    assert bench.api_cpu_us == 1077


def test_a_file_without_the_figures_is_refused(tmp_path: Path) -> None:
    data = results("2026-01-01T10:00:00")
    del data["results"]["ingest"]
    with pytest.raises(ResultsError, match="ingest"):
        load_bench(write(tmp_path / "x.json", data))


def test_the_newest_full_results_file_is_chosen(tmp_path: Path) -> None:
    write(tmp_path / "2026-01-01.json", results("2026-01-01T10:00:00"))
    newest = write(tmp_path / "2026-02-01.json", results("2026-02-01T10:00:00"))
    write(tmp_path / "2026-03-01-quick.json", results("2026-03-01T10:00:00", profile="quick"))
    partial = results("2026-03-02T10:00:00")
    partial["results"] = {"rewind": {}}
    write(tmp_path / "2026-03-02-rewind.json", partial)  # python -m bench --only rewind
    (tmp_path / "broken.json").write_text("{")
    assert latest_results(tmp_path) == newest
    with pytest.raises(ResultsError):
        latest_results(tmp_path / "missing")


def test_the_repositorys_latest_results_are_usable() -> None:
    bench = load_bench(latest_results())
    assert bench.profile == "full"
    assert bench.delivery_cpu_us > 0 and bench.ingest_cpu_us > 0


# -- the command -------------------------------------------------------------------------------------
def test_cli_prints_the_table_and_names_its_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "2026-01-01.json", results("2026-01-01T10:00:00"))
    argv = ["--connections", "100000", "--messages-per-s", "1000", "10", "--fanout", "50"]
    assert sizing.main([*argv, "--results", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"bench results: {path} (make bench, full, 2026-01-01T10:00:00)"
    header = lines.index(sizing.TABLE_HEADER)
    assert lines[header + 1] == sizing.TABLE_RULE
    rows = lines[header + 2 : header + 4]
    assert rows[0].startswith("| 100,000 | 1,000 | 50 | 50,000 | 9 | 2 |")
    assert rows[1].startswith("| 100,000 | 10 | 50 | 500 | 9 | 2 |")
    assert all(row.count("|") == 13 for row in rows)
    assert "100,000 connections, 1,000 msg/s, fanout 50:" in lines
    assert "100,000 connections, 10 msg/s, fanout 50:" in lines


def test_cli_defaults_to_the_newest_results(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--connections", "10000", "--messages-per-s", "10", "--fanout", "5"]
    assert sizing.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"bench results: {latest_results()} ")


def test_cli_refuses_an_impossible_fanout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--connections", "10", "--messages-per-s", "1", "--fanout", "50"]
    assert sizing.main(argv) == 2
    assert "fanout" in capsys.readouterr().err
