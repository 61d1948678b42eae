"""Bad records (``--bad-records PATH``, like Spark's ``badRecordsPath``): CSV rows and Parquet row
groups that fail to decode go to ``PATH`` with a reason instead of failing the job.

Two kinds of file, each written atomically under a name fixed by where the rows are, so a resumed
job rewrites the same files with the same lines (never twice):

- ``PATH/rows-FFFFF-CCCCCC.jsonl``: rows of chunk ``CCCCCC`` of input ``FFFFF`` with a value
  that is not a number in a numeric feature column (``row`` is the 1-based data row of the file,
  header excluded; ``column`` names the column), written before the chunk's part file, so a chunk
  that is done has its bad rows recorded; also a Parquet row group that fails to decode (a
  corrupt page): one line per row group and chunk, with ``row_group``, ``rows`` (first and last,
  1-based) and ``count`` (rows set aside), ``record`` null;
- ``PATH/features-FFFFF-CCCCCC.jsonl``: rows with no value for a looked-up feature when the
  model's ``features.on_missing`` is ``not_found`` (:mod:`.features`), written before the
  chunk's part file;
- ``PATH/malformed-FFFFF.jsonl``: rows of input ``FFFFF`` with the wrong number of fields
  (``line`` is the file's 1-based line number), written when the file has been read to its end.

Each line is a JSON object: ``input``, ``row`` or ``line``, ``column`` (or null), ``reason`` and
``record`` (the row's fields as read, or the raw line). Without ``--bad-records`` the job stays
strict: the first bad row fails it with one line naming the file, the column and the row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import write_text_atomic

__all__ = [
    "BAD_GLOB",
    "count_bad_records",
    "features_name",
    "malformed_name",
    "rows_name",
    "write_bad_records",
]

BAD_GLOB: Final = "*.jsonl"


def write_bad_records(folder: Path, name: str, records: list[dict[str, Any]]) -> None:
    """Replace ``folder/name`` with ``records``, one JSON line each (nothing for none)."""
    if not records:
        return
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    write_text_atomic(folder / name, text)


def rows_name(file: int, chunk: int) -> str:
    return f"rows-{file:05d}-{chunk:06d}.jsonl"


def features_name(file: int, chunk: int) -> str:
    """Rows of a chunk with no value for a looked-up feature (``on_missing`` ``not_found``)."""
    return f"features-{file:05d}-{chunk:06d}.jsonl"


def malformed_name(file: int) -> str:
    return f"malformed-{file:05d}.jsonl"


def count_bad_records(folder: Path) -> int:
    """Rows set aside in ``folder`` (every run of the job): a line each, or its ``count`` (a
    Parquet row group's)."""
    if not folder.is_dir():
        return 0
    total = 0
    for path in folder.glob(BAD_GLOB):
        if not path.name.startswith(("rows-", "malformed-", "features-")):
            continue
        for line in path.read_bytes().splitlines():
            if b'"count"' not in line:
                total += 1
                continue
            try:
                total += int(json.loads(line).get("count", 1))
            except (ValueError, TypeError, AttributeError):
                total += 1
    return total
