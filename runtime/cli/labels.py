"""The labels table of ``edgewise feedback``: columns ``request_id``, ``label`` and optionally
``row`` (default 0), as CSV or Parquet.

Request ids are strings (``00042`` stays ``00042``). Every cell is checked before anything is
sent: an empty id or label, a row that is no whole number, a label that is not a finite number
where a number is wanted, each ends the command with one line naming the file, line and column.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Final, Literal

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.tabular import load_table, require_pandas, table_format

__all__ = ["LABEL_TYPES", "LabelType", "read_labels"]

LabelType = Literal["auto", "int", "float", "str"]
#: ``--label-type``: auto reads a whole number as a class index, another number as a value
#: (regressors) and anything else as a class name; the others force one reading.
LABEL_TYPES: Final[tuple[LabelType, ...]] = ("auto", "int", "float", "str")

_WHOLE: Final = re.compile(r"[+-]?\d+")
_MAX_ROW: Final = 2**32 - 1  # Label.row is a uint32


def read_labels(
    path: Path, label_type: LabelType = "auto"
) -> list[tuple[str, int, int | float | str]]:
    """``(request_id, row, label)`` for every line of the table, or :class:`InvalidInput`
    naming the first bad cell."""
    frame = _read(path)
    missing = [c for c in ("request_id", "label") if c not in frame.columns]
    if missing:
        raise InvalidInput(f"{path}: no column {missing[0]!r} (need request_id, label[, row])")
    if not len(frame):
        raise InvalidInput(f"{path}: no labels")
    csv = table_format(path) == "csv"
    ids, labels = frame["request_id"].tolist(), frame["label"].tolist()
    rows = frame["row"].tolist() if "row" in frame.columns else [0] * len(frame)
    out = []
    for index, (request_id, row, label) in enumerate(zip(ids, rows, labels, strict=True)):
        where = f"{path}: line {index + 2}" if csv else f"{path}: row {index}"
        out.append(
            (
                _request_id(request_id, where),
                _row(row, where),
                _label(label, label_type, where),
            )
        )
    return out


def _read(path: Path) -> Any:
    if table_format(path) != "csv":
        return load_table(path)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    pd = require_pandas()
    try:  # every cell as text: ids keep their leading zeros, empty cells stay empty
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InvalidInput(f"{path}: empty CSV file (no header)") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text; is it really a CSV file?") from None
    except (pd.errors.ParserError, ValueError) as exc:
        raise InvalidInput(f"{path}: cannot read as CSV: {str(exc).splitlines()[0]}") from None


def _missing(value: Any) -> bool:
    """An empty cell: blank text, None, NaN, pandas' NA."""
    if isinstance(value, str):
        return not value.strip()
    return bool(require_pandas().isna(value))


def _request_id(value: Any, where: str) -> str:
    if _missing(value):
        raise InvalidInput(f"{where}: empty request_id")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value.strip() if isinstance(value, str) else str(value)


def _row(value: Any, where: str) -> int:
    if _missing(value):
        raise InvalidInput(f"{where}: empty row (leave the whole column out for row 0)")
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if _WHOLE.fullmatch(text) else None
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    else:
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
    if number is None or not 0 <= number <= _MAX_ROW:
        raise InvalidInput(
            f"{where}: row must be a whole number from 0 to {_MAX_ROW}, not {value!r}"
        )
    return number


def _label(value: Any, label_type: LabelType, where: str) -> int | float | str:
    if _missing(value):
        raise InvalidInput(f"{where}: empty label")
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # a numpy scalar from a typed (Parquet) column
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if label_type == "str":
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str):
        return _label_text(value.strip(), label_type, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where}: label {value!r} is neither a number nor a class name")
    return _label_number(value, label_type, where)


def _label_text(text: str, label_type: LabelType, where: str) -> int | float | str:
    if _WHOLE.fullmatch(text) and label_type != "float":
        return int(text)
    try:
        number = float(text)
    except ValueError:
        if label_type == "auto":
            return text  # a class name
        raise InvalidInput(f"{where}: label {text!r} is not a number") from None
    return _label_number(number, label_type, where)


def _label_number(number: float, label_type: LabelType, where: str) -> int | float:
    if not math.isfinite(number):
        raise InvalidInput(f"{where}: label {number} is not a finite number")
    if label_type == "int":
        if not float(number).is_integer():
            raise InvalidInput(f"{where}: label {number} is not a class index")
        return int(number)
    if label_type == "float":
        return float(number)
    return number
