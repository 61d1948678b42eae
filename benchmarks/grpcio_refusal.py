"""What one refused ModelInfer costs the grpc.aio server's event loop, per way of refusing it.

    .venv/bin/python benchmarks/grpcio_refusal.py [--seconds 4] [--rounds 3] [--clients 2]

Each case serves ModelInfer from a fresh server process (grpc.aio, 127.0.0.1) where one call is
admitted and held, so that every other call is refused; ``--clients`` client processes then send
calls as fast as their 32 outstanding calls each allow, for ``--seconds``. The cases:

- ``shedder``: the project's own refusal (:class:`~edgewise.runtime.serving.shedding.LoadShedder`
  at limit 1), RESOURCE_EXHAUSTED with the retry hint;
- ``abort``: a streaming handler that calls ``context.abort`` with the same status and hint;
- ``set_code``: a streaming handler that sets the same status, details and trailing metadata
  and returns (no exception);
- ``grpc_limit``: grpc.aio's own cap (``maximum_concurrent_rpcs=1``): RESOURCE_EXHAUSTED
  without any hint (its trailing metadata cannot be set);
- ``no_handler``: no handler at all (UNIMPLEMENTED): the floor of any call that reaches
  grpc.aio's Python side.

Measured on the server: CPU seconds of the event loop's thread, and of the whole process, per
call answered. CPU per call, not calls per second, is the figure: it holds on a machine shared
with other work, where throughput does not. Cases alternate within each round; one JSON line per
case with the medians over rounds, and ``ratio``: the loop's CPU per call against
``no_handler``'s, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
METHOD = "/inference.GRPCInferenceService/ModelInfer"
CASES = ("shedder", "abort", "set_code", "grpc_limit", "no_handler")
HINT = (("retry-after-ms", "50"), ("grpc-retry-pushback-ms", "50"))
MESSAGE = "server overloaded: 1 inference calls in flight; retry after 50 ms"


async def serve(case: str, port_file: Path) -> None:
    """The server of one case; writes its port to ``port_file`` once started."""
    import grpc

    from edgewise.runtime.serving.shedding import LoadShedder

    async def hold(request: bytes, context: Any) -> bytes:
        await asyncio.sleep(3600)
        return b""

    async def abort(requests: Any, context: Any) -> None:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, MESSAGE, trailing_metadata=HINT)

    async def set_code(requests: Any, context: Any) -> None:
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(MESSAGE)
        context.set_trailing_metadata(HINT)

    held = grpc.unary_unary_rpc_method_handler(hold)
    refusals = {
        "abort": grpc.stream_stream_rpc_method_handler(abort),
        "set_code": grpc.stream_stream_rpc_method_handler(set_code),
    }

    class FirstHeld(grpc.GenericRpcHandler):
        """Holds the first ModelInfer, answers the others with the case's handler."""

        def __init__(self) -> None:
            self.first = True

        def service(self, details: Any) -> Any:
            if details.method != METHOD or case == "no_handler":
                return None
            if self.first or case == "grpc_limit":
                self.first = False
                return held
            return refusals[case]

    server = grpc.aio.server(maximum_concurrent_rpcs=1 if case == "grpc_limit" else None)
    if case == "shedder":
        shedder = LoadShedder(1, 50, frozenset({METHOD}))
        shedder.add_service("inference.GRPCInferenceService", {"ModelInfer": held})
        server.add_generic_rpc_handlers((shedder,))
    else:
        server.add_generic_rpc_handlers((FirstHeld(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.with_suffix(".tmp").write_text(str(port))
    port_file.with_suffix(".tmp").rename(port_file)
    await server.wait_for_termination()


async def flood(target: str, seconds: float, outstanding: int, hold_first: bool) -> None:
    """One client process: ``outstanding`` calls at a time for ``seconds``; prints its counts."""
    import grpc

    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        call = channel.unary_unary(METHOD)
        if hold_first:  # the call that stays admitted for ``seconds`` (then cancelled)
            held = asyncio.ensure_future(call(b"", timeout=3600))
            await asyncio.sleep(seconds)
            held.cancel()
            return
        codes: dict[str, int] = {}
        hinted = 0
        end = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal hinted
            while time.monotonic() < end:
                try:
                    await call(b"x" * 64, timeout=5)
                    code = "OK"
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    hinted += "retry-after-ms" in dict(exc.trailing_metadata() or ())
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(worker() for _ in range(outstanding)))
    print(json.dumps({"codes": codes, "hinted": hinted}))


def thread_cpu(pid: int, tid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(case: str, seconds: float, clients: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    me = [sys.executable, str(Path(__file__).resolve())]
    with tempfile.TemporaryDirectory(prefix="refusal-") as scratch:
        port_file = Path(scratch) / "port"
        server = subprocess.Popen([*me, "--serve", case, str(port_file)], env=env)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {case} server did not start")
                time.sleep(0.05)
            target = f"127.0.0.1:{port_file.read_text()}"
            holder = None
            if case != "no_handler":  # the held call goes first, alone, and stays
                holder = subprocess.Popen(
                    [*me, "--flood", target, str(seconds + 30), "0", "--hold-first"], env=env
                )
                time.sleep(1.0)
            loop0, all0 = thread_cpu(server.pid, server.pid), process_cpu(server.pid)
            began = time.monotonic()
            floods = [
                subprocess.Popen([*me, "--flood", target, str(seconds), "32"], env=env,
                                 stdout=subprocess.PIPE)
                for _ in range(clients)
            ]  # fmt: skip
            outputs = [json.loads(f.communicate(timeout=seconds + 60)[0]) for f in floods]
            wall = time.monotonic() - began
            loop_cpu = thread_cpu(server.pid, server.pid) - loop0
            all_cpu = process_cpu(server.pid) - all0
            if holder is not None:
                holder.kill()
                holder.wait()
        finally:
            server.kill()
            server.wait()
    codes: dict[str, int] = {}
    for output in outputs:
        for code, count in output["codes"].items():
            codes[code] = codes.get(code, 0) + count
    calls = sum(codes.values())
    return {
        "case": case,
        "calls": calls,
        "codes": codes,
        "with_hint": sum(o["hinted"] for o in outputs),
        "calls_per_s": calls / wall,
        "loop_us_per_call": 1e6 * loop_cpu / calls,
        "process_us_per_call": 1e6 * all_cpu / calls,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="flood per case (4)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (2)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--serve", nargs=2, metavar=("CASE", "PORT_FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--flood", nargs=3, metavar=("TARGET", "S", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--hold-first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], Path(args.serve[1])))
        return 0
    if args.flood:
        target, seconds, outstanding = args.flood
        asyncio.run(flood(target, float(seconds), int(outstanding), args.hold_first))
        return 0
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {sorted(unknown)}: choose from {', '.join(CASES)}")
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            runs[case].append(one(case, args.seconds, args.clients))
    floor = (
        statistics.median(r["loop_us_per_call"] for r in runs["no_handler"])
        if "no_handler" in runs
        else None
    )
    for case, results in runs.items():
        loop_us = statistics.median(r["loop_us_per_call"] for r in results)
        codes: dict[str, int] = {}
        for result in results:
            for code, count in result["codes"].items():
                codes[code] = codes.get(code, 0) + count
        line = {
            "case": case,
            "loop_us_per_call": round(loop_us, 1),
            "process_us_per_call": round(
                statistics.median(r["process_us_per_call"] for r in results), 1
            ),
            "calls_per_s": round(statistics.median(r["calls_per_s"] for r in results)),
            "codes": codes,
            "with_hint": sum(r["with_hint"] for r in results),
            "ratio_to_no_handler": round(loop_us / floor, 2) if floor else None,
        }
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
