"""Batch inputs: finding the files, checking their columns against the model, reading in chunks.

An input is a file, a folder (every ``.parquet``/``.pq``, ``.csv[.gz|.bz2|.zst]`` and ``.npy``
below it, in sorted order, hidden and ``_``-prefixed entries skipped) or a glob. The list is fixed
when a job starts and recorded with each file's size and modification time, so a resumed job can
tell whether its inputs changed.

Chunks are fixed: chunk ``j`` of a file is rows ``[j * chunk_rows, (j + 1) * chunk_rows)``, whatever
the file's row groups or CSV blocks look like. A :class:`ChunkReader` re-cuts what pyarrow gives
it into those chunks, so the chunk a row belongs to, and hence the part file it is written to,
never changes between runs: that is what makes resuming exactly-once.

Memory: Parquet is read a record batch at a time (pyarrow decodes one row group's pages at a
time), CSV through pyarrow's streaming reader, ``.npy`` through a read-only memory map; only the
chunk being assembled is held, so peak memory does not grow with the input.

Columns are matched to the model's features by name. :func:`check_schema` runs on every file
before anything is scored and names each missing or mistyped column: a numeric feature needs an
integer, floating-point, decimal or boolean column; a categorical one a string, dictionary,
integer or boolean column. A CSV file's types are those pyarrow infers from its first block; its
numeric feature columns are then read as float64 and its categorical ones as strings.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from edgewise.runtime.batch.storage import is_uri, local_path, open_uri
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.package.manifest import Feature
from edgewise.runtime.package.tabular import TableFormat

__all__ = [
    "ChunkReader",
    "ColumnSpec",
    "InputFile",
    "RawChunk",
    "check_inputs",
    "check_schema",
    "discover_inputs",
    "input_format",
    "open_reader",
    "read_schema",
]

_PARQUET: Final = (".parquet", ".pq")
_CSV_CODECS: Final = {".csv": None, ".csv.gz": "gzip", ".csv.bz2": "bz2", ".csv.zst": "zstd"}
_NPY: Final = (".npy",)
_UNSUPPORTED_CSV: Final = (".csv.zip", ".csv.xz")
#: Bytes pyarrow's CSV reader parses per block (and infers the first block's types from).
CSV_BLOCK_BYTES: Final = 4 << 20
#: Rows per record batch asked of the Parquet reader (re-cut into chunks afterwards).
PARQUET_BATCH_ROWS: Final = 65536
_GLOB_CHARS: Final = frozenset("*?[")


def input_format(path: Path | str) -> TableFormat | None:
    """The format of an input file from its name, or None for a file that is not a table."""
    name = Path(path).name.lower()
    if name.endswith(_PARQUET):
        return "parquet"
    if name.endswith(tuple(_CSV_CODECS)):
        return "csv"
    if name.endswith(_NPY):
        return "npy"
    return None


def _csv_codec(path: str) -> str | None:
    name = path.lower()
    for suffix, codec in _CSV_CODECS.items():
        if suffix != ".csv" and name.endswith(suffix):
            return codec
    return None


@dataclass(frozen=True)
class InputFile:
    """One input file as found when the job started."""

    path: str  # absolute, or an object-storage URI (s3://bucket/key)
    format: TableFormat
    size: int
    mtime_ns: int
    rows: int | None  # known up front for Parquet and .npy; None for CSV
    fingerprint: str | None = None  # :func:`fingerprint` (None: a job recorded before it existed)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "rows": self.rows,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InputFile:
        fmt = str(data["format"])
        if fmt not in ("parquet", "csv", "npy"):
            raise ValueError(f"unknown input format {fmt!r}")
        rows = data.get("rows")
        printed = data.get("fingerprint")
        return cls(
            path=str(data["path"]),
            format=fmt,  # type: ignore[arg-type]
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            rows=None if rows is None else int(rows),
            fingerprint=None if printed is None else str(printed),
        )

    def chunk_count(self, chunk_rows: int) -> int | None:
        """Chunks of the file, when its row count is known."""
        return None if self.rows is None else -(-self.rows // chunk_rows)


#: Bytes hashed at each of a file's start, middle and end (:func:`fingerprint`).
FINGERPRINT_BLOCK: Final = 64 << 10


def fingerprint(path: str, size: int) -> str:
    """A cheap content fingerprint: sha256 over the file's first, middle and last 64 KiB (a
    Parquet file's last block holds its footer: every row group's offsets and statistics). It
    tells a resumed job that an input was rewritten with the same size and modification time;
    a change confined to other bytes of a CSV file goes unseen."""
    import hashlib

    digest = hashlib.sha256()
    block = FINGERPRINT_BLOCK
    offsets = sorted({0, max(0, size // 2 - block // 2), max(0, size - block)})
    try:
        handle = _open_input(path)
        try:
            for offset in offsets:
                handle.seek(offset)
                digest.update(handle.read(min(block, size - offset)))
        finally:
            handle.close()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {_one_line(exc)}") from None
    return "sha256:" + digest.hexdigest()


def _walk(folder: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
        for name in sorted(files):
            if name.startswith((".", "_")):
                continue
            if input_format(name) is not None:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def discover_inputs(spec: str) -> list[InputFile]:
    """The input files a ``--input`` value names: a file, a folder (recursively) or a glob.

    Raises :class:`InvalidInput` when nothing matches or a named file has an unknown format.
    """
    if is_uri(spec):
        return _discover_remote(spec)
    path = Path(local_path(spec)).expanduser()
    if path.is_dir():
        paths = _walk(path)
        if not paths:
            raise InvalidInput(f"{spec}: the folder holds no .parquet, .csv or .npy files")
    elif path.is_file():
        paths = [path]
    elif _GLOB_CHARS & set(spec):
        matched = sorted(glob.glob(str(path), recursive=True))
        paths = []
        for name in matched:
            candidate = Path(name)
            if candidate.is_dir():
                paths.extend(_walk(candidate))
            elif input_format(candidate) is not None:
                paths.append(candidate)
        if not paths:
            raise InvalidInput(f"{spec}: no .parquet, .csv or .npy file matches")
    else:
        raise InvalidInput(f"{spec}: no such file or folder")
    files: list[InputFile] = []
    problems: list[str] = []
    seen: set[str] = set()
    for candidate in paths:
        absolute = str(candidate.resolve())
        if absolute in seen:
            continue
        seen.add(absolute)
        try:
            files.append(_describe(Path(absolute)))
        except InvalidInput as exc:
            problems.append(exc.message)
    raise_all(problems, "input files cannot be read")
    return files


def _skipped(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def _discover_remote(spec: str) -> list[InputFile]:
    """:func:`discover_inputs` on object storage: a key, a prefix (recursively) or a glob over
    keys (``*`` matches across ``/``)."""
    from pyarrow import fs

    filesystem, path = open_uri(spec)
    scheme = spec[: spec.index("://") + 3]
    globbed = bool(_GLOB_CHARS & set(path))
    base = path
    if globbed:
        first = min(path.index(c) for c in _GLOB_CHARS if c in path)
        base = path[:first].rsplit("/", 1)[0]
    try:
        infos = []
        top = filesystem.get_file_info(base)
        if top.type == fs.FileType.File and not globbed:
            infos = [top]
        elif top.type == fs.FileType.Directory:
            selector = fs.FileSelector(base, recursive=True, allow_not_found=True)
            for info in filesystem.get_file_info(selector):
                relative = info.path[len(base) :].lstrip("/")
                if info.type != fs.FileType.File or _skipped(relative):
                    continue
                if globbed and not fnmatch.fnmatchcase(info.path, path):
                    continue
                if input_format(info.path) is not None:
                    infos.append(info)
    except OSError as exc:
        raise InvalidInput(f"{spec}: cannot list: {_one_line(exc)}") from None
    if not infos:
        raise InvalidInput(f"{spec}: no .parquet or .csv object matches")
    problems: list[str] = []
    files: list[InputFile] = []
    for info in sorted(infos, key=lambda i: str(i.path)):
        uri = scheme + info.path
        try:
            files.append(_describe_remote(uri, info))
        except InvalidInput as exc:
            problems.append(exc.message)
    raise_all(problems, "input files cannot be read")
    return files


def _describe_remote(uri: str, info: Any) -> InputFile:
    fmt = input_format(uri)
    if fmt is None or uri.lower().endswith(_UNSUPPORTED_CSV):
        raise InvalidInput(f"{uri}: expected .parquet or .csv (optionally .gz, .bz2, .zst)")
    if fmt == "npy":
        raise InvalidInput(f"{uri}: .npy inputs are read from local files only (memory-mapped)")
    rows = _parquet_file(uri).metadata.num_rows if fmt == "parquet" else None
    mtime_ns = info.mtime_ns if info.mtime_ns is not None else 0
    size = int(info.size)
    return InputFile(uri, fmt, size, int(mtime_ns), rows, fingerprint(uri, size))


def _open_input(path: str) -> Any:
    """A pyarrow random-access input file of a local path or URI (it knows its position: the
    progress of a CSV file)."""
    if not is_uri(path):
        return pa.OSFile(path)
    filesystem, key = open_uri(path)
    return filesystem.open_input_file(key)


def _describe(path: Path) -> InputFile:
    name = path.name.lower()
    if name.endswith(_UNSUPPORTED_CSV):
        raise InvalidInput(
            f"{path}: .zip and .xz CSV files are not read in chunks; use .csv, .csv.gz, "
            ".csv.bz2 or .csv.zst"
        )
    fmt = input_format(path)
    if fmt is None:
        raise InvalidInput(
            f"{path}: unknown table format; expected .parquet, .csv (optionally .gz, .bz2, "
            ".zst) or .npy"
        )
    try:
        stat = path.stat()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror}") from None
    rows: int | None = None
    if fmt == "parquet":
        rows = _parquet_file(path).metadata.num_rows
    elif fmt == "npy":
        rows = int(_npy_array(path).shape[0])
    return InputFile(
        str(path), fmt, stat.st_size, stat.st_mtime_ns, rows, fingerprint(str(path), stat.st_size)
    )


def _parquet_file(path: Path | str) -> Any:
    try:
        source = _open_input(str(path)) if is_uri(str(path)) else str(path)
        return pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)
    except Exception as exc:  # pyarrow raises many types for corrupt or foreign files
        raise InvalidInput(f"{path}: cannot read as Parquet: {_one_line(exc)}") from None


def _failing_group(parquet: Any, row: int, names: list[str]) -> tuple[int, int, int]:
    """The first row group, from the one holding the file's row ``row`` (0-based) on, that fails
    to decode: index, first row (0-based), rows. (The error path only: a batch spans row groups,
    so the failure of a batch is narrowed down by decoding its groups one at a time.)"""
    metadata = parquet.metadata
    first = 0
    fallback = None
    for group in range(metadata.num_row_groups):
        rows = metadata.row_group(group).num_rows
        if first + rows > row:
            fallback = fallback or (group, first, rows)
            try:
                parquet.read_row_group(group, columns=names)
            except Exception:
                return group, first, rows
        first += rows
    return fallback or (max(0, metadata.num_row_groups - 1), first, 0)


def _npy_array(path: Path | str) -> np.ndarray[Any, Any]:
    if is_uri(str(path)):
        raise InvalidInput(f"{path}: .npy inputs are read from local files only (memory-mapped)")
    try:
        with open(path, "rb") as handle:
            if handle.read(6) != b"\x93NUMPY":
                raise InvalidInput(f"{path}: cannot read as .npy: not a numpy .npy file")
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "object" in str(exc):
            raise InvalidInput(
                f"{path}: holds an object (pickled) array, which is not loaded; save numbers or "
                "fixed-width strings instead"
            ) from None
        raise InvalidInput(f"{path}: cannot read as .npy: {_one_line(exc)}") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or _one_line(exc)}") from None
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load of a .npy is an array
        raise InvalidInput(f"{path}: not a .npy array file")
    if array.dtype.names is None and array.ndim not in (1, 2):
        raise InvalidInput(f"{path}: expected a 1-D or 2-D array, got shape {list(array.shape)}")
    if array.dtype.names is not None and array.ndim != 1:
        raise InvalidInput(f"{path}: a structured array must be 1-D, got {array.ndim}-D")
    if array.dtype.hasobject:
        raise InvalidInput(f"{path}: holds Python objects; save numbers or fixed-width strings")
    return array


# ---- columns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnSpec:
    """The columns a job reads: the model's features (by name) and the pass-through id columns."""

    features: tuple[Feature, ...]
    id_columns: tuple[str, ...]

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    @property
    def names(self) -> tuple[str, ...]:
        """Every column read, features first, each once."""
        ordered = list(self.feature_names)
        ordered.extend(c for c in self.id_columns if c not in ordered)
        return tuple(ordered)


def _numeric_type(dtype: Any) -> bool:
    return bool(
        pa.types.is_integer(dtype)
        or pa.types.is_floating(dtype)
        or pa.types.is_decimal(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_null(dtype)
    )


def _categorical_type(dtype: Any) -> bool:
    if pa.types.is_dictionary(dtype):
        return _categorical_type(dtype.value_type)
    return bool(
        pa.types.is_string(dtype)
        or pa.types.is_large_string(dtype)
        or pa.types.is_string_view(dtype)
        or pa.types.is_integer(dtype)
        or pa.types.is_boolean(dtype)
        or pa.types.is_null(dtype)
    )


def _type_name(dtype: Any) -> str:
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_string_view(dtype):
        return "string"
    return str(dtype)


def schema_problems(schema: Any, columns: ColumnSpec, text_numbers: bool = False) -> list[str]:
    """Every missing or mistyped column of ``schema`` (an Arrow schema), one phrase each.
    ``text_numbers``: a string column is accepted for a numeric feature (a tolerant CSV read
    converts it row by row)."""
    present = {name: schema.field(name).type for name in schema.names}
    problems: list[str] = []
    missing = [name for name in columns.names if name not in present]
    if missing:
        kind = [
            "id column" if name not in columns.feature_names else "feature column"
            for name in missing
        ]
        shown = ", ".join(f"{k} {n!r}" for k, n in zip(kind, missing, strict=True))
        problems.append(f"missing {shown}")
    for feature in columns.features:
        dtype = present.get(feature.name)
        if dtype is None:
            continue
        if text_numbers and feature.kind == "numeric" and _type_name(dtype) == "string":
            continue
        if feature.kind == "numeric" and not _numeric_type(dtype):
            problems.append(
                f"column {feature.name!r} holds {_type_name(dtype)}, but the model's feature is "
                "numeric"
            )
        elif feature.kind == "categorical" and not _categorical_type(dtype):
            problems.append(
                f"column {feature.name!r} holds {_type_name(dtype)}, but the model's feature is "
                "categorical "
                "(strings)"
            )
    return problems


def check_schema(schema: Any, columns: ColumnSpec, what: str, text_numbers: bool = False) -> None:
    """Raise :class:`InvalidInput` naming every missing or mistyped column of ``schema`` (an
    Arrow schema), in one line."""
    problems = schema_problems(schema, columns, text_numbers)
    if problems:
        raise InvalidInput(f"{what}: {'; '.join(problems)}")


def raise_all(problems: Sequence[str], what: str) -> None:
    """Raise one :class:`InvalidInput` listing every problem (one per file) on one line: the
    message alone when there is one, else ``N <what>: first | second | ...``."""
    if len(problems) == 1:
        raise InvalidInput(problems[0])
    if problems:
        raise InvalidInput(f"{len(problems)} {what}: {' | '.join(problems)}")


def _npy_names(array: np.ndarray[Any, Any], columns: ColumnSpec, what: str) -> list[str]:
    """Column names of an ``.npy`` array: a structured array's fields; otherwise the model's
    features in order (a plain array must have exactly one column per feature)."""
    if array.dtype.names is not None:
        return list(array.dtype.names)
    width = 1 if array.ndim == 1 else int(array.shape[1])
    if width != len(columns.features):
        raise InvalidInput(
            f"{what}: a plain array has {width} column(s) but the model has "
            f"{len(columns.features)} feature(s); save one column per feature, in the model's "
            "order, or a structured array with named fields"
        )
    if columns.id_columns:
        raise InvalidInput(
            f"{what}: a plain array has no column names, so it has no id column "
            f"{columns.id_columns[0]!r}; save a structured array with named fields"
        )
    return list(columns.feature_names)


def read_schema(file: InputFile, columns: ColumnSpec) -> Any:
    """The Arrow schema of an input file (a CSV file's as inferred from its first block)."""
    what = file.path
    if file.format == "parquet":
        try:
            return _parquet_file(file.path).schema_arrow
        except InvalidInput:
            raise
        except Exception as exc:
            raise InvalidInput(f"{what}: cannot read as Parquet: {_one_line(exc)}") from None
    if file.format == "npy":
        array = _npy_array(file.path)
        names = _npy_names(array, columns, what)
        if array.dtype.names is not None:
            types = [_arrow_type(array.dtype.fields[n][0], what) for n in names]
        else:
            types = [_arrow_type(array.dtype, what)] * len(names)
        return pa.schema(list(zip(names, types, strict=True)))
    stream = _csv_stream(file.path)
    try:
        # Rows with a wrong field count are left to the chunk reader (strict: the error names
        # their line; tolerant: they are set aside), not to the type inference.
        reader = pa_csv.open_csv(
            stream,
            read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda _row: "skip"),
        )
        schema = reader.schema
        reader.close()
        return schema
    except pa.ArrowInvalid as exc:
        raise InvalidInput(f"{what}: cannot read as CSV: {_one_line(exc)}") from None
    finally:
        stream.close()


def _arrow_type(dtype: np.dtype[Any], what: str) -> Any:
    try:
        return pa.from_numpy_dtype(dtype)
    except (pa.ArrowNotImplementedError, TypeError):
        raise InvalidInput(f"{what}: numpy dtype {dtype} cannot be read") from None


def _csv_stream(path: str) -> Any:
    try:
        raw = _open_input(path)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {_one_line(exc)}") from None
    codec = _csv_codec(path)
    return raw if codec is None else pa.CompressedInputStream(raw, codec)


# ---- chunked reading ---------------------------------------------------------------------------


@dataclass
class RawChunk:
    """Rows ``[index * chunk_rows, index * chunk_rows + table.num_rows)`` of one input file."""

    index: int
    table: Any  # pyarrow.Table with the ColumnSpec's columns
    last: bool  # the file's last chunk
    bytes_read: int  # how far into the file the reader is (for progress)
    bad: list[dict[str, Any]] = field(default_factory=list)  # rows set aside (--bad-records)


class _Rechunker:
    """Re-cuts a stream of record batches (starting at a chunk boundary) into chunk-sized tables."""

    def __init__(self, chunk_rows: int, first_chunk: int) -> None:
        self.chunk_rows = chunk_rows
        self.index = first_chunk
        self.pending: list[Any] = []
        self.pending_rows = 0

    def push(self, batch: Any) -> Iterator[Any]:
        while batch.num_rows:
            take = min(batch.num_rows, self.chunk_rows - self.pending_rows)
            self.pending.append(batch.slice(0, take))
            self.pending_rows += take
            batch = batch.slice(take)
            if self.pending_rows == self.chunk_rows:
                yield self._emit()

    def flush(self) -> Any | None:
        return self._emit() if self.pending_rows else None

    def _emit(self) -> Any:
        table = pa.Table.from_batches(self.pending)
        self.pending = []
        self.pending_rows = 0
        self.index += 1
        return table


class ChunkReader:
    """Reads the chunks of one input file, from ``first_chunk`` on."""

    def __init__(
        self, file: InputFile, columns: ColumnSpec, chunk_rows: int, tolerant: bool = False
    ) -> None:
        if chunk_rows < 1:
            raise InvalidInput("chunk rows must be at least 1")
        self.file = file
        self.columns = columns
        self.chunk_rows = chunk_rows
        # --bad-records: CSV rows that fail to decode are set aside (:mod:`.badrecords`), not fatal.
        self.tolerant = tolerant and file.format == "csv"
        # --bad-records on Parquet: row groups that fail to decode are set aside.
        self.tolerant_parquet = tolerant and file.format == "parquet"
        self.bad_groups: list[tuple[int, int, int, str]] = []  # file rows [first, end), group
        self.malformed: list[dict[str, Any]] = []  # rows with the wrong number of fields
        self.schema = read_schema(file, columns)
        check_schema(self.schema, columns, file.path, self.tolerant)

    def chunks(self, first_chunk: int = 0, last_chunk: int | None = None) -> Iterator[RawChunk]:
        """Chunks ``first_chunk ..= last_chunk`` (default: to the end of the file), in order.

        The last chunk of the file may be short; a file with no rows has no chunks.
        """
        if self.file.format == "parquet":
            source = self._parquet(first_chunk)
        elif self.file.format == "npy":
            source = self._npy(first_chunk)
        else:
            source = self._csv(first_chunk)
        for raw in _assemble(source, self.chunk_rows, first_chunk, last_chunk):
            if self.tolerant:
                self._convert_numbers(raw)
            if self.bad_groups:
                self._drop_bad_groups(raw)
            yield raw

    def _convert_numbers(self, raw: RawChunk) -> None:
        """Tolerant CSV: the numeric feature columns, read as strings, become float64; rows
        with a value that is not a number are taken out into ``raw.bad``."""
        table = raw.table
        bad = np.zeros(table.num_rows, dtype=bool)
        reasons: dict[int, tuple[str, str]] = {}
        converted = {}
        for feature in self.columns.features:
            if feature.kind != "numeric":
                continue
            numbers, invalid = _to_numbers(table.column(feature.name))
            converted[feature.name] = numbers
            if invalid is not None:
                values = table.column(feature.name)
                for row in np.flatnonzero(invalid & ~bad):
                    reasons[int(row)] = (feature.name, str(values[int(row)].as_py()))
                bad |= invalid
        for name, numbers in converted.items():
            table = table.set_column(table.schema.get_field_index(name), name, numbers)
        if reasons:
            first_row = raw.index * self.chunk_rows + 1
            records = raw.table.take(pa.array(sorted(reasons))).to_pylist()
            for (at, (column, value)), record in zip(sorted(reasons.items()), records, strict=True):
                raw.bad.append(
                    {
                        "input": self.file.path,
                        "row": first_row + at,
                        "column": column,
                        "reason": f"column {column!r}: {value!r} is not a number",
                        "record": record,
                    }
                )
            table = table.filter(pa.array(~bad))
        raw.table = table

    def _on_invalid_row(self, row: Any) -> str:
        self.malformed.append(
            {
                "input": self.file.path,
                "line": row.number,
                "column": None,
                "reason": f"expected {row.expected_columns} fields, got {row.actual_columns}",
                "record": row.text[:4096],
            }
        )
        return "skip" if self.tolerant else "error"

    # Each source yields (record batch or None, bytes read so far), starting at the first row of
    # ``first_chunk``; None marks the end.

    def _parquet(self, first_chunk: int) -> Iterator[tuple[Any, int]]:
        parquet = _parquet_file(self.file.path)
        metadata = parquet.metadata
        start = first_chunk * self.chunk_rows
        offset = 0
        group = 0
        while group < metadata.num_row_groups:
            rows = metadata.row_group(group).num_rows
            if offset + rows > start:
                break
            offset += rows
            group += 1
        groups = list(range(group, metadata.num_row_groups))
        skip = start - offset
        total = max(1, metadata.num_rows)
        names = list(self.columns.names)
        if not groups:
            return
        if self.tolerant_parquet:
            yield from self._parquet_tolerant(parquet, groups, offset, skip, total)
            return
        try:
            for read in parquet.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=names
            ):
                offset += read.num_rows
                dropped = min(skip, read.num_rows)
                skip -= dropped
                yield read.slice(dropped), self.file.size * offset // total
        except Exception as exc:
            failed, first, rows = _failing_group(parquet, offset, names)
            raise InvalidInput(
                f"{self.file.path}: row group {failed} (rows {first + 1}-{first + rows}) cannot "
                f"be decoded: {_one_line(exc)} (--bad-records PATH sets such row groups aside)"
            ) from None

    def _parquet_tolerant(
        self, parquet: Any, groups: list[int], offset: int, skip: int, total: int
    ) -> Iterator[tuple[Any, int]]:
        """``--bad-records``: each row group is decoded whole; one that fails is yielded as null
        rows (its rows keep their place, so chunk boundaries do not move) and noted in
        :attr:`bad_groups`, and :meth:`chunks` takes those rows out of their chunks."""
        names = list(self.columns.names)
        metadata = parquet.metadata
        for group in groups:
            rows = metadata.row_group(group).num_rows
            try:
                table = parquet.read_row_group(group, columns=names)
            except Exception as exc:  # pyarrow raises OSError, ArrowInvalid, ... for bad pages
                self.bad_groups.append((offset, offset + rows, group, _one_line(exc)))
                schema = parquet.schema_arrow
                table = pa.table([pa.nulls(rows, schema.field(n).type) for n in names], names=names)
            for read in table.to_batches(max_chunksize=PARQUET_BATCH_ROWS):
                offset += read.num_rows
                dropped = min(skip, read.num_rows)
                skip -= dropped
                yield read.slice(dropped), self.file.size * offset // total

    def _drop_bad_groups(self, raw: RawChunk) -> None:
        """Take the rows of row groups that failed to decode out of a chunk, with one bad record
        per row group (the part of it in this chunk: ``rows`` and ``count``)."""
        start = raw.index * self.chunk_rows
        stop = start + raw.table.num_rows
        keep = None
        for first, end, group, reason in self.bad_groups:
            low, high = max(first, start), min(end, stop)
            if low >= high:
                continue
            if keep is None:
                keep = np.ones(raw.table.num_rows, dtype=bool)
            keep[low - start : high - start] = False
            raw.bad.append(
                {
                    "input": self.file.path,
                    "row_group": group,
                    "rows": [low + 1, high],  # 1-based, inclusive, as a CSV row is named
                    "count": high - low,
                    "column": None,
                    "reason": f"row group {group} cannot be decoded: {reason}",
                    "record": None,
                }
            )
        if keep is not None:
            raw.table = raw.table.filter(pa.array(keep))

    def _npy(self, first_chunk: int) -> Iterator[tuple[Any, int]]:
        array = _npy_array(self.file.path)
        names = _npy_names(array, self.columns, self.file.path)
        wanted = list(self.columns.names)
        rows = int(array.shape[0])
        total = max(1, rows)
        for start in range(first_chunk * self.chunk_rows, rows, self.chunk_rows):
            stop = min(rows, start + self.chunk_rows)
            part = array[start:stop]
            if array.dtype.names is not None:
                data = [np.ascontiguousarray(part[name]) for name in wanted]
            elif array.ndim == 1:
                data = [np.ascontiguousarray(part)]
            else:
                by_name = {name: index for index, name in enumerate(names)}
                data = [np.ascontiguousarray(part[:, by_name[name]]) for name in wanted]
            yield pa.RecordBatch.from_arrays(data, names=wanted), self.file.size * stop // total

    def _csv(self, first_chunk: int) -> Iterator[tuple[Any, int]]:
        features = {f.name: f for f in self.columns.features}
        types = {}
        for name in self.columns.names:
            feature = features.get(name)
            if feature is None:
                types[name] = self.schema.field(name).type
            elif feature.kind == "numeric" and not self.tolerant:
                types[name] = pa.float64()
            else:
                types[name] = pa.string()
        try:
            raw = _open_input(self.file.path)
        except OSError as exc:
            raise InvalidInput(f"{self.file.path}: cannot read: {_one_line(exc)}") from None
        codec = _csv_codec(self.file.path)
        stream = raw if codec is None else pa.CompressedInputStream(raw, codec)
        skip = first_chunk * self.chunk_rows
        self.malformed = []
        try:
            reader = pa_csv.open_csv(
                stream,
                read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
                parse_options=pa_csv.ParseOptions(invalid_row_handler=self._on_invalid_row),
                convert_options=pa_csv.ConvertOptions(
                    column_types=types, include_columns=list(self.columns.names)
                ),
            )
            for read in reader:
                dropped = min(skip, read.num_rows)
                skip -= dropped
                yield read.slice(dropped), raw.tell()
        except pa.ArrowInvalid as exc:
            if self.malformed and not self.tolerant:
                bad = self.malformed[-1]
                raise InvalidInput(
                    f"{self.file.path}: line {bad['line']}: {bad['reason']} "
                    "(--bad-records PATH sets such rows aside)"
                ) from None
            raise InvalidInput(
                f"{self.file.path}: {_csv_error(self.file.path, self.schema, exc)}"
            ) from None
        finally:
            stream.close()


_NULLS: Final = pa.array(pa_csv.ConvertOptions().null_values, pa.string())


def _to_numbers(column: Any) -> tuple[Any, Any]:
    """A CSV column read as strings, as float64 (pyarrow's null spellings are nulls), and the
    mask of its values that are not numbers (None when there are none)."""
    import pyarrow.compute as pc

    strings = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    nulls = pc.fill_null(pc.is_in(strings, value_set=_NULLS), True)
    cleaned = pc.if_else(nulls, pa.scalar(None, pa.string()), strings)
    try:
        return pc.cast(cleaned, pa.float64()), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    import pandas as pd

    text = cleaned.to_pandas()
    numbers = pd.to_numeric(text, errors="coerce")
    invalid = (numbers.isna() & text.notna()).to_numpy()
    return pa.array(numbers.to_numpy(dtype=np.float64), mask=invalid | text.isna().to_numpy()), (
        invalid
    )


def _csv_error(path: str, schema: Any, exc: BaseException) -> str:
    """pyarrow's conversion error with the column's name and the first bad row, found by
    reading that column again (the error path only)."""
    import re

    text = _csv_message(exc)
    match = re.search(r"CSV column #(\d+)", text)
    if match is None or int(match.group(1)) >= len(schema.names):
        return text
    name = schema.names[int(match.group(1))]
    found = _first_non_number(path, name)
    if found is not None:
        return (
            f"column {name!r}, row {found[0]}: {found[1]!r} is not a number "
            "(--bad-records PATH sets such rows aside)"
        )
    return text.replace(f"CSV column #{match.group(1)}", f"CSV column {name!r}")


def _first_non_number(path: str, name: str) -> tuple[int, Any] | None:
    """The first data row (1-based) of a CSV column whose value is not a number, and the value;
    None when there is none or the file cannot be read (error paths only: it reads the column)."""
    try:
        stream = _csv_stream(path)
    except InvalidInput:
        return None
    try:
        reader = pa_csv.open_csv(
            stream,
            read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=lambda _row: "skip"),
            convert_options=pa_csv.ConvertOptions(
                column_types={name: pa.string()}, include_columns=[name]
            ),
        )
        offset = 0
        for batch in reader:
            _, invalid = _to_numbers(batch.column(0))
            if invalid is not None:
                row = int(np.flatnonzero(invalid)[0])
                return offset + row + 1, batch.column(0)[row].as_py()
            offset += batch.num_rows
    except (pa.ArrowInvalid, OSError):
        return None
    finally:
        stream.close()
    return None


def _with_first_bad_row(path: str, schema: Any, columns: ColumnSpec, problem: str) -> str:
    """A CSV numeric feature inferred as text: the problem with its first non-number row."""
    for feature in columns.features:
        if feature.kind != "numeric" or not problem.startswith(f"column {feature.name!r} holds"):
            continue
        found = _first_non_number(path, feature.name)
        if found is not None:
            return (
                f"{problem} (row {found[0]}: {found[1]!r} is not a number; --bad-records PATH "
                "sets such rows aside)"
            )
    return problem


def _csv_message(exc: BaseException) -> str:
    text = _one_line(exc)
    # pyarrow: "In CSV column #3: Row #17: CSV conversion error to double: invalid value 'x'"
    return text.replace("In CSV column", "CSV column")


def _assemble(
    source: Iterator[tuple[Any, int]],
    chunk_rows: int,
    first_chunk: int,
    last_chunk: int | None,
) -> Iterator[RawChunk]:
    rechunker = _Rechunker(chunk_rows, first_chunk)
    previous: RawChunk | None = None
    position = 0
    for batch, position in source:
        for table in rechunker.push(batch):
            if previous is not None:
                yield previous
            previous = RawChunk(rechunker.index - 1, table, False, position)
            if last_chunk is not None and previous.index >= last_chunk:
                # Whether this is the file's last chunk is not known without reading on; the
                # caller that stops early does not need it.
                yield previous
                return
    tail = rechunker.flush()
    if tail is not None:
        if previous is not None:
            yield previous
        previous = RawChunk(rechunker.index - 1, tail, False, position)
    if previous is not None:
        previous.last = True
        previous.bytes_read = position
        yield previous


def open_reader(file: InputFile, columns: ColumnSpec, chunk_rows: int) -> ChunkReader:
    """A chunk reader for ``file`` (its schema checked against ``columns``)."""
    return ChunkReader(file, columns, chunk_rows)


def check_inputs(
    files: Sequence[InputFile], columns: ColumnSpec, tolerant: bool = False
) -> list[Any]:
    """Check every file's columns before anything is scored; returns their schemas.
    ``tolerant`` (``--bad-records``): a CSV file's numeric feature may hold text (the rows that
    are not numbers are set aside); strict, such a column's first such row is named.

    Every file is checked: one :class:`InvalidInput` names every problem of every file."""
    schemas = []
    problems: list[str] = []
    for file in files:
        try:
            schema = read_schema(file, columns)
        except InvalidInput as exc:
            problems.append(exc.message)
            continue
        text_numbers = tolerant and file.format == "csv"
        found = schema_problems(schema, columns, text_numbers)
        if file.format == "csv" and not text_numbers:
            found = [_with_first_bad_row(file.path, schema, columns, p) for p in found]
        if found:
            problems.append(f"{file.path}: {'; '.join(found)}")
        schemas.append(schema)
    raise_all(problems, "input files do not fit the model")
    return schemas
