"""Bad records (``--bad-records PATH``, like Spark's ``badRecordsPath``): CSV rows that fail to
decode go to ``PATH`` with a reason instead of failing the job.

Two kinds, each written atomically under a name fixed by where the rows are, so a resumed job
rewrites the same files with the same lines (never twice):

- ``PATH/rows-FFFFF-CCCCCC.jsonl``: rows of chunk ``CCCCCC`` of input ``FFFFF`` with a value
  that is not a number in a numeric feature column (``row`` is the 1-based data row of the file,
  header excluded; ``column`` names the column), written before the chunk's part file, so a chunk
  that is done has its bad rows recorded;
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

__all__ = ["BAD_GLOB", "count_bad_records", "malformed_name", "rows_name", "write_bad_records"]

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


def malformed_name(file: int) -> str:
    return f"malformed-{file:05d}.jsonl"


def count_bad_records(folder: Path) -> int:
    """Bad records in ``folder`` (every run of the job)."""
    if not folder.is_dir():
        return 0
    return sum(
        path.read_bytes().count(b"\n")
        for path in folder.glob(BAD_GLOB)
        if path.name.startswith(("rows-", "malformed-"))
    )
