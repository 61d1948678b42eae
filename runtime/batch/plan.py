"""What an engine needs to run a job, and what it reports back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.runtime.batch.objectfolder import ObjectJobFolder
from edgewise.runtime.batch.options import PartLayout
from edgewise.runtime.batch.reader import ColumnSpec, InputFile
from edgewise.runtime.batch.writer import ChunkRecord, JobFolder
from edgewise.runtime.serving.model import SessionSettings

__all__ = ["EngineResult", "JobPlan"]


@dataclass
class JobPlan:
    """A job ready to run: its inputs, columns, chunking, output schema and finished chunks."""

    out: Path | str  # a local folder, or an object-storage URI
    folder: JobFolder | ObjectJobFolder
    files: list[InputFile]
    columns: ColumnSpec
    chunk_rows: int
    schema: Any  # pyarrow.Schema of every part file
    done: dict[tuple[int, int], ChunkRecord]
    model_name: str
    version: int
    version_dir: Path
    session: SessionSettings
    bad_records: Path | None = None  # --bad-records: CSV rows that fail to decode go there
    layout: PartLayout = field(default_factory=PartLayout)  # grouped parts (:mod:`.compact`)
    read_columns: ColumnSpec | None = None  # what the inputs hold, when not ``columns``
    join: Any = None  # a :class:`~edgewise.runtime.batch.features.FeatureJoin`, or None

    def done_chunks(self, file: int) -> set[int]:
        return {chunk for (f, chunk) in self.done if f == file}


@dataclass
class EngineResult:
    rows_scored: int
    chunks_scored: int
    seconds: float
    # Chunks of the files an engine read to their end (how a CSV file's chunk count is learnt).
    file_chunks: dict[int, int] = field(default_factory=dict)
