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
    "PartLayout",
    "ProgressMode",
    "parse_model_ref",
    "parse_size",
]

#: Rows per chunk (and part file) unless ``--chunk-rows`` says otherwise.
DEFAULT_CHUNK_ROWS: Final = 65536

ProgressMode = Literal["auto", "bar", "log", "off"]
Engine = Literal["local", "ray"]


@dataclass(frozen=True)
class PartLayout:
    """How scored rows are laid out in part files (:mod:`.compact`): a target size and an
    optional partition column. All None: one part file per chunk."""

    part_rows: int | None = None
    part_bytes: int | None = None
    partition_by: str | None = None

    @property
    def grouped(self) -> bool:
        return not (self.part_rows is None and self.part_bytes is None and not self.partition_by)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_SIZE_UNITS: Final = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30,
}  # fmt: skip


def parse_size(text: str) -> int:
    """``128MB``, ``256MiB``, ``1g``, ``5000000`` -> bytes; InvalidInput naming the value."""
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = None if match is None else _SIZE_UNITS.get(match.group(2).lower())
    if match is None or unit is None:
        raise InvalidInput(
            f"size {text!r}: expected a number of bytes with an optional unit (KB, MB, GB, KiB, "
            "MiB, GiB)"
        )
    value = int(float(match.group(1)) * unit)
    if value < 1:
        raise InvalidInput(f"size {text!r} is not at least 1 byte")
    return value


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
    layout: PartLayout = field(default_factory=PartLayout)  # --part-rows/-bytes, --partition-by
    event_timestamp: str | None = None  # the input's timestamp column for feature joins


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
