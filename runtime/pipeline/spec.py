"""The pipeline file: one TOML document, every key checked (an unknown key, a missing step or a
value of the wrong kind is one :class:`InvalidInput` naming it). Reference: docs/pipeline.md.

::

    format = 1                      # optional; the only format so far
    model = "breast-cancer"         # the registered model's name
    store = "sqlite:///store.db"    # optional (default: the embedded store); --store overrides
    workdir = ".edgewise-pipeline"  # optional: run folders and the step cache

    [data]
    path = "data.parquet"           # .parquet or .csv, relative to this file; or instead
    # capture = { dir = "capture", model = "churn", version = "3", repo = "model-repo" }
    # feature_service = { registry = "repo/data/registry.db", project = "clinic",
    #                     service = "diabetes_v1", entities = "entities.parquet" }
    label = "target"                # (default "label" with capture)
    features = ["a", "b"]           # optional: default every column but the label
    holdout = "holdout.parquet"     # optional: else holdout_fraction of the rows, by seed
    holdout_fraction = 0.25
    seed = 0
    allow_schema_change = false     # a schema unlike the last successful run's is refused

    [train]
    command = ["python", "train.py", "--C", "1.0"]   # {data} {model} {label} replaced
    code = "."                      # the training code's folder (its git commit is recorded)
    timeout_s = 3600
    env = { OMP_NUM_THREADS = "1" }

    [convert]                       # edgewise's scikit-learn -> ONNX converter
    opset = 17                      # optional
    atol = 1e-4

    [evaluate]                      # on the holdout rows, overall and per slice
    slice_by = ["region"]
    min_slice_size = 30

    [gate]                          # optional: a gate spec (see evaluation/gate.py) without [data]
    overall = { accuracy = { min = 0.9, max_degradation = 0.02 } }

    [register]
    alias = "production"            # or "candidate"; moving "production" needs a [gate]
    description = ""
"""

from __future__ import annotations

import hashlib
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.config.values import known_keys, names
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import validate_model_name
from edgewise.runtime.store.base import validate_alias

__all__ = [
    "PIPELINE_FORMAT",
    "STEPS",
    "CaptureSource",
    "ConvertStep",
    "DataStep",
    "EvaluateStep",
    "PipelineSpec",
    "RegisterStep",
    "TrainStep",
    "load_spec",
    "parse_spec",
]

PIPELINE_FORMAT: Final = 1
STEPS: Final = ("data", "train", "convert", "evaluate", "register")
"""The step tables a pipeline file must have ([gate] is optional)."""
PLACEHOLDERS: Final = ("{data}", "{model}", "{label}")
_TOP_KEYS: Final = {"format", "model", "store", "workdir", *STEPS, "gate"}
_DEFAULT_TIMEOUT_S: Final = 3600.0


@dataclass(frozen=True)
class CaptureSource:
    """What ``serve --capture-dir`` wrote, joined with its feedback labels (the labelled rows
    only), as ``edgewise capture export --labelled`` writes it."""

    folder: Path
    model: str
    version: str = ""  # "": the newest captured version
    repo: Path | None = None  # the model repository: feature columns named by the package


@dataclass(frozen=True)
class FeatureServiceSource:
    """A Feast feature service joined point in time to entity rows (a Parquet or CSV file of
    join keys, ``timestamp`` and the label, request-time columns too): docs/features.md."""

    registry: Path
    project: str
    service: str
    entities: Path
    timestamp: str = "event_timestamp"


@dataclass(frozen=True)
class DataStep:
    path: Path | None
    label: str
    features: tuple[str, ...] = ()  # empty: every column but the label
    holdout: Path | None = None
    holdout_fraction: float = 0.25
    seed: int = 0
    allow_schema_change: bool = False
    capture: CaptureSource | None = None
    feature_service: FeatureServiceSource | None = None


@dataclass(frozen=True)
class TrainStep:
    command: tuple[str, ...]
    code: Path
    timeout_s: float = _DEFAULT_TIMEOUT_S
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertStep:
    opset: int | None = None
    atol: float = 1e-4


@dataclass(frozen=True)
class EvaluateStep:
    slice_by: tuple[str, ...] = ()
    min_slice_size: int = 30


@dataclass(frozen=True)
class RegisterStep:
    alias: str | None = None
    description: str = ""


@dataclass(frozen=True)
class PipelineSpec:
    model: str
    data: DataStep
    train: TrainStep
    convert: ConvertStep
    evaluate: EvaluateStep
    register: RegisterStep
    gate: Mapping[str, Any] | None  # a gate spec's tables (evaluation.gate.GateSpec.from_mapping)
    store: str | None
    workdir: Path
    source: str  # the file it was read from
    sha256: str  # of the file's bytes
    raw: Mapping[str, Any]  # the parsed document, as recorded with each run

    @property
    def base_dir(self) -> Path:
        return Path(self.source).parent


def _where(path: str, key: str) -> str:
    return f"pipeline {path}: {key}"


def _known(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    known_keys(where, table, allowed)


def _table(data: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = data[name]
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [{name}] must be a table")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where} must be a non-empty string, not {value!r}")
    return value


def _boolean(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{where} must be true or false, not {value!r}")
    return value


def _integer(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(f"{where} must be an integer >= {low}, not {value!r}")
    return value


def _positive(value: Any, where: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidInput(f"{where} must be a positive number, not {value!r}")
    return float(value)


def _relative(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else base / path


def _feature_service(value: Any, base: Path, where: str) -> FeatureServiceSource:
    name = f"{where}: [data.feature_service]"
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [data] feature_service must be a table such as "
                           '{ registry = "data/registry.db", project = "p", service = "s", '
                           'entities = "entities.parquet" }')  # fmt: skip
    _known(value, {"registry", "project", "service", "entities", "timestamp"}, name)
    for key in ("registry", "project", "service", "entities"):
        if key not in value:
            raise InvalidInput(f"{name} {key} is missing")
    return FeatureServiceSource(
        registry=_relative(base, _text(value["registry"], f"{name} registry")),
        project=_text(value["project"], f"{name} project"),
        service=_text(value["service"], f"{name} service"),
        entities=_relative(base, _text(value["entities"], f"{name} entities")),
        timestamp=_text(value.get("timestamp", "event_timestamp"), f"{name} timestamp"),
    )


def _capture(value: Any, base: Path, where: str) -> CaptureSource:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [data] capture must be a table such as "
                           '{ dir = "capture", model = "churn" }')  # fmt: skip
    _known(value, {"dir", "model", "version", "repo"}, f"{where}: [data.capture]")
    for key in ("dir", "model"):
        if key not in value:
            raise InvalidInput(f"{where}: [data.capture] {key} is missing")
    version = value.get("version", "")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise InvalidInput(f"{where}: [data.capture] version must be a version number")
    return CaptureSource(
        folder=_relative(base, _text(value["dir"], f"{where}: [data.capture] dir")),
        model=validate_model_name(_text(value["model"], f"{where}: [data.capture] model")),
        version=str(version),
        repo=(
            _relative(base, _text(value["repo"], f"{where}: [data.capture] repo"))
            if "repo" in value
            else None
        ),
    )


def _data(table: Mapping[str, Any], base: Path, where: str) -> DataStep:
    _known(
        table,
        {
            "path", "capture", "label", "features", "holdout", "holdout_fraction", "seed",
            "allow_schema_change", "feature_service",
        },
        f"{where}: [data]",
    )  # fmt: skip
    if sum(key in table for key in ("path", "capture", "feature_service")) != 1:
        raise InvalidInput(
            f"{where}: [data] needs path (a .parquet or .csv file), capture (what serve "
            "--capture-dir wrote) or feature_service (a Feast feature service), one of them"
        )
    path: Path | None = None
    capture = None
    service = None
    if "capture" in table:
        capture = _capture(table["capture"], base, where)
    elif "feature_service" in table:
        service = _feature_service(table["feature_service"], base, where)
    else:
        path = _relative(base, _text(table["path"], f"{where}: [data] path"))
        if path.suffix.lower() not in (".parquet", ".csv"):
            raise InvalidInput(f"{where}: [data] path {path}: expected a .parquet or .csv file")
    if "label" not in table and capture is None:  # (a feature service's rows carry theirs)
        raise InvalidInput(f"{where}: [data] label is missing")
    label = _text(table.get("label", "label"), f"{where}: [data] label")
    features = names(f"{where}: [data] features", table.get("features", []))
    if label in features:
        raise InvalidInput(f"{where}: [data] features: the label {label!r} cannot be a feature")
    if len(set(features)) != len(features):
        raise InvalidInput(f"{where}: [data] features: a column is named twice")
    holdout = None
    if "holdout" in table:
        holdout = _relative(base, _text(table["holdout"], f"{where}: [data] holdout"))
        if "holdout_fraction" in table:
            raise InvalidInput(f"{where}: [data] give holdout or holdout_fraction, not both")
    fraction = table.get("holdout_fraction", 0.25)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise InvalidInput(f"{where}: [data] holdout_fraction must be between 0 and 1")
    return DataStep(
        path=path,
        capture=capture,
        feature_service=service,
        label=label,
        features=features,
        holdout=holdout,
        holdout_fraction=float(fraction),
        seed=_integer(table.get("seed", 0), f"{where}: [data] seed", 0),
        allow_schema_change=_boolean(
            table.get("allow_schema_change", False), f"{where}: [data] allow_schema_change"
        ),
    )


def _train(table: Mapping[str, Any], base: Path, where: str) -> TrainStep:
    _known(table, {"command", "code", "timeout_s", "env"}, f"{where}: [train]")
    if "command" not in table:
        raise InvalidInput(f"{where}: [train] command is missing")
    command = table["command"]
    if (
        not isinstance(command, list)
        or not command
        or not all(isinstance(item, str) for item in command)
        or not command[0]
    ):
        raise InvalidInput(
            f"{where}: [train] command must be a list of strings such as "
            '["python", "train.py"], not ' + repr(command)
        )
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in env.items()
    ):
        raise InvalidInput(f"{where}: [train] env must be a table of strings")
    reserved = sorted(k for k in env if k.startswith("EDGEWISE_"))
    if reserved:
        raise InvalidInput(f"{where}: [train] env: {reserved[0]} is set by the pipeline")
    code = _relative(base, _text(table.get("code", "."), f"{where}: [train] code"))
    return TrainStep(
        command=tuple(command),
        code=code,
        timeout_s=_positive(
            table.get("timeout_s", _DEFAULT_TIMEOUT_S), f"{where}: [train] timeout_s"
        ),
        env=dict(env),
    )


def _convert(table: Mapping[str, Any], where: str) -> ConvertStep:
    _known(table, {"opset", "atol"}, f"{where}: [convert]")
    opset = table.get("opset")
    if opset is not None:
        opset = _integer(opset, f"{where}: [convert] opset", 1)
        _check_opset(opset, where)
    atol = table.get("atol", 1e-4)
    if isinstance(atol, bool) or not isinstance(atol, int | float) or not atol >= 0:
        raise InvalidInput(f"{where}: [convert] atol must be a number >= 0")
    return ConvertStep(opset=opset, atol=float(atol))


def _check_opset(opset: int, where: str) -> None:
    """An opset the converter cannot target is refused here, not after training (without onnx
    installed the convert step says what to install)."""
    from edgewise.runtime.convert.converter import opset_range
    from edgewise.runtime.package.tabular import MissingDependency

    try:
        low, high = opset_range()
    except MissingDependency:
        return
    if not low <= opset <= high:
        raise InvalidInput(
            f"{where}: [convert] opset {opset} is not supported; choose {low} to {high}"
        )


def _evaluate(table: Mapping[str, Any], where: str) -> EvaluateStep:
    _known(table, {"slice_by", "min_slice_size"}, f"{where}: [evaluate]")
    slice_by = names(f"{where}: [evaluate] slice_by", table.get("slice_by", []))
    twice = sorted({c for c in slice_by if slice_by.count(c) > 1})
    if twice:
        raise InvalidInput(f"{where}: [evaluate] slice_by names {twice[0]!r} more than once")
    return EvaluateStep(
        slice_by=slice_by,
        min_slice_size=_integer(
            table.get("min_slice_size", 30), f"{where}: [evaluate] min_slice_size", 1
        ),
    )


def _register(table: Mapping[str, Any], where: str) -> RegisterStep:
    _known(table, {"alias", "description"}, f"{where}: [register]")
    alias = None
    if "alias" in table:
        alias = validate_alias(_text(table["alias"], f"{where}: [register] alias"))
    description = table.get("description", "")
    if not isinstance(description, str):
        raise InvalidInput(f"{where}: [register] description must be a string")
    return RegisterStep(alias=alias, description=description)


def _gate(table: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    if "data" in table:
        raise InvalidInput(
            f"{where}: [gate.data]: the gate judges on the pipeline's holdout rows; "
            "set them in [data] and slices in [evaluate]"
        )
    from edgewise.runtime.evaluation.gate import GateSpec

    GateSpec.from_mapping(table, source=f"{where}: [gate]")  # every rule checked now
    return table


def parse_spec(data: Mapping[str, Any], *, source: str, sha256: str = "") -> PipelineSpec:
    """A spec from the parsed document; ``source`` is the file (relative paths start beside it)."""
    where = f"pipeline {source}"
    _known(data, _TOP_KEYS, where)
    missing = [step for step in STEPS if step not in data]
    if missing:
        raise InvalidInput(
            f"{where}: missing step(s) {', '.join(f'[{s}]' for s in missing)} "
            f"(a pipeline has {', '.join(f'[{s}]' for s in STEPS)}, and optionally [gate])"
        )
    version = data.get("format", PIPELINE_FORMAT)
    if version != PIPELINE_FORMAT:
        raise InvalidInput(f"{where}: format {version!r} is not known (expected 1)")
    if "model" not in data:
        raise InvalidInput(f"{where}: model (the registered model's name) is missing")
    model = validate_model_name(_text(data["model"], f"{where}: model"))
    base = Path(source).parent
    store = _text(data["store"], f"{where}: store") if "store" in data else None
    workdir = _relative(base, _text(data.get("workdir", ".edgewise-pipeline"), f"{where}: workdir"))
    register = _register(_table(data, "register", where), where)
    gate = _gate(_table(data, "gate", where), where) if "gate" in data else None
    if register.alias == "production" and gate is None:
        raise InvalidInput(
            f"{where}: [register] alias = 'production' needs a [gate] (what a candidate must "
            "meet against what production serves now)"
        )
    return PipelineSpec(
        model=model,
        data=_data(_table(data, "data", where), base, where),
        train=_train(_table(data, "train", where), base, where),
        convert=_convert(_table(data, "convert", where), where),
        evaluate=_evaluate(_table(data, "evaluate", where), where),
        register=register,
        gate=gate,
        store=store,
        workdir=workdir,
        source=source,
        sha256=sha256,
        raw=dict(data),
    )


def load_spec(path: Path) -> PipelineSpec:
    """Read and check a pipeline file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidInput(f"pipeline {path}: no such file") from None
    except OSError as exc:
        raise InvalidInput(f"pipeline {path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"pipeline {path}: not valid TOML: {exc}") from None
    return parse_spec(data, source=str(path.resolve()), sha256=hashlib.sha256(raw).hexdigest())
