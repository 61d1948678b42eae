"""One function per pipeline step; each raises :class:`StepFailed` with the reason when its step
fails. The runner (:mod:`.runner`) times them, caches them and records them.

The train contract (docs/pipeline.md): the user's command runs in the training code's folder with
these variables set, and must exit 0 having written a fitted scikit-learn estimator or pipeline
with ``joblib.dump`` (or ``pickle``) at ``EDGEWISE_MODEL_OUT``:

- ``EDGEWISE_TRAIN_DATA``: the training rows (Parquet; every column of the data, the holdout
  rows left out);
- ``EDGEWISE_LABEL``: the label column; ``EDGEWISE_FEATURES``: the feature columns (JSON list),
  in the order the model must be fit on;
- ``EDGEWISE_MODEL_OUT``: where to write the model (``.joblib``);
- ``EDGEWISE_RUN_ID``; ``EDGEWISE_SEED`` (the data step's seed); ``PYTHONHASHSEED`` is ``0``
  unless ``[train] env`` sets it.

``{data}``, ``{model}`` and ``{label}`` in the command's arguments are replaced by the same paths
and name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgewise.runtime._fs import replacing, write_text_atomic
from edgewise.runtime.errors import EdgewiseError, ModelNotFound
from edgewise.runtime.package.manifest import MODEL_FILE, sha256_file
from edgewise.runtime.pipeline.spec import CaptureSource, DataStep, FeatureServiceSource, TrainStep
from edgewise.runtime.store.base import Store, VersionRecord
from edgewise.runtime.store.lineage import data_fingerprint

__all__ = [
    "DataSet",
    "StepFailed",
    "cached_folder",
    "compare_schema",
    "export_capture",
    "fetch_baseline",
    "load_data",
    "run_train",
]

DONE_FILE = "done.json"
TRAIN_MODEL = "model.joblib"
_TAIL = 400


class StepFailed(EdgewiseError):
    """A step of a run failed; ``step`` names it."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


# ---- data ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    train: Any  # pandas.DataFrame: the training rows, every column
    holdout: Any  # pandas.DataFrame: the evaluation rows
    features: tuple[str, ...]
    label: str
    fingerprint: str  # sha256 over the data file (and the holdout file)
    schema: list[dict[str, str]]  # [{name, dtype}] of the features and the label
    rows: int
    path: Path  # the file read (a capture's export)

    def split_info(self, spec: DataStep) -> dict[str, Any]:
        if spec.holdout is not None:
            return {"holdout": str(spec.holdout)}
        return {"holdout_fraction": spec.holdout_fraction, "seed": spec.seed}


def _load(path: Path, what: str) -> Any:
    from edgewise.runtime.package.tabular import load_table

    try:
        return load_table(path)
    except EdgewiseError as exc:
        raise StepFailed("data", f"{what}: {exc.message}") from None


FEATURES_EXPORT = "features.parquet"


def join_feature_service(source: FeatureServiceSource, destination: Path) -> dict[str, Any]:
    """Write the entity rows of ``source`` joined point in time with its feature service's
    values (``historical_features``, no Feast) to ``destination``; what was joined (the service
    and its version, the last update of its registry entry), for the run's lineage."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from edgewise.runtime.serving.offline_features import historical_features
    from edgewise.runtime.serving.online_store import read_registry

    if not source.entities.is_file():
        raise StepFailed("data", f"feature_service entities {source.entities}: no such file")
    rows = _load(source.entities, f"feature_service entities {source.entities}")
    try:
        frame = historical_features(
            rows,
            source.registry,
            source.project,
            feature_service=source.service,
            timestamp_column=source.timestamp,
        )
        registry = read_registry(source.registry, source.project)
    except (ValueError, OSError) as exc:
        raise StepFailed("data", f"feature service {source.service!r}: {exc}") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    with replacing(destination) as temporary:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), temporary)
    updated = registry.service_updated.get(source.service)
    keys = sorted(
        {c.name for view, _ in registry.services[source.service] for c in
         registry.views[view].entity_columns}
    )  # fmt: skip
    return {
        "feature_service": source.service,
        "feature_service_version": "" if updated is None else f"{updated:.6f}",
        "feature_registry": str(source.registry),
        "feature_project": source.project,
        "entities": str(source.entities),
        "entity_columns": [*keys, source.timestamp],
    }


CAPTURE_COLUMNS = ("model", "version", "request_id", "row", "timestamp")
"""Columns of a capture export that are not features (nor are its ``output.*`` columns)."""
CAPTURE_EXPORT = "captured.parquet"


def export_capture(source: CaptureSource, destination: Path) -> dict[str, Any]:
    """Write the labelled rows of a capture folder to ``destination`` (Parquet): the one labelled
    export of ``edgewise capture export --labelled``; what was exported (model, version, rows)."""
    import pyarrow.parquet as pq

    from edgewise.runtime.serving.capture_read import export

    try:
        exported = export(source.folder, source.model, source.version, repo=source.repo)
    except EdgewiseError as exc:
        raise StepFailed("data", f"capture {source.folder}: {exc.message}") from None
    destination.parent.mkdir(parents=True, exist_ok=True)
    with replacing(destination) as temporary:
        pq.write_table(exported.table, temporary)
    return {"model": source.model, "version": exported.version, "rows": exported.table.num_rows}


def load_data(
    spec: DataStep,
    path: Path | None = None,
    run_dir: Path | None = None,
    *,
    slice_by: Sequence[str] = (),
) -> tuple[DataSet, dict[str, Any]]:
    """Read, check and split the data (``path`` replaces the spec's file or capture; a capture
    is exported into ``run_dir`` first); the data set, and where it came from. ``slice_by``:
    the evaluation's slice columns, which the data (and the holdout file) must have."""
    import numpy as np

    origin: dict[str, Any] = {"source": "file"}
    if path is not None:
        source = path
    elif spec.capture is not None:
        if run_dir is None:
            raise StepFailed("data", "a capture source needs the run's folder")
        source = run_dir / CAPTURE_EXPORT
        exported = export_capture(spec.capture, source)
        origin = {"source": "capture", "capture_dir": str(spec.capture.folder), **exported}
    elif spec.feature_service is not None:
        if run_dir is None:
            raise StepFailed("data", "a feature service source needs the run's folder")
        source = run_dir / FEATURES_EXPORT
        origin = {"source": "feature_service", **join_feature_service(spec.feature_service, source)}
    else:
        assert spec.path is not None
        source = spec.path
    if not source.is_file():
        raise StepFailed("data", f"{source}: no such file")
    frame = _load(source, str(source))
    paths = [source]
    columns = [str(c) for c in frame.columns]
    if spec.label not in columns:
        shown = ", ".join(columns[:12]) + (" ..." if len(columns) > 12 else "")
        raise StepFailed("data", f"{source}: no label column {spec.label!r} (columns: {shown})")
    features = spec.features or tuple(
        c
        for c in columns
        if c != spec.label
        and not (spec.capture is not None and (c in CAPTURE_COLUMNS or c.startswith("output.")))
        and c not in origin.get("entity_columns", ())  # join keys and the rows' timestamps
    )
    missing = [c for c in features if c not in columns]
    if missing:
        raise StepFailed("data", f"{source}: missing feature column(s) {', '.join(missing[:8])}")
    if not features:
        raise StepFailed("data", f"{source}: no feature column besides the label")
    no_slice = [c for c in slice_by if c not in columns]
    if no_slice:
        raise StepFailed(
            "data", f"{source}: no column {no_slice[0]!r} ([evaluate] slice_by names it)"
        )
    if spec.holdout is not None:
        if not spec.holdout.is_file():
            raise StepFailed("data", f"holdout {spec.holdout}: no such file")
        holdout = _load(spec.holdout, f"holdout {spec.holdout}")
        absent = [c for c in (*features, spec.label) if c not in holdout.columns]
        if absent:
            raise StepFailed("data", f"holdout {spec.holdout}: missing column(s) {absent[:8]}")
        no_slice = [c for c in slice_by if c not in holdout.columns]
        if no_slice:
            raise StepFailed(
                "data",
                f"holdout {spec.holdout}: no column {no_slice[0]!r} ([evaluate] slice_by names it)",
            )
        train = frame
        paths.append(spec.holdout)
    else:
        n = len(frame)
        n_hold = round(n * spec.holdout_fraction)
        if n_hold < 1 or n - n_hold < 1:
            raise StepFailed("data", f"{source}: {n} row(s) cannot be split into train and holdout")
        order = np.random.default_rng(spec.seed).permutation(n)
        holdout_rows = np.sort(order[:n_hold])
        train_rows = np.sort(order[n_hold:])
        train = frame.iloc[train_rows].reset_index(drop=True)
        holdout = frame.iloc[holdout_rows].reset_index(drop=True)
    if train[spec.label].isna().all():
        raise StepFailed("data", f"{source}: label column {spec.label!r} has no value")
    schema = [{"name": c, "dtype": str(frame[c].dtype)} for c in (*features, spec.label)]
    data = DataSet(
        train=train,
        holdout=holdout,
        features=tuple(features),
        label=spec.label,
        fingerprint=data_fingerprint(paths),
        schema=schema,
        rows=len(frame),
        path=source,
    )
    return data, origin


def compare_schema(
    previous: Sequence[Mapping[str, str]], current: Sequence[Mapping[str, str]]
) -> str:
    """What changed between two schemas, one line ("" when nothing did)."""
    before = {str(c["name"]): str(c["dtype"]) for c in previous}
    after = {str(c["name"]): str(c["dtype"]) for c in current}
    parts = []
    added = [c for c in after if c not in before]
    removed = [c for c in before if c not in after]
    retyped = [
        f"{c} {before[c]} -> {after[c]}" for c in after if c in before and before[c] != after[c]
    ]
    if added:
        parts.append(f"added {', '.join(added[:8])}")
    if removed:
        parts.append(f"removed {', '.join(removed[:8])}")
    if retyped:
        parts.append(f"retyped {', '.join(retyped[:8])}")
    if not parts and list(before) != list(after):
        parts.append("columns reordered")
    return "; ".join(parts)


# ---- the step cache ------------------------------------------------------------------------


def read_done(folder: Path) -> dict[str, Any] | None:
    """The marker a finished cached step wrote last (None: not finished, or unreadable)."""
    try:
        data = json.loads((folder / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def cached_folder(cache: Path, step: str, key: str) -> Iterator[Path]:
    """A private folder to build a step's outputs in; when the block ends without an error it
    becomes ``cache/<step>-<key>`` (by one rename, so a cache entry is whole or absent; the
    block writes :data:`DONE_FILE` last). Left as it was on an error."""
    cache.mkdir(parents=True, exist_ok=True)
    final = cache / f"{step}-{key}"
    scratch = Path(tempfile.mkdtemp(prefix=f".{step}-", dir=cache))
    try:
        yield scratch
        if final.exists():
            shutil.rmtree(final)  # a stale entry without its marker, or an identical one
        os.replace(scratch, final)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


def write_done(folder: Path, data: Mapping[str, Any]) -> None:
    write_text_atomic(folder / DONE_FILE, json.dumps(dict(data), sort_keys=True))


# ---- train ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    model_sha256: str
    seconds: float


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:_TAIL] if lines else ""


def run_train(
    spec: TrainStep,
    *,
    train_data: Path,
    out_dir: Path,
    features: Sequence[str],
    label: str,
    run_id: str,
    seed: int,
    log_path: Path,
) -> TrainResult:
    """Run the user's command (module docstring) and check it wrote a model that loads."""
    model_out = out_dir / TRAIN_MODEL
    replace = {"{data}": str(train_data), "{model}": str(model_out), "{label}": label}
    argv = [spec.command[0]]
    for arg in spec.command[1:]:
        text = arg
        for placeholder, value in replace.items():
            text = text.replace(placeholder, value)
        argv.append(text)
    env = {**os.environ, "PYTHONHASHSEED": "0", **spec.env}
    env.update(
        EDGEWISE_TRAIN_DATA=str(train_data),
        EDGEWISE_MODEL_OUT=str(model_out),
        EDGEWISE_LABEL=label,
        EDGEWISE_FEATURES=json.dumps(list(features)),
        EDGEWISE_RUN_ID=run_id,
        EDGEWISE_SEED=str(seed),
    )
    started = time.perf_counter()
    try:
        with log_path.open("wb") as log:
            done = subprocess.run(
                argv,
                cwd=spec.code,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=spec.timeout_s,
                check=False,
            )
    except FileNotFoundError:
        raise StepFailed("train", f"command {argv[0]!r} not found") from None
    except PermissionError:
        raise StepFailed("train", f"command {argv[0]!r} is not executable") from None
    except subprocess.TimeoutExpired:
        raise StepFailed(
            "train", f"command did not finish within {spec.timeout_s:g} s (log: {log_path})"
        ) from None
    seconds = time.perf_counter() - started
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if done.returncode != 0:
        last = _last_line(output)
        raise StepFailed(
            "train",
            f"command exited with {done.returncode}"
            + (f": {last}" if last else "")
            + f" (log: {log_path})",
        )
    if not model_out.is_file():
        raise StepFailed(
            "train",
            f"command exited 0 but wrote no model at EDGEWISE_MODEL_OUT ({model_out}; "
            f"log: {log_path})",
        )
    from edgewise.runtime.convert.converter import load_model

    try:
        model = load_model(model_out)
    except EdgewiseError as exc:
        raise StepFailed("train", f"the model it wrote does not load: {exc.message}") from None
    if not hasattr(model, "predict"):
        raise StepFailed(
            "train", f"{model_out} holds a {type(model).__name__}, not a fitted estimator"
        )
    return TrainResult(model_out, sha256_file(model_out), seconds)


# ---- baseline --------------------------------------------------------------------------------


def current_version(store: Store, model: str, alias: str | None) -> VersionRecord | None:
    """The version ``alias`` names now (None: no alias, no model or no such alias)."""
    if alias is None:
        return None
    try:
        return store.resolve_alias(model, alias)
    except ModelNotFound:
        return None


def fetch_baseline(store: Store, record: VersionRecord, into: Path) -> Path:
    """Download a version's package to ``into/<name>/<version>`` (checked by sha256)."""
    from edgewise.runtime.store.transfer import fetch_file

    folder = into / record.name / str(record.version)
    folder.mkdir(parents=True, exist_ok=True)
    for entry in record.files:
        fetch_file(store, record, entry, folder)
    return folder


def onnx_sha256(package: Path) -> str:
    return sha256_file(package / MODEL_FILE)
