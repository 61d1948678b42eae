"""Tables on disk (``.csv``, ``.parquet``, ``.npy``) as pandas DataFrames.

Used by ``edgewise convert`` to read a sample of the training data and by the batch scorer to read
its input and write its output. pandas and pyarrow are optional (the ``edgewise[data]`` extra) and
imported only when a table is handled; without them the error says what to install.

Every failure is one line naming the file: :class:`InvalidInput` for a file that is missing,
unreadable or of an unknown format, :class:`MissingDependency` when the extra is not installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from edgewise.runtime._fs import replacing
from edgewise.runtime.errors import EdgewiseError, ErrorCode, InvalidInput

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DATA_EXTRA_HINT",
    "MissingDependency",
    "TableFormat",
    "array_to_frame",
    "default_names",
    "load_table",
    "require_module",
    "require_pandas",
    "table_format",
    "write_table",
]

TableFormat = Literal["csv", "parquet", "npy"]

DATA_EXTRA_HINT: Final = "pip install 'edgewise[data]'"

_CSV_SUFFIXES: Final = (".csv", ".csv.gz", ".csv.bz2", ".csv.zip", ".csv.xz", ".csv.zst")
_PARQUET_SUFFIXES: Final = (".parquet", ".pq")
_NPY_SUFFIXES: Final = (".npy",)
_NPY_MAGIC: Final = b"\x93NUMPY"


class MissingDependency(EdgewiseError):
    """An optional dependency is absent: pandas, pyarrow or joblib (the ``edgewise[data]``
    extra), scikit-learn or skl2onnx (``edgewise[convert]``)."""

    code = ErrorCode.FAILED_PRECONDITION


def require_module(module: str, purpose: str, extra: str = "data") -> ModuleType:
    """Import an optional module, or raise :class:`MissingDependency` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(
            f"{purpose} needs the Python package {module!r}, which is not installed: "
            f"run pip install 'edgewise[{extra}]'"
        ) from None


def require_pandas() -> Any:
    """The pandas module (typed ``Any``: pandas ships no stubs here)."""
    return require_module("pandas", "reading tables")


def table_format(path: Path | str) -> TableFormat:
    """The format of a table file from its name; :class:`InvalidInput` for an unknown one."""
    name = Path(path).name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(_NPY_SUFFIXES):
        return "npy"
    raise InvalidInput(
        f"{path}: unknown table format; expected a .csv (optionally compressed), "
        ".parquet or .npy file"
    )


def default_names(n: int) -> list[str]:
    """Column names for a headerless array: ``f0 .. f{n-1}``."""
    return [f"f{i}" for i in range(n)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def array_to_frame(
    array: np.ndarray[Any, Any], names: Sequence[str] | None = None, *, what: str = "array"
) -> pd.DataFrame:
    """A DataFrame from a 1-D, 2-D or structured numpy array.

    A 1-D array is one column; a 2-D array has one column per array column, named ``names`` or
    ``f0 .. f{n-1}``; a structured array has one column per field, named after the field unless
    ``names`` is given.
    """
    pd = require_pandas()
    if array.dtype.names is not None:
        if array.ndim != 1:
            raise InvalidInput(f"{what}: a structured array must be 1-D, got {array.ndim}-D")
        fields = list(array.dtype.names)
        labels = _check_names(names, len(fields), what) if names is not None else fields
        return pd.DataFrame(
            {label: array[field] for label, field in zip(labels, fields, strict=True)}
        )
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2:
        raise InvalidInput(f"{what}: expected a 1-D or 2-D array, got shape {list(array.shape)}")
    n_columns = array.shape[1]
    labels = _check_names(names, n_columns, what) if names is not None else default_names(n_columns)
    return pd.DataFrame(array, columns=labels)


def _check_names(names: Sequence[str], n_columns: int, what: str) -> list[str]:
    labels = [str(n) for n in names]
    if len(labels) != n_columns:
        raise InvalidInput(f"{what}: {n_columns} column(s) but {len(labels)} name(s) given")
    if len(set(labels)) != len(labels):
        raise InvalidInput(f"{what}: duplicate column names")
    return labels


def _select(frame: pd.DataFrame, columns: Sequence[str] | None, what: str) -> pd.DataFrame:
    if columns is None:
        return frame
    present = {str(c) for c in frame.columns}
    missing = [c for c in columns if c not in present]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:8])
        raise InvalidInput(f"{what}: missing column(s) {shown}")
    return frame[list(columns)]


def load_table(
    path: Path | str,
    *,
    names: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read a ``.csv``, ``.parquet`` or ``.npy`` file into a DataFrame.

    ``names`` names the columns of a headerless format (``.npy``; ignored for the others, whose
    files carry their own names); without it a 2-D array's columns are ``f0 .. f{n-1}``.
    ``columns`` selects and orders the columns returned (:class:`InvalidInput` if one is
    missing). ``.npy`` files are read without pickle (object arrays are refused).
    """
    path = Path(path)
    fmt = table_format(path)
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if not path.is_file():
        raise InvalidInput(f"{path}: not a file")
    what = str(path)
    if fmt == "npy":
        return _select(_load_npy(path, names), columns, what)
    pd = require_pandas()
    if fmt == "parquet":
        require_module("pyarrow", "reading Parquet files")
        try:
            frame = pd.read_parquet(path)
        except MemoryError:
            raise
        except Exception as exc:  # pyarrow raises many types for corrupt or foreign files
            raise InvalidInput(f"{path}: cannot read as Parquet: {_one_line(exc)}") from None
        return _select(frame, columns, what)
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise InvalidInput(f"{path}: empty CSV file (no header)") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{path}: not UTF-8 text; is it really a CSV file?") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise InvalidInput(f"{path}: cannot read as CSV: {_one_line(exc)}") from None
    return _select(frame, columns, what)


def _load_npy(path: Path, names: Sequence[str] | None) -> pd.DataFrame:
    try:
        with path.open("rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or _one_line(exc)}") from None
    if magic != _NPY_MAGIC:
        raise InvalidInput(f"{path}: cannot read as .npy: not a numpy .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InvalidInput(
                f"{path}: holds an object (pickled) array, which is not loaded; save numbers or "
                "fixed-width strings instead"
            ) from None
        raise InvalidInput(f"{path}: cannot read as .npy: {_one_line(exc)}") from None
    except (OSError, EOFError) as exc:
        raise InvalidInput(f"{path}: cannot read as .npy: {_one_line(exc)}") from None
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load of a .npy is an array
        raise InvalidInput(f"{path}: not a .npy array file")
    return array_to_frame(array, names, what=str(path))


def write_table(frame: pd.DataFrame, path: Path | str) -> None:
    """Write a DataFrame as ``.csv``, ``.parquet`` or ``.npy`` (by the file name), atomically.

    The file is written beside its destination under a hidden name and renamed into place, so a
    reader never sees half a table. The index is not written. ``.npy`` takes numeric columns
    only (written as one 2-D array of their common dtype).
    """
    path = Path(path)
    fmt = table_format(path)
    pd = require_pandas()
    if not isinstance(frame, pd.DataFrame):
        raise InvalidInput(f"{path}: expected a pandas DataFrame, got {type(frame).__name__}")
    try:
        with replacing(path) as temporary:
            if fmt == "csv":
                frame.to_csv(temporary, index=False)
            elif fmt == "parquet":
                require_module("pyarrow", "writing Parquet files")
                frame.to_parquet(temporary, index=False)
            else:
                non_numeric = [
                    str(c)
                    for c in frame.columns
                    if not (
                        pd.api.types.is_numeric_dtype(frame[c].dtype)
                        or pd.api.types.is_bool_dtype(frame[c].dtype)
                    )
                ]
                if non_numeric:
                    raise InvalidInput(
                        f"{path}: .npy holds numeric columns only; not numeric: "
                        + ", ".join(repr(c) for c in non_numeric[:8])
                    )
                np.save(temporary, frame.to_numpy(), allow_pickle=False)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot write: {exc.strerror or _one_line(exc)}") from None
