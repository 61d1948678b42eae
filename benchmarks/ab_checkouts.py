"""A/B of two checkouts of edgewise: the native front end of each, same machine, same run.

    .venv/bin/python benchmarks/ab_checkouts.py OLD_PATH NEW_PATH [ROUNDS] [SECONDS] [on|off]

Each PATH is a PYTHONPATH under which ``edgewise.runtime`` is that checkout's, with its native
front end built; for a past revision REV, for example:

    git worktree add /tmp/old REV
    mkdir -p /tmp/site-old/edgewise
    ln -s /tmp/old/runtime /tmp/site-old/edgewise/runtime
    ln -s /tmp/old/kernels /tmp/site-old/edgewise/kernels
    PYTHONPATH=/tmp/site-old:/tmp/old .venv/bin/python -m <that revision's front-end build module>
    # then OLD_PATH is /tmp/site-old:/tmp/old (and the same for the new checkout)

Both servers serve this checkout's benchmark models (serving.py's build_models) with the native
front end and monitoring on or off; rounds alternate between them and the order flips each
round, so drift on a shared machine hits both. Prints one JSON line per (model, concurrency):
the medians of p50, server CPU per request, throughput and context switches per request for
old and new, and the medians of the per-round ratios new/old (the figure to quote).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("serving", HERE / "serving.py")
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(status) as handle:
                for line in handle:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def drive(url: str, model: str, concurrency: int, seconds: float, pid: int) -> dict[str, float]:
    """serving.py's client processes against ``url``; the server's CPU and switches are read over
    the clients' measurement window."""
    processes = 1 if concurrency == 1 else 2
    per = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    warmup = 1.0
    clients = [
        subprocess.Popen(
            [sys.executable, str(bench.HERE), "--client", url, model, str(c), str(seconds),
             str(warmup), ""],
            stdout=subprocess.PIPE,
        )
        for c in per
    ]  # fmt: skip
    time.sleep(warmup)
    cpu0, switched0 = bench.cpu_seconds(pid), switches(pid)
    time.sleep(seconds)
    cpu1, switched1 = bench.cpu_seconds(pid), switches(pid)
    latencies: list[float] = []
    for client in clients:
        out, _ = client.communicate(timeout=seconds + 60)
        latencies.extend(json.loads(out)["latencies"])
    latencies.sort()
    n = len(latencies)
    return {
        "p50_us": latencies[n // 2] * 1e6,
        "rps": n / seconds,
        "server_cpu_us_per_req": (cpu1 - cpu0) / n * 1e6,
        "switches_per_req": (switched1 - switched0) / n,
    }


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    sites = {"old": sys.argv[1], "new": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    seconds = float(sys.argv[4]) if len(sys.argv) > 4 else 3.0
    monitoring = sys.argv[5] if len(sys.argv) > 5 else "on"
    work = Path(tempfile.mkdtemp(prefix="edgewise-ab-"))
    models = bench.build_models(work / "repo")
    servers = {}
    for label, site in sites.items():
        os.environ["PYTHONPATH"] = site
        port_file = work / f"{label}.port"
        servers[label] = bench.Server(
            [sys.executable, "-m", "edgewise.runtime.cli", "--log-level", "WARNING", "serve",
             "--repo", str(work / "repo"), "--host", "127.0.0.1", "--port", "0",
             "--metrics-port", "-1", "--port-file", str(port_file), "--front-end", "native",
             "--monitoring", monitoring],
            port_file,
        )  # fmt: skip
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    try:
        for concurrency in (1, 8):
            for index in range(rounds):
                order = ["old", "new"] if index % 2 == 0 else ["new", "old"]
                for model in models:
                    for label in order:
                        server = servers[label]
                        results.setdefault((model, concurrency, label), []).append(
                            drive(server.url, model, concurrency, seconds, server.process.pid)
                        )
    finally:
        for server in servers.values():
            server.stop()
    for model in models:
        for concurrency in (1, 8):
            old = results[(model, concurrency, "old")]
            new = results[(model, concurrency, "new")]
            line: dict[str, Any] = {
                "case": "native_ab_checkouts", "model": model, "concurrency": concurrency,
                "rounds": rounds, "seconds": seconds, "monitoring": monitoring,
            }  # fmt: skip
            for key in ("p50_us", "server_cpu_us_per_req", "rps", "switches_per_req"):
                line[f"old_{key}"] = round(statistics.median(o[key] for o in old), 2)
                line[f"new_{key}"] = round(statistics.median(n[key] for n in new), 2)
                ratios = [n[key] / o[key] for o, n in zip(old, new, strict=True)]
                line[f"ratio_{key}_paired"] = round(statistics.median(ratios), 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
