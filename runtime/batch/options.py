"""The options and the summary of a batch job (no pyarrow needed to import them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import validate_model_name

__all__ = [
    "DEFAULT_CHUNK_ROWS",
    "BatchOptions",
    "BatchSummary",
    "Engine",
    "ProgressMode",
    "parse_model_ref",
]

#: Rows per chunk (and part file) unless ``--chunk-rows`` says otherwise.
DEFAULT_CHUNK_ROWS: Final = 65536

ProgressMode = Literal["auto", "bar", "log", "off"]
Engine = Literal["local", "ray"]


@dataclass(frozen=True)
class BatchOptions:
    """What ``edgewise batch`` was asked to do."""

    repo: Path | None
    model: str  # NAME or NAME:VERSION (with repo), models:/NAME@ALIAS or models:/NAME/VERSION
    input: str  # a file, a folder or a glob
    output: Path | str  # a folder, or an object-storage URI (s3://bucket/prefix)
    id_columns: tuple[str, ...] = ()
    engine: Engine = "local"
    resume: bool = False
    chunk_rows: int | None = None  # None: the default, or the resumed job's
    threads: int | None = None  # scorer threads (None: the runtime budget's worker threads)
    intra_op_threads: int | None = None  # None: the server's setting from the budget
    drift_report: bool = True
    progress: ProgressMode = "auto"
    ray_address: str | None = None
    ray_actors: int | None = None
    store: str | None = None  # a models:/ URI's store (None: $EDGEWISE_STORE, else the default)
    store_timeout: float = 30.0
    model_cache: Path | None = None  # where store versions are downloaded (None: the default)
    trusted_keys: Path | None = None  # refuse packages not signed by one of these keys
    bad_records: Path | None = None  # CSV rows that fail to decode go there (None: strict)
    carry_columns: bool = False  # copy every input column to the output (after the id columns)


@dataclass(frozen=True)
class BatchSummary:
    """What a job did; also written to ``OUT/_summary.json``."""

    output: str
    model: str
    version: int
    sha256: str
    engine: str
    inputs: int
    rows: int  # rows in the output (every run of the job)
    rows_this_run: int
    parts: int
    seconds: float  # this run, wall clock, model loading and checks included
    scoring_seconds: float  # this run, the engine's part
    rows_per_second: float  # rows_this_run / seconds
    resumed: bool
    source: str | None = None  # the models:/ URI the model came from (None: a repository)
    bad_records: int = 0  # rows set aside in --bad-records (every run of the job)
    already_complete: bool = False
    drift: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatchSummary:
        return cls(**data)


def parse_model_ref(text: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME:VERSION``."""
    name, sep, version = text.partition(":")
    validate_model_name(name)
    if not sep:
        return name, None
    if not version.isascii() or not version.isdigit() or int(version) < 1:
        raise InvalidInput(f"model {text!r}: the version must be a positive integer")
    return name, int(version)
