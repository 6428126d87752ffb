"""The soak's outputs: a JSON report, a short table, and a timeline plot (faults, connected clients,
delivery lag) as an SVG written by hand (no plotting library needed)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any
from xml.sax.saxutils import escape

BUCKET_S = 5

COLORS = {
    "kill_pod": "#d62728",
    "drain_pod": "#ff7f0e",
    "close_streams": "#1f77b4",
    "unavailable": "#9467bd",
    "stall": "#8c564b",
    "cut": "#e377c2",
    "kill_api": "#2ca02c",
}


def timeline(
    clients: Mapping[str, Sequence[Mapping[str, Any]]], start_ms: float, end_ms: float
) -> dict[str, Any]:
    """Per BUCKET_S seconds: connected clients (at the bucket's end) and delivery lag
    (receipt minus the api's `ts`: p50, p99, max, in ms)."""
    buckets = max(1, math.ceil((end_ms - start_ms) / 1000 / BUCKET_S))
    lags: list[list[float]] = [[] for _ in range(buckets)]
    changes: list[tuple[float, int]] = []
    for events in clients.values():
        connected = False
        for event in events:
            kind = event["e"]
            t = float(event["t"])
            if kind == "msg" and event.get("ts"):
                b = int((t - start_ms) / 1000 / BUCKET_S)
                if 0 <= b < buckets:
                    lags[b].append(t - float(event["ts"]))
            elif kind == "state" or kind == "end":
                now = kind == "state" and event.get("state") == "open"
                if now != connected:
                    changes.append((t, 1 if now else -1))
                    connected = now
    changes.sort()
    counts = []
    level = 0
    i = 0
    for b in range(buckets):
        edge = min(end_ms, start_ms + (b + 1) * BUCKET_S * 1000)
        while i < len(changes) and changes[i][0] <= edge:
            level += changes[i][1]
            i += 1
        counts.append(level)

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        values.sort()
        return round(float(values[min(len(values) - 1, int(q * len(values)))]), 1)

    return {
        "bucket_s": BUCKET_S,
        "connected": counts,
        "lag_p50_ms": [pct(v, 0.5) for v in lags],
        "lag_p99_ms": [pct(v, 0.99) for v in lags],
        "lag_max_ms": [round(max(v), 1) if v else None for v in lags],
    }


def svg(report: Mapping[str, Any]) -> str:
    """Three panels on one time axis: faults (one lane per kind), connected clients, lag."""
    line = report["timeline"]
    faults = report["faults"]
    start_ms = report["load_started_ms"]
    n = len(line["connected"])
    span_s = int(n * line["bucket_s"])
    width, left, right = 1000, 110, 20
    plot_w = width - left - right
    lanes = list(COLORS)
    lane_h = 16
    fault_h = lane_h * len(lanes)
    panel_h = 150
    top = 40
    height = top + fault_h + 30 + panel_h + 30 + panel_h + 50

    def x(seconds: float) -> float:
        return float(left + plot_w * max(0.0, min(seconds, span_s)) / max(span_s, 1))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14">pubsock soak: seed {report["seed"]}, '
        f"{report['clients']['total']} clients, {span_s} s; violations: "
        f"{len(report['violations'])}</text>",
    ]
    # faults
    for i, kind in enumerate(lanes):
        y = top + i * lane_h
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{kind}</text>')
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y + lane_h}" y2="{y + lane_h}" '
            'stroke="#eee"/>'
        )
    for fault in faults:
        kind = fault["kind"]
        if kind not in COLORS:
            continue
        y = top + lanes.index(kind) * lane_h
        x0 = x((fault["start_ms"] - start_ms) / 1000)
        x1 = max(x0 + 2, x((fault["end_ms"] - start_ms) / 1000))
        title = escape(f"{kind} {fault.get('pod', '')} {fault['start_ms']:.0f}")
        parts.append(
            f'<rect x="{x0:.1f}" y="{y + 2}" width="{x1 - x0:.1f}" height="{lane_h - 4}" '
            f'fill="{COLORS[kind]}"><title>{title}</title></rect>'
        )

    def panel(y0: float, series: list[tuple[str, list[float | None], str]], label: str) -> None:
        values = [v for _, s, _ in series for v in s if v is not None]
        top_value = max(values) if values else 1.0
        top_value = _nice(top_value)
        parts.append(
            f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="none" '
            'stroke="#999"/>'
        )
        parts.append(f'<text x="{left - 6}" y="{y0 + 10}" text-anchor="end">{top_value:g}</text>')
        parts.append(f'<text x="{left - 6}" y="{y0 + panel_h}" text-anchor="end">0</text>')
        parts.append(
            f'<text x="{left - 40}" y="{y0 + panel_h / 2}" text-anchor="end">{label}</text>'
        )
        for name, data, color in series:
            points = []
            for b, v in enumerate(data):
                if v is None:
                    continue
                px = x((b + 0.5) * line["bucket_s"])
                py = y0 + panel_h - panel_h * min(v, top_value) / top_value
                points.append(f"{px:.1f},{py:.1f}")
            if points:
                parts.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                    f'points="{" ".join(points)}"><title>{name}</title></polyline>'
                )
        for i, (name, _, color) in enumerate(series):
            parts.append(
                f'<text x="{left + 8 + 90 * i}" y="{y0 + 14}" fill="{color}">{name}</text>'
            )

    y_clients = top + fault_h + 30
    panel(y_clients, [("connected", list(line["connected"]), "#1f77b4")], "clients")
    y_lag = y_clients + panel_h + 30
    panel(
        y_lag,
        [
            ("lag p50", line["lag_p50_ms"], "#2ca02c"),
            ("lag p99", line["lag_p99_ms"], "#ff7f0e"),
            ("lag max", line["lag_max_ms"], "#d62728"),
        ],
        "ms",
    )
    for s in range(0, span_s + 1, max(10, _nice(span_s / 10))):
        px = x(s)
        parts.append(
            f'<text x="{px:.1f}" y="{y_lag + panel_h + 16}" text-anchor="middle">{s}s</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _nice(value: float) -> int:
    if value <= 0:
        return 1
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return int(step * magnitude)
    return int(10 * magnitude)


def table(report: Mapping[str, Any]) -> str:
    """The short table printed at the end and shown in the README."""
    rows: list[tuple[str, str]] = []
    rows.append(("seed", str(report["seed"])))
    cpu = report.get("cpu_s", {})
    rows.append(
        (
            "load",
            f"{report['seconds']:g} s; wall {report['wall_s']:.0f} s; CPU "
            f"{cpu.get('children', 0) + cpu.get('runner', 0):.0f} s (every process started)",
        )
    )
    c = report["clients"]
    rows.append(
        (
            "clients",
            f"{c['total']} (Python {c['py']}, browser client on Node {c['browser']}, "
            f"socket.io-client {c['sio']}); {c['channels']} channels",
        )
    )
    by_kind: dict[str, int] = defaultdict(int)
    for fault in report["faults"]:
        by_kind[fault["kind"]] += 1
    rows.append(
        (
            "faults injected",
            f"{sum(by_kind.values())}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())),
        )
    )
    p = report["publishing"]
    rows.append(
        (
            "messages",
            f"{p['accepted']} accepted (202), {p['unknown']} without a 202; {p['attempts']} "
            f"attempts: " + ", ".join(f"{k} {v}" for k, v in sorted(p["statuses"].items())),
        )
    )
    k = report["check"]
    rows.append(("deliveries checked", f"{k['deliveries']} in {k['stretches']} stretches"))
    rec = k["recoveries"]
    rows.append(
        (
            "recoveries",
            ", ".join(f"{key} {value}" for key, value in sorted(rec.items())) or "none",
        )
    )
    by_violation: dict[str, int] = defaultdict(int)
    for v in report["violations"]:
        by_violation[v["kind"]] += 1
    rows.append(
        (
            "violations",
            str(len(report["violations"]))
            + (
                " (" + ", ".join(f"{a} {b}" for a, b in sorted(by_violation.items())) + ")"
                if by_violation
                else ""
            ),
        )
    )
    for slot in report["resources"]:
        s, e = slot["start"], slot["end"]
        rows.append(
            (
                f"pod slot {slot['slot']}",
                f"RSS {_mb(s)} -> {_mb(e)} MB, fds {s.get('fds', '?')} -> {e.get('fds', '?')} "
                f"({s.get('pod')} -> {e.get('pod')})",
            )
        )
    left = report["leftovers"]
    rows.append(
        (
            "left after stop",
            f"{len(left['processes'])} processes, {len(left['ports'])} ports"
            + (f": {left}" if left["processes"] or left["ports"] else ""),
        )
    )
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'what'.ljust(width)} | result |", f"| {'-' * width} | --- |"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _mb(sample: Mapping[str, Any]) -> str:
    rss = sample.get("rss_kb")
    return f"{rss / 1024:.0f}" if isinstance(rss, int | float) else "?"
