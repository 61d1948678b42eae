"""Overload and soak, bounded: a real server offered about three times its capacity by three
open-loop client processes (benchmarks/soak.py with benchmarks/loadgen.py). It must shed with
RESOURCE_EXHAUSTED and a retry hint instead of queueing (accepted calls meet their deadline), keep
answering health checks, and hold its memory and threads flat. The figures (rates, latencies)
are benchmarks/soak.py's to print, not this test's to bound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.servers import FRONT_ENDS, front_end_args

SOAK = Path(__file__).parents[3] / "benchmarks" / "soak.py"


def soak(tmp_path: Path, seconds: float, rate: float, front_end: str = "auto") -> dict[str, Any]:
    """benchmarks/soak.py: 3 load generators at ``rate`` each against requests of 512 rows of a
    200-tree forest (about 6 ms of onnxruntime each: a few hundred a second fit on 2 cores)."""
    out = tmp_path / "soak.json"
    if front_end != "auto":
        front_end_args(front_end)  # skips where the native front end is not built
    done = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", str(seconds), "--processes", "3",
         "--rate", str(rate), "--rows", "512", "--max-inflight", "16", "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=seconds + 240,
        env={**os.environ, "EDGEWISE_FRONT_END": front_end},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def check_common(result: dict[str, Any], front_end: str = "native") -> None:
    codes = result["codes"]
    sent = result["sent"]
    ok, shed = codes.get("OK", 0), codes.get("RESOURCE_EXHAUSTED", 0)
    refused_by_core = codes.get("CANCELLED", 0)
    # Only documented answers, and next to no call left to wait out its 2 s deadline.
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert codes.get("DEADLINE_EXCEEDED", 0) <= 0.05 * sent, codes
    if front_end == "grpcio":
        # Known gap (issue 18, item 16): past its bounded queue of calls not yet taken in
        # (shedding.pending_limits), gRPC's core refuses calls itself, with CANCELLED and no
        # retry hint, when the event loop cannot take them in fast enough to shed them: every
        # call costs grpc.aio's loop about 150 us whatever answers it, and a machine short of
        # CPU gives the loop less than that (docs/security.md#overload,
        # benchmarks/grpcio_refusal.py).
        assert ok + shed + refused_by_core >= 0.95 * sent, codes
    else:
        # The native front end takes every call in and sheds it with the hint: alone on the
        # machine OK and RESOURCE_EXHAUSTED only; a few CANCELLED when other work starves it.
        assert ok + shed >= 0.9 * sent, codes
    # It was overloaded, it shed, and every refusal a client received carried the retry hint.
    assert result["server_shed_total"] >= 0.2 * sent, result
    assert result["shed_with_retry_hint"] == shed, result
    # The server counted every refusal it sent; those it counted that no client received as
    # one are calls whose client gave up first (its deadline passed, or the call was cancelled,
    # as happens when other work starves the machine).
    gave_up = codes.get("DEADLINE_EXCEEDED", 0) + refused_by_core
    assert shed <= result["server_shed_total"] <= shed + gave_up, result
    assert result["retry_hints_ms"] == ["50"]
    # It kept doing useful work all along instead of queueing: calls were accepted in every third
    # of the run, and were answered before their 2 s deadline (a queue turns them into the
    # DEADLINE_EXCEEDED counted above). How fast is a figure: benchmarks/soak.py prints it.
    assert all(third["ok"] > 0 for third in result["thirds"]), result["thirds"]
    # Health checks got through the overload: every one answered SERVING.
    assert result["health_check_failures"] == 0 and result["samples"] > 0, result


@pytest.mark.serial
@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_overload_is_shed_with_a_retry_hint(tmp_path: Path, front_end: str) -> None:
    result = soak(tmp_path, seconds=20, rate=400, front_end=front_end)
    check_common(result, front_end)
    # Memory stays bounded: no queue grows with the overload (grpcio before its queue was
    # bounded: +70 to +176 MiB in 20 s).
    assert result["rss_mib_max"] - result["rss_mib_first_third"] < 60, result  # MiB
    assert result["offered_rate"] >= 2 * result["accepted_rate"], result


@pytest.mark.slow
@pytest.mark.serial
def test_a_minute_of_overload_leaves_memory_and_threads_flat(tmp_path: Path) -> None:
    result = soak(tmp_path, seconds=60, rate=300)
    check_common(result)
    assert result["samples"] >= 45
    growth = result["rss_mib_last_third"] - result["rss_mib_first_third"]
    assert growth < 40, result  # MiB; an unbounded queue grows by hundreds in a minute
    # Threads: gRPC core's own pools (its default executor, the event engine) grow and shrink by
    # a few threads on their own under load (seen: 3 -> 4 default-executor threads within the
    # minute); a thread per call or per refusal would add thousands.
    assert result["threads_max"] - result["threads_min"] <= 5, result
    assert result["threads_last_third"] <= result["threads_first_third"] + 3, result
    # Nothing piles up over the minute: check_common found calls accepted in every third and
    # next to no deadline met. The latency per third is a figure: benchmarks/soak.py prints it.


# ---- units ---------------------------------------------------------------------------------------


def test_retry_hints_go_both_ways() -> None:
    from edgewise.runtime.config.channels import retry_after_ms
    from edgewise.runtime.serving.shedding import retry_trailers

    trailers = retry_trailers(75)
    assert dict(trailers) == {"retry-after-ms": "75", "grpc-retry-pushback-ms": "75"}
    assert retry_after_ms(trailers) == 75
    assert retry_after_ms(()) is None and retry_after_ms([("retry-after-ms", "soon")]) is None


def test_the_loop_goes_off_inline_work_only_when_models_saturate_it() -> None:
    import asyncio
    import time

    from edgewise.runtime.serving.shedding import LoopLoad

    async def scenario() -> list[bool]:
        load = LoopLoad(asyncio.get_running_loop(), window=3600, hold=0.3)  # sampled by hand
        seen = []
        # Saturated by gRPC's own work (no model time): stays inline.
        load.sample()
        time.sleep(0.2)
        load.sample()
        seen.append(load.busy)
        # Saturated by models running inline: off the loop.
        time.sleep(0.2)
        load.inline_seconds += 0.15
        load.sample()
        seen.append(load.busy)
        # Idle again, but within the hold time: still off.
        await asyncio.sleep(0.1)
        load.sample()
        seen.append(load.busy)
        # Idle past the hold time (and nothing shed): back inline.
        await asyncio.sleep(0.4)
        load.sample()
        seen.append(load.busy)
        load.close()
        return seen

    assert asyncio.run(scenario()) == [False, True, True, False]


async def shedding_server(
    shedder: Any, model_infer: Any, interceptors: Sequence[Any] = ()
) -> tuple[Any, int]:
    """A started grpc.aio server on loopback whose ModelInfer (``model_infer``) the shedder
    serves, behind ``interceptors``; and its port."""
    import grpc

    shedder.add_service(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
    )
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((shedder,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_shedding_counts_every_call_until_its_task_ends_and_never_leaks() -> None:
    import asyncio

    import grpc

    from edgewise.runtime.serving.shedding import LoadShedder

    method = "/inference.GRPCInferenceService/ModelInfer"

    async def scenario() -> tuple[list[str], int, int]:
        shedder = LoadShedder(limit=3, retry_ms=20, methods=frozenset({method}))

        async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await asyncio.sleep(0.3)
            return b""

        server, port = await shedding_server(shedder, slow)
        codes: list[str] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(method)

            async def one(timeout: float) -> None:
                try:
                    await call(b"", timeout=timeout)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        assert dict(exc.trailing_metadata())["retry-after-ms"] == "20"

            # 8 at once: 3 admitted, 5 shed. Then calls that time out mid-handler: no leak.
            await asyncio.gather(*(one(5) for _ in range(8)))
            await asyncio.gather(*(one(0.05) for _ in range(3)))
            await asyncio.sleep(0.5)
            left = shedder.inflight
            await asyncio.gather(*(one(5) for _ in range(3)))
        await server.stop(None)
        return codes, left, shedder.shed

    codes, left, shed = asyncio.run(scenario())
    assert codes[:8].count("OK") == 3 and codes[:8].count("RESOURCE_EXHAUSTED") == 5, codes
    assert codes[8:11] == ["DEADLINE_EXCEEDED"] * 3
    assert left == 0 and codes[11:] == ["OK"] * 3 and shed == 5


def test_calls_refused_by_the_token_check_never_take_an_in_flight_slot() -> None:
    """The shedder is the handler lookup, after the interceptors: with its one slot taken, a
    call without a token is UNAUTHENTICATED (not shed, not counted) and one with a token is
    shed with the hint."""
    import asyncio

    import grpc

    from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet
    from edgewise.runtime.serving.shedding import LoadShedder

    method = "/inference.GRPCInferenceService/ModelInfer"
    token = "shed-test-token-0123456789"

    async def scenario() -> tuple[list[str], int, int]:
        shedder = LoadShedder(limit=1, retry_ms=20, methods=frozenset({method}))
        release = asyncio.Event()

        async def held(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await release.wait()
            return b""

        server, port = await shedding_server(
            shedder, held, [AuthInterceptor(TokenSet(inline=token), [])]
        )
        codes: list[str] = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(method)
            good = (("authorization", f"Bearer {token}"),)

            async def one(metadata: tuple[tuple[str, str], ...]) -> str:
                try:
                    await call(b"", timeout=5, metadata=metadata)
                    return "OK"
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            holder = asyncio.ensure_future(one(good))
            while shedder.inflight < 1:
                await asyncio.sleep(0.01)
            codes += await asyncio.gather(*(one(()) for _ in range(5)))
            in_flight = shedder.inflight
            codes.append(await one(good))
            release.set()
            codes.append(await holder)
        await server.stop(None)
        return codes, in_flight, shedder.shed

    codes, in_flight, shed = asyncio.run(scenario())
    assert codes == ["UNAUTHENTICATED"] * 5 + ["RESOURCE_EXHAUSTED", "OK"], codes
    assert in_flight == 1 and shed == 1


def test_a_saturated_loop_without_a_backlog_goes_back_inline_after_a_probe() -> None:
    """Closed-loop clients can saturate the loop with nothing waiting: a short probe on threads
    shows every call (fewer than the limit, none shed), and requests go back inline for the
    quiet period; then the next saturated window probes again."""
    import asyncio
    import time

    from edgewise.runtime.serving.shedding import LoopLoad

    async def scenario() -> list[bool]:
        load = LoopLoad(
            asyncio.get_running_loop(),
            window=3600,  # sampled by hand
            hold=0.3,
            in_flight=lambda: 4,
            limit=10,
            probe=0.05,
            quiet=0.5,
        )
        seen = []

        def saturated_by_models(seconds: float) -> None:
            time.sleep(seconds)  # the loop never idles
            load.inline_seconds += 0.8 * seconds
            load.sample()
            seen.append(load.busy)

        load.sample()
        saturated_by_models(0.1)  # busy: the probe starts
        saturated_by_models(0.1)  # probe over: 4 in flight of 10, nothing shed -> inline
        saturated_by_models(0.1)  # still saturated, but within the quiet period: inline
        saturated_by_models(0.5)  # quiet period over: the next probe
        load.close()
        assert load.probes_cleared == 1
        return seen

    assert asyncio.run(scenario()) == [True, False, False, True]


def test_a_probe_that_finds_a_backlog_keeps_the_work_off_the_loop() -> None:
    """A probe that sees the limit reached (or sheds) leaves the work on threads; once nothing
    is shed for the hold time a new probe runs, and when the overload is over requests go back
    inline although the loop stays saturated."""
    import asyncio
    import time

    from edgewise.runtime.serving.shedding import LoopLoad

    in_flight = {"now": 10}
    shed_at = {"last": -1e9}

    async def scenario() -> list[bool]:
        load = LoopLoad(
            asyncio.get_running_loop(),
            window=3600,
            hold=0.2,
            last_shed=lambda: shed_at["last"],
            in_flight=lambda: in_flight["now"],
            limit=10,
            probe=0.05,
            quiet=0.5,
        )
        seen = []

        def saturated_by_models(seconds: float) -> None:
            time.sleep(seconds)
            load.inline_seconds += 0.8 * seconds
            load.sample()
            seen.append(load.busy)

        load.sample()
        saturated_by_models(0.1)  # probe starts with 10 of 10 in flight
        shed_at["last"] = time.monotonic()  # and the shedder refuses a call
        saturated_by_models(0.1)  # probe over, it found a backlog: stay on threads
        saturated_by_models(0.1)  # within the hold time: no new probe, still on threads
        in_flight["now"] = 3  # the overload ends; the loop stays saturated
        saturated_by_models(0.25)  # nothing shed for the hold time: a new probe
        saturated_by_models(0.1)  # it finds 3 of 10 and no shedding: inline
        load.close()
        return seen

    assert asyncio.run(scenario()) == [True, True, True, True, False]


def test_service_handlers_are_what_the_generated_code_registers() -> None:
    from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
    from edgewise.runtime.serving.shedding import service_handlers

    servicer = pb_grpc.GRPCInferenceServiceServicer()
    service, handlers = service_handlers(
        pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer
    )
    assert service == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ModelInfer"} <= set(handlers)
    assert handlers["ModelInfer"].unary_unary == servicer.ModelInfer
