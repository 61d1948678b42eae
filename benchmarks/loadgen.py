"""Open-loop load generator for one ModelInfer request, in its own process.

Sends a pre-serialised ``ModelInferRequest`` at a fixed offered rate (requests are started on a
clock, whether or not earlier ones have finished: the load does not politely slow down when the
server does), each with a deadline, for a bounded time, and prints one JSON object: what was
offered, what was sent, the answers by status code, the latency percentiles of the accepted
(OK) requests, and how many RESOURCE_EXHAUSTED answers carried a retry hint.

    python benchmarks/loadgen.py --target 127.0.0.1:8001 --request req.bin --rate 800 \
        --duration 20 [--deadline 2] [--max-outstanding 2000] [--token-file F] [--tls-ca CA]

Used by tests/runtime/serving/test_overload.py (several of these processes at once) and
benchmarks/soak.py. It never retries: a refused request is a data point, not a to-do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = Path(args.request).read_bytes()
    metadata: tuple[tuple[str, str], ...] = ()
    if args.token_file:
        metadata = (("authorization", f"Bearer {Path(args.token_file).read_text().strip()}"),)
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if args.tls_ca:
        credentials = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        channel = grpc.aio.secure_channel(args.target, credentials, options)
    else:
        channel = grpc.aio.insecure_channel(args.target, options=options)
    call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side protobuf work
    await channel.channel_ready()

    codes: dict[str, int] = {}
    ok_latency: list[float] = []
    shed_latency: list[float] = []  # how fast RESOURCE_EXHAUSTED came back
    ok_by_third: list[list[float]] = [[], [], []]
    hinted = 0
    hints: set[str] = set()
    outstanding = 0
    skipped = 0  # not sent: the client's own cap on outstanding requests was reached
    per_second: dict[int, dict[str, int]] = {}
    started = time.monotonic()

    async def one() -> None:
        nonlocal outstanding, hinted
        begin = time.monotonic()
        code = "OK"
        try:
            await call(payload, timeout=args.deadline, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailing = dict(exc.trailing_metadata() or ())
                if "retry-after-ms" in trailing and "grpc-retry-pushback-ms" in trailing:
                    hinted += 1
                    hints.add(str(trailing["retry-after-ms"]))
        except Exception as exc:  # a client-side failure is a result too
            code = f"CLIENT_{type(exc).__name__}"
        finally:
            outstanding -= 1
        end = time.monotonic()
        codes[code] = codes.get(code, 0) + 1
        second = per_second.setdefault(int(begin - started), {})
        second[code] = second.get(code, 0) + 1
        if code == "OK":
            ok_latency.append(end - begin)
            third = min(2, int(3 * (begin - started) / args.duration))
            ok_by_third[third].append(end - begin)
        elif code == "RESOURCE_EXHAUSTED":
            shed_latency.append(end - begin)

    tasks: set[asyncio.Task[None]] = set()
    interval = 1.0 / args.rate
    sent = 0
    deadline = started + args.duration
    next_at = started
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        # Catch up on the clock: start every request whose time has come.
        while next_at <= now and next_at < deadline:
            if outstanding >= args.max_outstanding:
                skipped += 1
            else:
                outstanding += 1
                sent += 1
                task = asyncio.create_task(one())
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            next_at += interval
        await asyncio.sleep(max(0.0, min(next_at - time.monotonic(), 0.005)))
    elapsed_send = time.monotonic() - started
    if tasks:
        await asyncio.wait(tasks, timeout=args.deadline + 5)
    await channel.close()
    ok = codes.get("OK", 0)
    return {
        "offered_rate": args.rate,
        "duration_s": args.duration,
        "sent": sent,
        "skipped": skipped,
        "send_rate": sent / elapsed_send if elapsed_send else 0.0,
        "codes": codes,
        "ok": ok,
        "ok_rate": ok / args.duration,
        "ok_latency_ms": {f"p{q}": percentile(ok_latency, q) * 1000 for q in (50, 90, 99, 99.9)}
        | {"max": (max(ok_latency) * 1000) if ok_latency else math.nan},
        "shed_latency_ms": {f"p{q}": percentile(shed_latency, q) * 1000 for q in (50, 99)},
        "thirds": [
            {
                "ok": len(values),
                "p50_ms": percentile(values, 50) * 1000,
                "p99_ms": percentile(values, 99) * 1000,
            }
            for values in ok_by_third
        ],
        "resource_exhausted_with_hint": hinted,
        "retry_hints_ms": sorted(hints),
        "per_second": {str(k): v for k, v in sorted(per_second.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--request", required=True, help="a serialised ModelInferRequest")
    parser.add_argument("--rate", type=float, required=True, help="offered requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of sending")
    parser.add_argument("--deadline", type=float, default=2.0, help="per-request deadline (s)")
    parser.add_argument("--max-outstanding", type=int, default=4000)
    parser.add_argument("--token-file")
    parser.add_argument("--tls-ca")
    parser.add_argument("--out", help="write the JSON here as well as to stdout")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 100_000) or not (0 < args.duration <= 3600):
        parser.error("rate must be in (0, 100000] and duration in (0, 3600]")
    result = asyncio.run(run(args))
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
