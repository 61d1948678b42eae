"""Reading a capture folder (what ``serve --capture-dir`` wrote): its files, their summary, and
the labelled dataset of ``edgewise capture export`` (captured rows joined with the feedback
labels by request id and row). Reads only: nothing here creates or changes the folder.

Needs pyarrow (the ``edgewise[data]`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Feature
from edgewise.runtime.serving.capture import require_pyarrow
from edgewise.runtime.serving.capture_files import LABELS_FOLDER, captured_files

__all__ = [
    "CapturedFile",
    "Export",
    "captured_versions",
    "export",
    "label_rows",
    "labelled_dataset",
    "list_capture",
    "read_captured",
]


@dataclass(frozen=True)
class CapturedFile:
    path: Path
    model: str
    folder: str  # a version, or "labels"
    rows: int
    bytes: int


def _folder(root: Path) -> Path:
    if not root.is_dir():
        raise InvalidInput(f"capture-dir {root}: no such folder")
    return root


def list_capture(root: Path, model: str = "") -> list[CapturedFile]:
    """Every complete file of the folder (of ``model``), oldest first, with its row count."""
    require_pyarrow()
    import pyarrow.parquet as pq

    out = []
    for path in captured_files(_folder(root)):
        relative = path.relative_to(root).parts
        if len(relative) != 3 or (model and relative[0] != model):
            continue
        rows = pq.ParquetFile(path).metadata.num_rows
        out.append(CapturedFile(path, relative[0], relative[1], rows, path.stat().st_size))
    return out


def captured_versions(root: Path, model: str) -> list[str]:
    """The versions of ``model`` with captured requests, in numeric order."""
    folder = _folder(root) / model
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if p.is_dir() and p.name != LABELS_FOLDER]
    return sorted(names, key=lambda v: (len(v), v))


def read_captured(root: Path, model: str, version: str) -> Any:
    """The captured rows of one model version as one pyarrow Table (files oldest first)."""
    require_pyarrow()
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = list(captured_files(_folder(root) / model / version))
    if not paths:
        raise InvalidInput(f"{root}: nothing captured for model {model!r} version {version}")
    return pa.concat_tables([pq.read_table(p) for p in paths], promote_options="permissive")


def label_rows(root: Path, model: str) -> dict[tuple[str, int], object]:
    """The feedback labels the server recorded for ``model``: (request_id, row) -> label (the
    latest label of a row wins), typed as they were sent."""
    require_pyarrow()
    import pyarrow.parquet as pq

    labels: dict[tuple[str, int], object] = {}
    for path in captured_files(_folder(root) / model / LABELS_FOLDER):
        table = pq.read_table(path).to_pydict()
        for request_id, row, text, kind in zip(
            table["request_id"], table["row"], table["label"], table["label_type"], strict=True
        ):
            labels[(request_id, int(row))] = _typed(text, kind)
    return labels


def _typed(text: str, kind: str) -> object:
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return text


def _label_array(values: Sequence[object]) -> Any:
    """A typed label column: int64 when every label is a whole number, float64 when every one
    is a number, else text (null where a row has none)."""
    import pyarrow as pa

    present = [v for v in values if v is not None]
    if present and all(isinstance(v, int) for v in present):
        return pa.array(values, pa.int64())
    if present and all(isinstance(v, int | float) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())  # type: ignore[arg-type]
    return pa.array([None if v is None else str(v) for v in values], pa.string())


def _feature_columns(table: Any, features: Iterable[Feature]) -> dict[str, Any]:
    """Each feature of the package as its own column, taken from its input tensor's column."""
    import pyarrow as pa

    columns: dict[str, Any] = {}
    for feature in features:
        source = f"input.{feature.input}"
        if source not in table.column_names:
            raise InvalidInput(
                f"the captured rows have no input {feature.input!r} for feature {feature.name!r}"
            )
        column = table.column(source).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            columns[feature.name] = pa.array(values[:, feature.column])
        else:
            columns[feature.name] = column
    return columns


def _tensor_columns(table: Any) -> dict[str, Any]:
    """Without a package: each input tensor's values as columns ``<input>_<i>`` (one column
    ``<input>`` where there is one value per row)."""
    import pyarrow as pa

    columns: dict[str, Any] = {}
    for name in table.column_names:
        if not name.startswith("input."):
            continue
        short = name.removeprefix("input.")
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            width = column.type.list_size
            values = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            for index in range(width):
                columns[f"{short}_{index}"] = pa.array(values[:, index])
        else:
            columns[short] = column
    return columns


def labelled_dataset(
    table: Any,
    labels: Mapping[tuple[str, int], object],
    features: Sequence[Feature] | None,
    *,
    labelled_only: bool,
) -> Any:
    """The training table: a column per feature (named by the package's features, else by the
    input tensors), ``label``, then ``model``, ``version``, ``request_id``, ``row``, ``timestamp``
    and the answered outputs (``output.<name>``). ``labelled_only``: only rows with a label."""
    import pyarrow as pa

    ids = table.column("request_id").to_pylist()
    rows = table.column("row").to_pylist()
    joined = [labels.get((i, r)) if i else None for i, r in zip(ids, rows, strict=True)]
    if labelled_only:
        keep = np.array([label is not None for label in joined], dtype=bool)
        table = table.filter(pa.array(keep))
        joined = [label for label in joined if label is not None]
    columns = _feature_columns(table, features) if features else _tensor_columns(table)
    if "label" in columns:
        raise InvalidInput("a feature is named 'label': it would clash with the label column")
    columns["label"] = _label_array(joined)
    for name in ("model", "version", "request_id", "row", "timestamp"):
        columns[name] = table.column(name)
    for name in table.column_names:
        if name.startswith("output."):
            columns[name] = table.column(name)
    return pa.table(columns)


@dataclass(frozen=True)
class Export:
    table: Any  # the pyarrow Table of :func:`labelled_dataset`
    version: str  # the model version exported
    labels: int  # labels known (recorded by the server and given), joined or not


def export(
    root: Path,
    model: str,
    version: str = "",
    *,
    repo: Path | None = None,
    labels: Mapping[tuple[str, int], object] | None = None,
    labelled_only: bool = True,
) -> Export:
    """What ``edgewise capture export`` writes (and a pipeline's capture data step reads): one
    model version's captured rows (``version`` "": the highest captured) joined with the labels
    the server recorded and ``labels`` (which win), feature columns named by the package in
    ``repo`` when it holds that version. One-line InvalidInput for a missing folder, a model
    never captured, or (``labelled_only``) no labelled row."""
    from edgewise.runtime.package.manifest import MANIFEST_FILE, read_manifest

    _folder(root)
    version = version or next(iter(reversed(captured_versions(root, model))), "")
    if not version:
        raise InvalidInput(f"{root}: nothing captured for model {model!r}")
    table = read_captured(root, model, version)
    known = label_rows(root, model)
    known.update(labels or {})
    features = None
    if repo is not None and (repo / model / version / MANIFEST_FILE).is_file():
        features = list(read_manifest(repo / model / version).features) or None
    dataset = labelled_dataset(table, known, features, labelled_only=labelled_only)
    if labelled_only and dataset.num_rows == 0:
        raise InvalidInput(
            f"no captured row of model {model!r} version {version} has a label "
            f"({len(known)} label(s) known)"
        )
    return Export(dataset, version, len(known))
