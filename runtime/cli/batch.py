"""``edgewise batch``: the subcommand (registered by
:func:`edgewise.runtime.cli.main.build_parser`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgewise.runtime.cli.argtypes import positive_int, positive_seconds

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_batch"]


def _size(text: str) -> int:
    from edgewise.runtime.batch.options import parse_size
    from edgewise.runtime.errors import InvalidInput

    try:
        return parse_size(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def add_batch(sub: Subparsers) -> None:
    p = sub.add_parser(
        "batch",
        help="score Parquet/CSV/NumPy files with a model, resumably",
        description="Score every row of the input files with a model package of REPO and write "
        "Parquet part files to OUTPUT: the id columns, then one column per model output. Inputs "
        "are read in chunks (memory does not grow with their size), scored with the server's "
        "onnxruntime settings, and written exactly once: after a crash, run the same command "
        "with --resume. Writes a drift report of the inputs against the model's reference "
        "profile (_drift_report.json and .html) and a summary (_summary.json).",
    )
    p.add_argument("--repo", type=Path, help="model repository folder (for --model NAME[:VERSION])")
    p.add_argument(
        "--model", required=True, metavar="NAME[:VERSION]|models:/NAME@ALIAS|models:/NAME/VERSION",
        help="a model of --repo (default version: the one the server serves by default), or a "
        "version of the store (--store) by alias or number, downloaded to --model-cache and "
        "verified (sha256, signature with --trusted-keys)",
    )  # fmt: skip
    p.add_argument(
        "--store",
        help="store URI for models:/ models: sqlite:///PATH (default ~/.edgewise/store.db), "
        "mlflow://HOST:PORT or http(s)://HOST:PORT [EDGEWISE_STORE]",
    )
    p.add_argument(
        "--store-timeout",
        type=positive_seconds,
        default=30.0,
        help="seconds per store request (default 30)",
    )
    p.add_argument(
        "--model-cache", type=Path,
        help="download folder for store versions (default ~/.cache/edgewise/models)",
    )  # fmt: skip
    p.add_argument(
        "--trusted-keys", type=Path,
        help="ed25519 public key file or folder: refuse packages not signed by one of them "
        "(keys.json beside them sets a key's not_after, revoked.json revokes keys or packages)",
    )  # fmt: skip
    p.add_argument(
        "--input", required=True, metavar="PATH_OR_GLOB",
        help="a .parquet/.csv/.npy file, a folder of them, or a glob (quote it); also on object "
        "storage (s3://bucket/prefix/*.parquet; credentials from AWS_*, AWS_ENDPOINT_URL, ...)",
    )  # fmt: skip
    p.add_argument(
        "--output", required=True, metavar="FOLDER_OR_URI",
        help="output folder or object-storage prefix (s3://, gs://, abfs://), empty or new",
    )  # fmt: skip
    p.add_argument(
        "--id-columns", nargs="+", default=[], metavar="COLUMN",
        help="input columns copied to the output beside the scores",
    )  # fmt: skip
    p.add_argument(
        "--engine", choices=["local", "ray"], default="local",
        help="local threads (default) or Ray Data actors (needs edgewise[ray])",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the job in OUTPUT")
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        help="rows per chunk, and per part file without --part-rows/--part-bytes (default 65536)",
    )
    p.add_argument(
        "--threads", type=positive_int,
        help="scorer threads (default: the worker threads of the CPU budget)",
    )  # fmt: skip
    p.add_argument("--intra-op-threads", type=positive_int, help="onnxruntime intra-op threads")
    p.add_argument(
        "--no-drift-report", action="store_true", help="skip the input statistics and drift"
    )
    p.add_argument(
        "--progress", choices=["auto", "bar", "log", "off"], default="auto",
        help="a bar on a terminal, log lines otherwise (default auto)",
    )  # fmt: skip
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.add_argument("--ray-actors", type=positive_int, help="scoring actors (default: cluster CPUs)")
    p.add_argument(
        "--carry-columns", action="store_true",
        help="copy every input column to the output, after the id columns (SageMaker's join "
        "source); input columns named like a model output are left out, with a warning",
    )  # fmt: skip
    p.add_argument(
        "--part-rows", type=positive_int, metavar="N",
        help="compact the output: a part file closes once it holds N rows or more (whole "
        "chunks; default: one part file per chunk)",
    )  # fmt: skip
    p.add_argument(
        "--part-bytes", type=_size, metavar="SIZE",
        help="compact the output: a part file closes once SIZE bytes are written to it "
        "(128MB, 256MiB, 1GB; whole chunks)",
    )  # fmt: skip
    p.add_argument(
        "--partition-by", metavar="COLUMN",
        help="write COLUMN=VALUE/ folders (hive style) by the values of an output column: an id "
        "or carried column, or a model output; the part files leave the column out",
    )  # fmt: skip
    p.add_argument(
        "--bad-records", type=Path, metavar="FOLDER",
        help="CSV rows that fail to decode (a value that is not a number, a wrong field count), "
        "Parquet row groups that fail to decode and rows without a looked-up feature "
        "(on_missing not_found) go to JSON-lines files here with a reason, instead of failing "
        "the job (default: strict)",
    )  # fmt: skip
    p.add_argument(
        "--event-timestamp", metavar="COLUMN",
        help="for a model that looks its features up (config.json features): the input column "
        "whose time the features are joined as of, point in time from the Feast offline store "
        "(default event_timestamp)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_cmd_batch)


def _cmd_batch(args: argparse.Namespace) -> int:
    from edgewise.runtime.config.limits import prepare_process

    prepare_process()  # size numba's and BLAS's pools to the limits before they are loaded
    from edgewise.runtime.batch import BatchOptions, run_batch
    from edgewise.runtime.batch.options import PartLayout
    from edgewise.runtime.batch.progress import format_count

    summary = run_batch(
        BatchOptions(
            repo=args.repo,
            model=args.model,
            input=args.input,
            output=args.output,
            id_columns=tuple(args.id_columns),
            engine=args.engine,
            resume=args.resume,
            chunk_rows=args.chunk_rows,
            threads=args.threads,
            intra_op_threads=args.intra_op_threads,
            drift_report=not args.no_drift_report,
            progress=args.progress,
            ray_address=args.ray_address,
            ray_actors=args.ray_actors,
            store=args.store,
            store_timeout=args.store_timeout,
            model_cache=args.model_cache,
            trusted_keys=args.trusted_keys,
            bad_records=args.bad_records,
            carry_columns=args.carry_columns,
            layout=PartLayout(args.part_rows, args.part_bytes, args.partition_by),
            event_timestamp=args.event_timestamp,
        )
    )
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    if summary.already_complete:
        print(f"job in {summary.output} is already complete: {summary.rows:,} rows")
        return 0
    drift = summary.drift
    if not drift.get("available"):
        verdict = "drift report unavailable"
    elif drift.get("insufficient_data"):
        verdict = "too few rows to judge drift"
    elif drift.get("drifting"):
        verdict = f"DRIFTING: {', '.join(drift['drifting_features'])}"
    else:
        verdict = "no drift"
    origin = f" ({summary.source})" if summary.source else ""
    bad = f", {summary.bad_records:,} bad record(s) set aside" if summary.bad_records else ""
    resumed = f", resumed with {summary.rows:,} rows in all" if summary.resumed else ""
    print(
        f"scored {summary.rows_this_run:,} rows in {summary.seconds:.2f} s "
        f"({format_count(summary.rows_per_second)} rows/s{resumed}{bad}) with {summary.model} "
        f"version {summary.version}{origin} (sha256 {summary.sha256[:12]}) into {summary.parts} "
        f"part file(s) in {summary.output}; {verdict} (report: {drift.get('report', '-')})"
    )
    return 0
