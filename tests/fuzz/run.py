"""Run the fuzz targets of tests/fuzz/targets.py for longer than the test suite does.

    python tests/fuzz/run.py [--engine atheris|hypothesis] [--runs N | --seconds S]
                             [--target NAME ...] [--repo REPO] [--rss-limit-mb MB]

atheris (``pip install 'edgewise[fuzz]'``) is coverage-guided: the first byte of each input picks
the target, the rest is the target's input, and edgewise's modules are instrumented. Without it
(or with ``--engine hypothesis``) hypothesis generates the inputs, with a fresh random seed per
run. Either way the run is bounded (``--runs`` inputs per target with hypothesis, in all with
atheris; ``--seconds`` in all), and prints one line per target and a verdict; an input that
raises anything but a documented error, runs longer than ``--timeout`` seconds, or takes the
process's peak RSS past ``--rss-limit-mb`` is reported with its bytes (saved under
``--findings``) and makes the exit code 1. The request targets also fail an input whose decoding
holds more memory than its bytes back (tests/fuzz/targets.py: ``MemoryCeilingExceeded``).

The model repository (``logreg`` and ``mixed`` from tests/models.py) is built in a temporary
folder unless ``--repo`` names one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _build_repo(folder: Path) -> Path:
    from tests.models import convert_model

    for name in ("logreg", "mixed"):
        convert_model(name, folder)
    return folder


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Findings:
    def __init__(self, folder: Path, timeout: float, rss_limit_mb: int) -> None:
        self.folder = folder
        self.timeout = timeout
        self.rss_limit_mb = rss_limit_mb
        self.count = 0
        self.per_target: dict[str, int] = {}

    def check(self, name: str, target: Any, data: bytes) -> None:
        started = time.perf_counter()
        try:
            target(data)
        except Exception:
            self.record(name, data, traceback.format_exc())
            raise
        elapsed = time.perf_counter() - started
        if elapsed > self.timeout:
            self.record(name, data, f"slow input: {elapsed:.2f} s")
            raise TimeoutError(f"{name}: an input took {elapsed:.2f} s")
        peak = peak_rss_mib()
        if peak > self.rss_limit_mb:  # the peak never comes down: the run stops here
            self.record(name, data, f"peak RSS {peak:.0f} MiB, over {self.rss_limit_mb} MiB")
            raise MemoryError(f"{name}: peak RSS {peak:.0f} MiB over {self.rss_limit_mb} MiB")

    def record(self, name: str, data: bytes, what: str) -> None:
        self.count += 1
        self.per_target[name] = self.per_target.get(name, 0) + 1
        if self.per_target[name] > 3:  # hypothesis shrinking repeats a finding many times
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}-{self.count}.bin"
        path.write_bytes(data)
        print(f"FINDING in {name} ({path}):\n{what}", file=sys.stderr)


def run_hypothesis(targets: dict[str, Any], args: argparse.Namespace, findings: Findings) -> int:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    failed = 0
    budget = args.seconds / len(targets) if args.seconds else None
    for name, target in targets.items():
        count = 0
        started = time.monotonic()
        deadline = None if budget is None else started + budget

        @settings(
            max_examples=args.runs or 10**9,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.binary(max_size=args.max_len))
        def one(data: bytes) -> None:
            nonlocal count
            if deadline is not None and time.monotonic() > deadline:  # noqa: B023
                return
            count += 1
            findings.check(name, target, data)  # noqa: B023 (run at once, in this iteration)

        try:
            one()
            verdict = "ok"
        except Exception as exc:
            failed += 1
            verdict = f"FAILED: {type(exc).__name__}"
        seconds = time.monotonic() - started
        print(f"{name:<20} {count:>8} inputs {seconds:>7.1f} s  {verdict}")
    return failed


def run_atheris(targets: dict[str, Any], args: argparse.Namespace, findings: Findings) -> int:
    import atheris

    names = list(targets)
    counts = dict.fromkeys(names, 0)
    started = time.monotonic()
    total_runs = args.runs * len(names) if args.runs else None
    end = started + args.seconds if args.seconds else None

    def finish() -> None:
        # libFuzzer leaves with _exit (no atexit, no return): the summary is printed here.
        seconds = time.monotonic() - started
        for name in names:
            print(f"{name:<20} {counts[name]:>8} inputs")
        print(f"atheris: {sum(counts.values())} inputs in {seconds:.1f} s")
        print("no findings" if not findings.count else f"{findings.count} finding(s)")
        sys.stdout.flush()
        os._exit(1 if findings.count else 0)

    def one_input(data: bytes) -> None:
        done = sum(counts.values())
        if (total_runs is not None and done >= total_runs) or (
            end is not None and done % 256 == 0 and time.monotonic() > end
        ):
            finish()
        if not data:
            return
        name = names[data[0] % len(names)]
        counts[name] += 1
        findings.check(name, targets[name], data[1:])

    atheris.Setup(
        [sys.argv[0], f"-max_len={args.max_len + 1}", f"-rss_limit_mb={args.rss_limit_mb}"],
        one_input,
    )
    atheris.Fuzz()
    return findings.count


def main() -> int:
    parser = argparse.ArgumentParser(description="Fuzz edgewise's loaders and request decoder.")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument(
        "--runs", type=int, help="inputs per target (default 20000 unless --seconds)"
    )
    parser.add_argument("--seconds", type=float, default=0, help="time budget in all (0: none)")
    parser.add_argument("--target", action="append", default=[], help="only these targets")
    parser.add_argument("--repo", type=Path, help="a repository with logreg and mixed")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input in bytes")
    parser.add_argument("--timeout", type=float, default=5.0, help="slowest acceptable input")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"))
    parser.add_argument(
        "--rss-limit-mb",
        type=int,
        default=2048,
        help="a finding when the process's peak RSS passes this (the request targets also "
        "hold each decode to a ceiling set by its size: tests/fuzz/targets.py)",
    )
    args = parser.parse_args()
    if args.runs is None:
        args.runs = 0 if args.seconds else 20000
    if args.runs < 0 or args.seconds < 0 or (not args.runs and not args.seconds):
        parser.error("bound the run: --runs N or --seconds S")

    engine = args.engine
    if engine == "auto":
        try:
            import atheris

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    if engine == "atheris":
        import atheris

        import edgewise.kernels  # noqa: F401 (first: numba cannot compile instrumented code)

        with atheris.instrument_imports(include=["edgewise.runtime"]):
            from tests.fuzz.targets import make_targets
    else:
        from tests.fuzz.targets import make_targets

    with tempfile.TemporaryDirectory(prefix="edgewise-fuzz-") as scratch:
        repo = args.repo or _build_repo(Path(scratch) / "repo")
        targets = make_targets(repo, Path(scratch) / "work").all()
        if args.target:
            unknown = set(args.target) - set(targets)
            if unknown:
                parser.error(f"unknown target(s) {sorted(unknown)}; known: {sorted(targets)}")
            targets = {k: v for k, v in targets.items() if k in args.target}
        findings = Findings(args.findings, args.timeout, args.rss_limit_mb)
        print(f"engine {engine}; targets {', '.join(targets)}")
        if engine == "atheris":
            failed = run_atheris(targets, args, findings)
        else:
            failed = run_hypothesis(targets, args, findings)
    print("no findings" if not failed and not findings.count else f"{findings.count} finding(s)")
    return 1 if failed or findings.count else 0


if __name__ == "__main__":
    sys.exit(main())
