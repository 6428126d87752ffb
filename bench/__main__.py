"""`python -m bench` (`make bench`): pubsock against bare baselines, side by side, in one run.

Prints a table of ratios with the absolute numbers beside them, and writes
bench/results/<date>.json (quick runs: <date>-quick.json; --only: <date>-<scenarios>.json) with PNG
plots next to it.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report, scenarios
from bench.scenarios import FULL, QUICK, Bench, LoadMeter, say
from devtools.cluster import emulator_available

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE_SCENARIOS = ("fanout", "recovery", "memory", "rewind", "sse")
EMULATOR_SCENARIOS = ("full_path", "publish_api", "ingest")
ALL = ENGINE_SCENARIOS + EMULATOR_SCENARIOS


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _setup() -> None:
    script = Path(__file__).with_name("setup.sh")
    subprocess.run(["bash", str(script)], check=True, timeout=600)


def _machine() -> dict[str, Any]:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "websockets",
        "uvloop",
        "orjson",
        "google-cloud-pubsub",
        "grpcio",
        "uvicorn",
        "fastapi",
    ):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~1-minute smoke run")
    parser.add_argument(
        "--only", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin server/clients to cores")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the pod's fan-out (extra step)"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args()
    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    unknown = wanted - set(ALL)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
    profile = QUICK if args.quick else FULL
    log_dir = Path(tempfile.mkdtemp(prefix="pubsock-bench-"))
    bench = Bench(
        profile=profile,
        log_dir=log_dir,
        pin=not args.no_pin and (os.cpu_count() or 1) >= 2,
        profile_pod=args.profile,
    )
    started = time.monotonic()
    results: dict[str, Any] = {}
    machine_load: dict[str, Any] = {}
    failed = False
    say(f"pubsock bench ({profile.name}); logs in {log_dir}; load average {os.getloadavg()[0]:.2f}")
    try:
        if wanted & {"publish_api"}:
            _setup()
        for name in ENGINE_SCENARIOS:
            if name not in wanted:
                continue
            meter = LoadMeter().start()
            try:
                results[name] = getattr(scenarios, name)(bench)
            except (scenarios.ChildError, RuntimeError, TimeoutError, OSError) as exc:
                failed = True
                results[name] = {"error": str(exc)}
                say(f"{name} failed: {exc}")
            machine_load[name] = meter.stop()
        if wanted & set(EMULATOR_SCENARIOS):
            if emulator_available():
                results.update(scenarios.emulator_scenarios(bench, wanted))
                for name in EMULATOR_SCENARIOS:
                    if name in results:
                        machine_load[name] = results[name].pop("machine", None)
                        failed = failed or "error" in results[name]
            else:
                say("the Pub/Sub emulator is not installed: scenarios 2-4 skipped")
                for name in wanted & set(EMULATOR_SCENARIOS):
                    results[name] = {"error": "the Pub/Sub emulator is not installed"}
    except KeyboardInterrupt:
        say("interrupted: stopping every process the bench started")
        bench.stack.close()
        return 130
    finally:
        bench.stack.close()
    runtime_s = time.monotonic() - started

    table_rows = report.rows(results)
    print()
    print(report.table(table_rows))
    print()
    for line in report.correctness(results):
        print(line)
    busy = {k: v for k, v in machine_load.items() if v}
    noisy = {k: v["other_cores"] for k, v in busy.items() if v["other_cores"] > 0.15}
    if noisy:
        print(
            "note: other processes used CPU during "
            + ", ".join(f"{k} ({v:.2f} cores)" for k, v in noisy.items())
            + ": absolute numbers are pessimistic there; ratios are measured side by side"
        )
    print(
        f"runtime {runtime_s:.0f} s ("
        + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in busy.items())
        + ")"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    # A run of some scenarios only is named after them: it never replaces a whole run.
    only = "" if wanted == set(ALL) else "".join(f"-{name}" for name in ALL if name in wanted)
    stem = args.out / (dt.date.today().isoformat() + only + ("-quick" if args.quick else ""))
    document = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "profile": profile.name,
        "parameters": dataclasses.asdict(profile),
        "pinned": bench.pin,
        "machine": _machine(),
        "machine_load": machine_load,
        "versions": _versions(),
        "runtime_s": runtime_s,
        "table": table_rows,
        "correctness": report.correctness(results),
        "results": results,
    }
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(document, indent=1, default=str))
    written = [json_path]
    try:
        written += report.plots(results, stem)
    except Exception as exc:  # a plot must not lose the numbers
        say(f"plots failed: {exc}")
    say(
        "wrote "
        + ", ".join(
            str(p.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p) for p in written
        )
    )
    if failed or args.keep_logs:
        say(f"process logs kept in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
