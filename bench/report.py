"""The run's table (ratios first, absolute numbers beside them), its JSON and its plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, int | float):
        if abs(value) >= 10000:
            return f"{value:,.0f}{unit}"
        return f"{value:.{digits}f}{unit}"
    return str(value)


def _row(
    scenario: str,
    metric: str,
    pubsock: Any,
    baseline: Any,
    ratio: float | None,
    target: tuple[str, float] | None,
    unit: str = "",
    note: str = "",
) -> Row:
    verdict = ""
    if target is not None and ratio is not None:
        op, bound = target
        verdict = "PASS" if (ratio >= bound if op == ">=" else ratio <= bound) else "MISS"
    elif target is not None:
        verdict = "n/a"
    return {
        "scenario": scenario,
        "metric": metric,
        "pubsock": pubsock,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "target": f"{target[0]} {target[1]:g}x" if target else "",
        "verdict": verdict,
        "note": note,
    }


def rows(results: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    fan = results.get("fanout")
    if fan and "summary" in fan:
        s = fan["summary"]
        pod, bare = s.get("pubsock_at_headline") or {}, s.get("bare_at_headline") or {}
        rate = s.get("headline_rate_msg_s")
        where = f"at {rate:g} msg/s x {pod.get('subscribers', '?')}" if rate else "no common step"
        if rate and not s.get("headline_within_limits", True):
            where += ", past the latency limit"
        out.append(
            _row(
                "1 fan-out engine",
                f"deliveries per CPU-second ({where})",
                pod.get("deliveries_per_cpu_s"),
                bare.get("deliveries_per_cpu_s"),
                s.get("deliveries_per_cpu_s_ratio"),
                (">=", 1.2),
            )
        )
        out.append(
            _row(
                "",
                "server CPU-us per delivery",
                pod.get("server_cpu_us_per_delivery"),
                bare.get("server_cpu_us_per_delivery"),
                _inv(s.get("deliveries_per_cpu_s_ratio")),
                None,
                " us",
            )
        )
        out.append(
            _row(
                "",
                "max sustained deliveries/s (no loss, p99<=250ms)",
                s.get("pubsock_max_sustained_s"),
                s.get("bare_max_sustained_s"),
                s.get("max_sustained_ratio"),
                None,
                "/s",
            )
        )
        out.append(
            _row(
                "",
                f"p99 latency ({where})",
                _get(pod, "latency", "p99_ms"),
                _get(bare, "latency", "p99_ms"),
                _ratio(_get(pod, "latency", "p99_ms"), _get(bare, "latency", "p99_ms")),
                None,
                " ms",
            )
        )
        out.append(
            _row(
                "",
                "client CPU-us per delivery (load generator)",
                pod.get("client_cpu_us_per_delivery"),
                bare.get("client_cpu_us_per_delivery"),
                None,
                None,
                " us",
            )
        )
    full = results.get("full_path")
    if full and "headline" in full:
        h = full["headline"]
        p, b = h["pubsock"], h["baseline"]
        rate = h["rate_msg_s"]
        out.append(
            _row(
                "2 full path",
                f"p99 publish->deliver at {rate:g} msg/s (vs emulator alone)",
                p["latency"]["p99_ms"],
                b["latency"]["p99_ms"],
                h.get("p99_ratio"),
                ("<=", 1.5),
                " ms",
            )
        )
        out.append(
            _row(
                "",
                "p50 publish->deliver",
                p["latency"]["p50_ms"],
                b["latency"]["p50_ms"],
                h.get("p50_ratio"),
                None,
                " ms",
            )
        )
        out.append(
            _row(
                "",
                "max publish->deliver",
                p["latency"]["max_ms"],
                b["latency"]["max_ms"],
                _ratio(p["latency"]["max_ms"], b["latency"]["max_ms"]),
                None,
                " ms",
            )
        )
        out.append(
            _row(
                "",
                f"sustained deliveries/s (offered: {h['offered_deliveries_s']:,.0f})",
                p["delivered_s"],
                None,
                None,
                None,
                "/s",
            )
        )
    ing = results.get("ingest")
    if ing and "pubsock" in ing:
        out.append(
            _row(
                "3 ingest",
                "CPU-us per message taken from the subscription "
                f"(~{ing['pubsock']['publish_rate_s']:.0f}/s)",
                ing["pubsock"]["cpu_us_per_message"],
                ing["bare"]["cpu_us_per_message"],
                ing.get("cpu_ratio"),
                ("<=", 1.2),
                " us",
            )
        )
    api = results.get("publish_api")
    if api and "pubsock" in api:
        out.append(
            _row(
                "4 publish API",
                f"CPU-us per accepted publish at {api['pubsock']['achieved_rate_s']:.0f}/s "
                f"(offered {api['rate_msg_s']:g}/s)",
                api["pubsock"]["cpu_us_per_publish"],
                api["baseline"]["cpu_us_per_publish"],
                api.get("cpu_ratio"),
                ("<=", 1.5),
                " us",
            )
        )
        out.append(
            _row(
                "",
                "p99 latency (HTTP 202 / publish result)",
                api["pubsock"]["latency"]["p99_ms"],
                api["baseline"]["latency"]["p99_ms"],
                api.get("p99_ratio"),
                None,
                " ms",
            )
        )
    mem = results.get("memory")
    if mem and "pubsock" in mem:
        out.append(
            _row(
                "5 memory",
                f"RSS per idle connection ({mem['pubsock']['connections']:,} connections)",
                _kib(mem["pubsock"]["rss_per_connection_bytes"]),
                _kib(mem["bare"]["rss_per_connection_bytes"]),
                mem.get("ratio"),
                ("<=", 1.15),
                " KiB",
            )
        )
    rec = results.get("recovery")
    if rec and "pubsock" in rec:
        p, b = rec["pubsock"], rec["bare"]
        out.append(
            _row(
                "6 recovery storm",
                f"time until {p['clients']} clients recovered {p['missed_messages']} msgs each",
                _ms(p["time_s"]),
                _ms(b["time_s"]),
                rec.get("time_ratio"),
                None,
                " ms",
            )
        )
        out.append(
            _row(
                "",
                "server CPU during the storm",
                _ms(p["server_cpu_s"]),
                _ms(b["server_cpu_s"]),
                rec.get("cpu_ratio"),
                None,
                " ms",
            )
        )
    rew = results.get("rewind")
    if rew and "steps" in rew:
        out.append(
            _row(
                "7 rewind",
                f"pod CPU-us per message: rewind {rew['count']} on subscribe vs live at "
                f"{rew['live_rate_msg_s']:g} msg/s ({rew['clients']:,} clients)",
                rew["rewind_cpu_us"],
                rew["live_cpu_us"],
                rew.get("live_ratio"),
                None,
                " us",
            )
        )
        out.append(
            _row(
                "",
                "the same vs live as a burst (the pump's batches: one write per client)",
                rew["rewind_cpu_us"],
                rew["burst_cpu_us"],
                rew.get("burst_ratio"),
                None,
                " us",
            )
        )
    sse = results.get("sse")
    if sse and "kinds" in sse:
        kinds = sse["kinds"]
        native = kinds["native"]
        for index, (kind, label) in enumerate(
            (("sse", "1 channel a stream"), ("sse-10ch", "10 channels a stream"))
        ):
            out.append(
                _row(
                    f"8 SSE vs websocket ({sse['clients']} clients)" if index == 0 else "",
                    f"pod CPU-us per delivery, SSE {label}",
                    kinds[kind]["cpu_us"],
                    native["cpu_us"],
                    kinds[kind].get("ratio"),
                    None,
                    " us",
                    "baseline: native websockets, same run",
                )
            )
    return out


def correctness(results: dict[str, Any]) -> list[str]:
    """One line per scenario: what was delivered and every loss or reorder found."""
    lines: list[str] = []
    fan = results.get("fanout")
    if fan and "steps" in fan:
        for key, series in fan["steps"].items():
            runs = [run for s in series for run in s.get("runs", [s])]
            delivered = sum(s["delivered"] for s in runs)
            lost = sum(s["lost"] for s in runs)
            gaps = sum(s["gaps"] for s in runs)
            back = sum(s["reordered_or_duplicated"] for s in runs)
            closes = sum(sum(s["closes"].values()) for s in runs)
            lines.append(
                f"fan-out  {key:8s}: {delivered:,} deliveries checked, lost {lost} (gaps {gaps}), "
                f"reordered/duplicated {back}, closes {closes} (loss counted in the steps past "
                "the limit too)"
            )
    full = results.get("full_path")
    if full and "steps" in full:
        for step in full["steps"]:
            every = step.get("runs") or {
                "pubsock": [step["pubsock"]],
                "baseline": [step["baseline"]],
            }
            ps, bs = every["pubsock"], every["baseline"]
            lines.append(
                f"full path {step['rate_msg_s']:g} msg/s ({len(ps)} runs each, all counted): "
                f"{sum(p['delivered'] for p in ps):,} of {sum(p['expected'] for p in ps):,} "
                f"delivered, lost {sum(p['lost'] for p in ps)}, one order on every connection of "
                f"both pods: {all(p['one_order_everywhere'] for p in ps)}, contract order "
                f"violations {sum(p['guarantee2_violations'] for p in ps)}, non-202 "
                f"{sum(v for p in ps for k, v in p['statuses'].items() if k != '202')}; "
                f"baseline {sum(b['received'] for b in bs):,} of "
                f"{sum(b['published'] for b in bs):,}, lost {sum(b['lost'] for b in bs)}, "
                f"reordered {sum(b['reordered'] for b in bs)}, duplicates "
                f"{sum(b['duplicates'] for b in bs)}"
            )
    ing = results.get("ingest")
    if ing and "pubsock" in ing:
        lines.append(
            f"ingest: pod {ing['pubsock']['received']:.0f}/{ing['pubsock']['published']} "
            f"(lost {ing['pubsock']['lost']:.0f}), bare {ing['bare']['received']:.0f}/"
            f"{ing['bare']['published']} (lost {ing['bare']['lost']:.0f})"
        )
    api = results.get("publish_api")
    if api and "pubsock" in api:
        lines.append(
            f"publish api: {api['pubsock']['accepted']} accepted, {api['pubsock']['failures']} "
            f"failed; bare {api['baseline']['accepted']} ok, {api['baseline']['failures']} failed"
        )
    sse = results.get("sse")
    if sse and "kinds" in sse:
        lines.append(
            f"sse: every client of each kind ({', '.join(sse['kinds'])}) got all "
            f"{sse['messages']} messages in each of {sse['rounds']} round(s), "
            f"{sse['clients']} clients a kind"
        )
    rec = results.get("recovery")
    if rec and "pubsock" in rec:
        for key in ("pubsock", "bare"):
            r = rec[key]
            lines.append(
                f"recovery {key:8s}: {r['complete']}/{r['clients']} complete, recovered true "
                f"{r['recovered_true']}, false {r['recovered_false']}, {r['frames']:,} replayed "
                f"frames, gaps {r['gaps']}, reordered/duplicated {r['reordered_or_duplicated']}"
            )
    rew = results.get("rewind")
    if rew and "steps" in rew:
        rewinds = rew["steps"]["rewind"]
        lives = rew["steps"]["live"] + rew["steps"]["burst"]
        lines.append(
            f"rewind: {sum(r['rewinds'] for r in rewinds):,} rewinds, "
            f"{sum(r['delivered'] for r in rewinds):,} of {sum(r['expected'] for r in rewinds):,} "
            f"messages delivered, gaps {sum(r['gaps'] for r in rewinds)}, reordered/duplicated "
            f"{sum(r['reordered_or_duplicated'] for r in rewinds)}, incomplete "
            f"{sum(r['rewound_incomplete'] for r in rewinds)}, errors "
            f"{sum(r['errors'] for r in rewinds)}; live {sum(s['delivered'] for s in lives):,} "
            f"deliveries, lost {sum(s['lost'] for s in lives)}, gaps "
            f"{sum(s['gaps'] for s in lives)}, reordered/duplicated "
            f"{sum(s['reordered_or_duplicated'] for s in lives)}"
        )
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"{name}: FAILED: {value['error'].splitlines()[0][:200]} (see the JSON)")
    return lines


def table(table_rows: list[Row]) -> str:
    header = ["scenario", "metric", "pubsock", "baseline", "ratio", "target", ""]
    body = [
        [
            r["scenario"],
            r["metric"],
            _fmt(r["pubsock"], r["unit"]),
            _fmt(r["baseline"], r["unit"]),
            _fmt(r["ratio"], "x", 2),
            r["target"],
            r["verdict"],
        ]
        for r in table_rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for line in body:
        lines.append(" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    return "\n".join(lines)


def plots(results: dict[str, Any], stem: Path) -> list[Path]:
    """Latency and delivery rate against offered load; one PNG per stepped scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    fan = results.get("fanout")
    if fan and fan.get("steps"):
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
        for key, color in (("pubsock", "tab:blue"), ("bare", "tab:orange")):
            series = fan["steps"].get(key, [])
            if not series:
                continue
            x = [s["offered_deliveries_s"] / 1000 for s in series]
            label = "pubsock pod" if key == "pubsock" else "bare websockets.broadcast()"
            axes[0].plot(
                x, [s["latency"]["p99_ms"] for s in series], "o-", color=color, label=f"{label} p99"
            )
            axes[0].plot(
                x,
                [s["latency"]["p50_ms"] for s in series],
                "s--",
                color=color,
                label=f"{label} p50",
            )
            axes[1].plot(
                x, [s["delivered_s"] / 1000 for s in series], "o-", color=color, label=label
            )
            axes[2].plot(
                x, [s["server_cpu_us_per_delivery"] for s in series], "o-", color=color, label=label
            )
        axes[0].axhline(250, color="grey", linestyle=":", label="250 ms limit")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("latency (ms)")
        top = max(
            (s["offered_deliveries_s"] for ser in fan["steps"].values() for s in ser), default=1
        )
        axes[1].plot([0, top / 1000], [0, top / 1000], ":", color="grey", label="offered")
        axes[1].set_ylabel("delivered (thousand/s)")
        axes[2].set_ylabel("server CPU-us per delivery")
        for ax, title in zip(axes, ("latency", "delivery rate", "CPU per delivery"), strict=True):
            ax.set_xlabel("offered deliveries (thousand/s, 1,000 connections)")
            ax.set_title(f"fan-out engine: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-fanout.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    full = results.get("full_path")
    if full and full.get("steps"):
        steps = full["steps"]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        x = [s["rate_msg_s"] for s in steps]
        for key, color, label in (
            ("pubsock", "tab:blue", "api -> emulator -> 2 pods -> clients"),
            ("baseline", "tab:orange", "bare publisher -> emulator -> subscriber"),
        ):
            axes[0].plot(
                x,
                [s[key]["latency"]["p99_ms"] for s in steps],
                "o-",
                color=color,
                label=f"{label} p99",
            )
            axes[0].plot(
                x,
                [s[key]["latency"]["p50_ms"] for s in steps],
                "s--",
                color=color,
                label=f"{label} p50",
            )
        axes[1].plot(
            x, [s["pubsock"]["delivered_s"] / 1000 for s in steps], "o-", label="delivered"
        )
        axes[1].plot(
            x, [s["offered_deliveries_s"] / 1000 for s in steps], ":", color="grey", label="offered"
        )
        axes[0].set_ylabel("publish -> deliver latency (ms)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("deliveries (thousand/s, 1,000 clients)")
        for ax, title in zip(axes, ("latency", "delivery rate"), strict=True):
            ax.set_xlabel(f"offered messages/s (over {full.get('channels', 1)} channels)")
            ax.set_title(f"full path: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-fullpath.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _get(d: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _inv(x: float | None) -> float | None:
    return 1 / x if x else None


def _kib(x: float | None) -> float | None:
    return x / 1024 if x is not None else None


def _ms(x: float | None) -> float | None:
    return x * 1000 if x is not None else None
