"""``edgewise capture ls|stats|export``: what ``serve --capture-dir`` wrote, and the labelled
dataset for training (captured rows joined with feedback labels by request id). Reads the
capture folder only (no server needed); never creates or changes it."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_capture"]


def add_capture(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "capture",
        help="list captured requests, or export them with their labels for training",
        description="Read the folder a server captured requests into (serve --capture-dir): "
        "list its files, summarise it, or export a model version's captured rows joined with "
        "the feedback labels (sent with `edgewise feedback` to that server, or given as a "
        "table) as one Parquet file for training. Needs pip install edgewise[data].",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="every captured file, oldest first")
    ls.add_argument("model", nargs="?", default="", help="only this model")
    stats = actions.add_parser("stats", help="rows, files, bytes and labels per model version")
    stats.add_argument("model", nargs="?", default="", help="only this model")
    export = actions.add_parser(
        "export",
        help="write a model version's captured rows (and labels) as one Parquet file",
        description="Columns: one per feature (named as in the package's manifest when "
        "--repo has the version, else <input>_<i>), label, model, version, request_id, row, "
        "timestamp and the answered outputs (output.<name>).",
    )
    export.add_argument("model")
    export.add_argument(
        "--version", default="", help="model version (default: the highest one captured)"
    )
    export.add_argument("--output", type=Path, required=True, help="the Parquet file to write")
    export.add_argument(
        "--labelled", action="store_true", help="only rows with a label (the training set)"
    )
    export.add_argument(
        "--labels",
        type=Path,
        help="a table of request_id,label[,row] (as `edgewise feedback` reads) joined too; its "
        "labels win over those the server recorded",
    )
    export.add_argument(
        "--repo",
        type=Path,
        default=Path("model-repo"),
        help="the model repository (default model-repo), for the package's feature names",
    )
    for parser in (ls, stats, export):
        parser.add_argument(
            "--capture-dir", type=Path, required=True, help="the server's --capture-dir"
        )
    p.set_defaults(handler=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    if args.action == "ls":
        return _ls(args.capture_dir, args.model)
    if args.action == "stats":
        return _stats(args.capture_dir, args.model)
    return _export(args)


def _ls(root: Path, model: str) -> int:
    from edgewise.runtime.serving.capture_read import list_capture

    print(f"{'MODEL':<20} {'VERSION':>8} {'ROWS':>8} {'BYTES':>10}  FILE")
    for item in list_capture(root, model):
        print(
            f"{item.model:<20} {item.folder:>8} {item.rows:>8} {item.bytes:>10}  "
            f"{item.path.relative_to(root)}"
        )
    return 0


def _stats(root: Path, model: str) -> int:
    from edgewise.runtime.serving.capture_read import list_capture

    totals: dict[tuple[str, str], list[int]] = {}
    for item in list_capture(root, model):
        entry = totals.setdefault((item.model, item.folder), [0, 0, 0])
        entry[0] += 1
        entry[1] += item.rows
        entry[2] += item.bytes
    print(f"{'MODEL':<20} {'VERSION':>8} {'FILES':>6} {'ROWS':>9} {'BYTES':>11}")
    for (name, folder), (files, rows, size) in sorted(totals.items()):
        print(f"{name:<20} {folder:>8} {files:>6} {rows:>9} {size:>11}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from edgewise.runtime.serving.capture import require_pyarrow

    require_pyarrow()  # one line naming the extra, before pyarrow is imported
    import pyarrow.parquet as pq

    from edgewise.runtime._fs import replacing
    from edgewise.runtime.cli.labels import read_labels
    from edgewise.runtime.serving.capture_read import export

    given = None
    if args.labels is not None:
        given = {(i, r): label for i, r, label in read_labels(args.labels)}
    result = export(
        args.capture_dir,
        args.model,
        args.version,
        repo=args.repo,
        labels=given,
        labelled_only=args.labelled,
    )
    dataset = result.table
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with replacing(args.output) as temporary:
        pq.write_table(dataset, temporary)
    unlabelled = dataset.column("label").null_count
    print(
        f"wrote {args.output}: {dataset.num_rows} rows of model {args.model} version "
        f"{result.version}, {dataset.num_rows - unlabelled} labelled"
    )
    return 0
