"""A batch job from start to finish: resolve the model, check the inputs, own the output folder,
run an engine, write the drift report and the summary.

Everything that can be checked is checked before the first chunk is scored: the model package
(files and sha256), every input file's columns against the model's features, the id columns, and,
when resuming, that the model, the inputs (size and modification time of each file) and the
chunking are those the job started with.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from edgewise.runtime.batch.badrecords import count_bad_records
from edgewise.runtime.batch.compact import check_partition_column
from edgewise.runtime.batch.features import FeatureJoin, plan_join
from edgewise.runtime.batch.objectfolder import ObjectJobFolder
from edgewise.runtime.batch.options import (
    DEFAULT_CHUNK_ROWS,
    BatchOptions,
    BatchSummary,
    PartLayout,
)
from edgewise.runtime.batch.plan import EngineResult, JobPlan
from edgewise.runtime.batch.progress import Progress
from edgewise.runtime.batch.reader import (
    ColumnSpec,
    InputFile,
    check_inputs,
    discover_inputs,
    raise_all,
)
from edgewise.runtime.batch.report import build_report, render_html, unavailable_report
from edgewise.runtime.batch.scoring import output_schema
from edgewise.runtime.batch.source import ModelSource, resolve
from edgewise.runtime.batch.stats import DriftCollector
from edgewise.runtime.batch.storage import is_uri, local_path
from edgewise.runtime.batch.writer import (
    REPORT_HTML,
    REPORT_JSON,
    SUMMARY_FILE,
    ChunkRecord,
    JobFolder,
    open_job_folder,
)
from edgewise.runtime.errors import InvalidInput, ModelNotFound
from edgewise.runtime.package.manifest import read_manifest
from edgewise.runtime.package.model_config import default_version
from edgewise.runtime.serving.model import SessionSettings, load_model

__all__ = ["DEFAULT_CHUNK_ROWS", "JOB_FORMAT", "run_batch"]

log = logging.getLogger("edgewise.runtime.batch")

JOB_FORMAT: Final = "edgewise.batch/1"


def _session_settings(options: BatchOptions) -> tuple[SessionSettings, int, int]:
    """The server's onnxruntime session settings for this process's CPU budget (cgroup aware),
    the scorer threads and the budget's cores."""
    from edgewise.runtime.config.settings import ServerSettings

    overrides: dict[str, Any] = {
        "intra_op_threads": options.intra_op_threads,
        "worker_threads": options.threads,
    }
    settings = ServerSettings.from_sources(overrides)
    cores = settings.budget.cores if settings.budget is not None else os.cpu_count() or 1
    return SessionSettings.of(settings), settings.worker_threads, cores


def _check_same_inputs(recorded: list[InputFile], found: list[InputFile]) -> None:
    old = {f.path: f for f in recorded}
    new = {f.path: f for f in found}
    for path in old:
        if path not in new:
            raise InvalidInput(f"cannot resume: input {path} is gone since the job started")
    for path, file in new.items():
        before = old.get(path)
        if before is None:
            raise InvalidInput(f"cannot resume: input {path} is new since the job started")
        if (before.size, before.mtime_ns) != (file.size, file.mtime_ns):
            raise InvalidInput(f"cannot resume: input {path} changed since the job started")
        if before.fingerprint is not None and before.fingerprint != file.fingerprint:
            raise InvalidInput(
                f"cannot resume: input {path} was rewritten since the job started (same size "
                "and modification time, other content)"
            )
    if [f.path for f in recorded] != [f.path for f in found]:  # pragma: no cover - sorted both
        raise InvalidInput("cannot resume: the inputs are in a different order")


def _check_output_location(output: Path | str, spec: str, files: list[InputFile]) -> None:
    if is_uri(str(output)):
        for file in files:
            if file.path.startswith(str(output).rstrip("/") + "/"):
                raise InvalidInput(f"input {file.path} lies inside the output prefix {output}")
        return
    if is_uri(spec):
        return
    out = Path(local_path(str(output))).resolve()
    for file in files:
        if Path(file.path).is_relative_to(out):
            raise InvalidInput(f"input {file.path} lies inside the output folder {output}")
    source = Path(spec).expanduser()
    if source.is_dir() and out.is_relative_to(source.resolve()):
        raise InvalidInput(
            f"the output folder {output} lies inside the input folder {spec}: its part files "
            "would become inputs"
        )


def _id_fields(schemas: list[Any], columns: ColumnSpec, files: list[InputFile]) -> list[Any]:
    """One Arrow field per id column, of a type every input's column can be cast to."""
    fields = []
    problems = []
    for name in columns.id_columns:
        types = [schema.field(name).type for schema in schemas]
        try:
            unified = pa.unify_schemas(
                [pa.schema([pa.field(name, t)]) for t in types], promote_options="permissive"
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            shown = ", ".join(
                f"{t} in {Path(f.path).name}" for t, f in zip(types, files, strict=True)
            )
            problems.append(f"id column {name!r} has types that do not go together: {shown}")
            continue
        fields.append(unified.field(name))
    raise_all(problems, "id columns do not fit")
    return fields


def _carried(first: InputFile, manifest: Any, ids: tuple[str, ...]) -> tuple[str, ...]:
    """``--carry-columns``: the id columns, then every other column of the first input (in its
    order), but those named like a model output (the outputs keep their names; a warning)."""
    from edgewise.runtime.batch.reader import read_schema

    names = read_schema(first, ColumnSpec(manifest.features, ())).names
    outputs = {spec.name for spec in manifest.outputs}
    clash = [n for n in names if n in outputs and n not in ids]
    if clash:
        log.warning(
            "batch: --carry-columns leaves out input column(s) %s: the model has outputs of "
            "the same name",
            ", ".join(repr(n) for n in clash),
        )
    return (*ids, *(n for n in names if n not in ids and n not in outputs))


def _check_id_columns(ids: tuple[str, ...]) -> None:
    seen: set[str] = set()
    for name in ids:
        if not name:
            raise InvalidInput("an id column name is empty")
        if name in seen:
            raise InvalidInput(f"id column {name!r} is given twice")
        seen.add(name)


def _chunk_counts(
    files: list[InputFile],
    chunk_rows: int,
    records: dict[tuple[int, int], ChunkRecord],
    learnt: dict[int, int],
) -> list[int | None]:
    counts: list[int | None] = []
    for number, file in enumerate(files):
        known = file.chunk_count(chunk_rows)
        if known is None:
            known = learnt.get(number)
        if known is None:
            lasts = [r.chunk for (f, _), r in records.items() if f == number and r.last]
            known = lasts[0] + 1 if lasts else None
        counts.append(known)
    return counts


def _missing_chunks(
    files: list[InputFile],
    chunk_rows: int,
    records: dict[tuple[int, int], ChunkRecord],
    learnt: dict[int, int],
) -> list[str]:
    missing = []
    for number, count in enumerate(_chunk_counts(files, chunk_rows, records, learnt)):
        if count is None:
            missing.append(f"{files[number].path} (not read to its end)")
            continue
        absent = [c for c in range(count) if (number, c) not in records]
        if absent:
            missing.append(f"{files[number].path} chunk(s) {absent[:5]}")
    return missing


@dataclass(frozen=True)
class _Settings:
    """The job's settings: as asked for a new job, as recorded for a resumed one."""

    resumed: bool
    pinned: int | None
    chunk_rows: int
    id_columns: tuple[str, ...]
    drift_report: bool
    sha256: str | None = None  # the recorded model's, when resuming
    bad_records: str | None = None  # the --bad-records folder
    carry_columns: bool = False
    layout: PartLayout = field(default_factory=PartLayout)
    event_timestamp: str | None = None  # feature joins: the inputs' timestamp column


def _settings(
    options: BatchOptions,
    folder: JobFolder | ObjectJobFolder,
    source: ModelSource,
    files: list[InputFile],
) -> _Settings:
    """A new job's settings, or a resumed job's after checking that the command and the inputs
    agree with what the job recorded."""
    name, pinned = source.name, source.pinned
    if not folder.has_job():
        foreign = folder.foreign_entries()
        if foreign:
            raise InvalidInput(
                f"output {options.output} is not empty ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): a new job needs an empty folder"
            )
        chunk_rows = options.chunk_rows or DEFAULT_CHUNK_ROWS
        bad = None if options.bad_records is None else str(options.bad_records.absolute())
        return _Settings(
            False,
            pinned,
            chunk_rows,
            options.id_columns,
            options.drift_report,
            None,
            bad,
            options.carry_columns,
            options.layout,
            options.event_timestamp,
        )
    if not options.resume:
        raise InvalidInput(
            f"output {options.output} holds a batch job already: pass --resume to continue it, "
            "or choose another folder"
        )
    job = folder.read_job()
    if job.get("format") != JOB_FORMAT:
        raise InvalidInput(f"{options.output}: unknown job format {job.get('format')!r}")
    try:
        model = job["model"]
        recorded = _Settings(
            True,
            int(model["version"]),
            int(job["chunk_rows"]),
            tuple(str(c) for c in job["id_columns"]),
            bool(job["drift_report"]),
            str(model["sha256"]),
            None if job.get("bad_records") is None else str(job["bad_records"]),
            bool(job.get("carry_columns", False)),
            _recorded_layout(job.get("layout")),
            _recorded_timestamp(job.get("features")),
        )
        recorded_name = str(model["name"])
        inputs = [InputFile.from_json(f) for f in job["inputs"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{options.output}: malformed job manifest ({exc!r})") from None
    if recorded_name != name:
        raise InvalidInput(f"cannot resume: the job scores model {recorded_name!r}, not {name!r}")
    if pinned is not None and pinned != recorded.pinned:
        if source.uri is not None:
            raise InvalidInput(
                f"cannot resume: the job scores {name!r} version {recorded.pinned}, but "
                f"{source.uri} now names version {pinned}; finish it with --model "
                f"models:/{name}/{recorded.pinned}"
            )
        raise InvalidInput(f"cannot resume: the job scores version {recorded.pinned}, not {pinned}")
    if source.store_sha256 is not None and source.store_sha256 != recorded.sha256:
        raise InvalidInput(
            f"cannot resume: the job scored {name!r} version {recorded.pinned} with sha256 "
            f"{(recorded.sha256 or '')[:12]}…, but {source.where} has {source.store_sha256[:12]}…"
        )
    if options.chunk_rows is not None and options.chunk_rows != recorded.chunk_rows:
        raise InvalidInput(
            f"cannot resume: the job's chunks have {recorded.chunk_rows} rows, not "
            f"{options.chunk_rows}"
        )
    if options.id_columns and tuple(options.id_columns) != recorded.id_columns:
        raise InvalidInput(
            f"cannot resume: the job passes id columns {list(recorded.id_columns)}, not "
            f"{list(options.id_columns)}"
        )
    if options.bad_records is not None and (
        str(options.bad_records.absolute()) != recorded.bad_records
    ):
        raise InvalidInput(
            f"cannot resume: the job sets bad records aside in {recorded.bad_records or 'none'}"
            f", not {options.bad_records}"
        )
    if options.carry_columns and not recorded.carry_columns:
        raise InvalidInput("cannot resume: the job does not carry the input columns")
    if options.layout.grouped and options.layout != recorded.layout:
        raise InvalidInput(
            f"cannot resume: the job lays its parts out as {_layout_text(recorded.layout)}, not "
            f"{_layout_text(options.layout)}"
        )
    if options.event_timestamp is not None and options.event_timestamp != recorded.event_timestamp:
        raise InvalidInput(
            f"cannot resume: the job joins features as of column {recorded.event_timestamp!r}, "
            f"not {options.event_timestamp!r}"
        )
    _check_same_inputs(inputs, files)
    return recorded


def _recorded_layout(data: Any) -> PartLayout:
    if data is None:
        return PartLayout()
    if not isinstance(data, dict):
        raise ValueError("layout is not an object")
    rows, size, column = data.get("part_rows"), data.get("part_bytes"), data.get("partition_by")
    return PartLayout(
        None if rows is None else int(rows),
        None if size is None else int(size),
        None if column is None else str(column),
    )


def _recorded_timestamp(data: Any) -> str | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("features is not an object")
    return str(data["event_timestamp"])


def _layout_text(layout: PartLayout) -> str:
    shown = [
        f"{flag} {value}"
        for flag, value in (
            ("--part-rows", layout.part_rows),
            ("--part-bytes", layout.part_bytes),
            ("--partition-by", layout.partition_by),
        )
        if value is not None
    ]
    return " ".join(shown) if shown else "one part per chunk"


def _check_layout(options: BatchOptions) -> None:
    layout = options.layout
    if not layout.grouped:
        return
    if options.engine == "ray":
        raise InvalidInput(
            "--part-rows, --part-bytes and --partition-by work with the local engine only "
            "(not --engine ray)"
        )
    if layout.part_rows is not None and layout.part_rows < 1:
        raise InvalidInput("--part-rows must be at least 1")
    if layout.part_bytes is not None and layout.part_bytes < 1:
        raise InvalidInput("--part-bytes must be at least 1")
    if layout.partition_by is not None and not layout.partition_by:
        raise InvalidInput("--partition-by: the column name is empty")


@dataclass(frozen=True)
class _Prepared:
    """A job checked from end to end, before its output folder is touched."""

    settings: _Settings
    version: int
    version_dir: Path
    manifest: Any  # edgewise.runtime.package.manifest.Manifest
    columns: ColumnSpec
    schema: Any  # pyarrow.Schema of every part file
    join: FeatureJoin | None = None  # the model's feature lookups, joined from the offline store


@dataclass
class _Loaded:
    """The model and drift collector of a job, loaded (files verified, warm-up run)."""

    model: Any  # edgewise.runtime.serving.model.LoadedModel
    collector: DriftCollector | None
    no_report: str
    session: SessionSettings
    threads: int


def run_batch(options: BatchOptions) -> BatchSummary:
    """Run (or resume) a batch job; see :mod:`edgewise.runtime.batch`.

    Validate, then commit: the model, every input file and the output folder are checked, and
    the model is loaded, before the output folder is created or locked, so a refused job writes
    nothing."""
    started = time.perf_counter()
    _check_id_columns(options.id_columns)
    if options.bad_records is not None and options.engine == "ray":
        raise InvalidInput("--bad-records works with the local engine only (not --engine ray)")
    if options.chunk_rows is not None and options.chunk_rows < 1:
        raise InvalidInput("--chunk-rows must be at least 1")
    _check_layout(options)

    files = discover_inputs(options.input)
    _check_output_location(options.output, options.input, files)

    folder = open_job_folder(options.output)
    folder.check_path()
    source = resolve(
        options.model, options.repo, options.store, options.store_timeout, options.model_cache
    )
    name, model_dir = source.name, source.model_dir
    prepared = _prepare(options, folder, source, files)
    loaded = None
    if not _already_complete(folder, prepared):
        loaded = _load(options, prepared, name, model_dir)
    folder.create()
    folder.lock()
    try:
        if _settings(options, folder, source, files) != prepared.settings:
            raise InvalidInput(
                f"output {options.output} changed while the job was starting (another edgewise "
                "batch process?); run the command again"
            )
        if _already_complete(folder, prepared):
            data = folder.read_json(SUMMARY_FILE)
            return BatchSummary.from_json({**data, "already_complete": True})
        if loaded is None:  # pragma: no cover - completed before the lock, not after it
            loaded = _load(options, prepared, name, model_dir)
        return _run_locked(options, folder, source, files, prepared, loaded, started)
    finally:
        folder.close()


def _prepare(
    options: BatchOptions,
    folder: JobFolder | ObjectJobFolder,
    source: ModelSource,
    files: list[InputFile],
) -> _Prepared:
    """Every check of a job that reads only: settings, version, package, every input's columns."""
    name, model_dir = source.name, source.model_dir
    settings = _settings(options, folder, source, files)
    if settings.layout.grouped and options.engine == "ray":
        raise InvalidInput(
            f"the job lays its parts out as {_layout_text(settings.layout)}, which the local "
            "engine only does: resume it without --engine ray"
        )
    version = settings.pinned if settings.pinned is not None else default_version(model_dir)
    version_dir = model_dir / str(version)
    if not version_dir.is_dir():
        raise ModelNotFound(f"model {name!r} has no version {version} in {source.where}")
    manifest = read_manifest(version_dir)
    if settings.sha256 is not None and settings.sha256 != manifest.model_sha256:
        raise InvalidInput(
            f"cannot resume: model {name!r} version {version} changed since the job started "
            "(its sha256 differs)"
        )
    ids = settings.id_columns
    if settings.carry_columns:
        ids = _carried(files[0], manifest, ids)
    columns = ColumnSpec(manifest.features, ids)
    join = plan_join(model_dir, version_dir, manifest, settings.event_timestamp)
    if join is not None and options.engine == "ray":
        raise InvalidInput(
            f"model {name!r} looks its features up: feature joins work with the local engine "
            "only (not --engine ray)"
        )
    read = columns if join is None else join.read_columns(columns)
    schemas = check_inputs(
        files, read, settings.bad_records is not None
    )  # every file's columns, before anything is scored
    identity = {"model": name, "version": version, "sha256": manifest.model_sha256}
    schema = output_schema(manifest, _id_fields(schemas, columns, files), identity)
    if settings.layout.partition_by is not None:
        check_partition_column(schema, settings.layout.partition_by)
    return _Prepared(settings, version, version_dir, manifest, columns, schema, join)


def _already_complete(folder: JobFolder | ObjectJobFolder, prepared: _Prepared) -> bool:
    return prepared.settings.resumed and folder.is_complete() and folder.exists(SUMMARY_FILE)


def _load(options: BatchOptions, prepared: _Prepared, name: str, model_dir: Path) -> _Loaded:
    """The model is loaded (files and sha256 verified, warm-up run) before the job is recorded:
    a package that cannot be served leaves no job behind."""
    session, threads, cores = _session_settings(options)
    pa.set_cpu_count(max(1, cores))
    trusted = None
    if options.trusted_keys is not None:
        from edgewise.runtime.package.signing import TrustedKeys

        trusted = TrustedKeys.load(options.trusted_keys)
    model = load_model(name, prepared.version, prepared.version_dir, session, trusted=trusted)
    collector: DriftCollector | None = None
    no_report = "the drift report was turned off (--no-drift-report)"
    if prepared.settings.drift_report:
        from edgewise.kernels import unavailable

        missing = unavailable()
        if missing is not None:
            no_report = missing
            log.warning("batch: no drift report: %s", no_report)
        else:
            collector = DriftCollector.for_model(model_dir, prepared.version_dir, prepared.manifest)
            if collector is None:
                no_report = "the model package has no reference profile"
                log.warning("batch: no drift report: %s", no_report)
    return _Loaded(model, collector, no_report, session, threads)


def _run_locked(
    options: BatchOptions,
    folder: JobFolder | ObjectJobFolder,
    source: ModelSource,
    files: list[InputFile],
    prepared: _Prepared,
    loaded: _Loaded,
    started: float,
) -> BatchSummary:
    settings, version, manifest = prepared.settings, prepared.version, prepared.manifest
    name = source.name
    if settings.resumed:
        done = folder.recover()
    else:
        done = {}
        folder.write_job(
            {
                "format": JOB_FORMAT,
                "model": {
                    "name": name,
                    "version": version,
                    "sha256": manifest.model_sha256,
                    "source": source.uri,
                },
                "input": options.input,
                "inputs": [f.to_json() for f in files],
                "chunk_rows": settings.chunk_rows,
                "id_columns": list(settings.id_columns),
                "drift_report": settings.drift_report,
                "bad_records": settings.bad_records,
                "carry_columns": settings.carry_columns,
                "layout": settings.layout.to_json(),
                "features": None if prepared.join is None else prepared.join.to_json(),
                "output_schema": prepared.schema.to_string(show_schema_metadata=False),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    plan = JobPlan(
        out=options.output,
        folder=folder,
        files=files,
        columns=prepared.columns,
        chunk_rows=settings.chunk_rows,
        schema=prepared.schema,
        done=done,
        model_name=name,
        version=version,
        version_dir=prepared.version_dir,
        session=loaded.session,
        bad_records=None if settings.bad_records is None else Path(settings.bad_records),
        layout=settings.layout,
        read_columns=None
        if prepared.join is None
        else prepared.join.read_columns(prepared.columns),
        join=prepared.join,
    )
    progress = Progress([f.rows for f in files], [f.size for f in files], options.progress)
    progress.already_done(sum(r.rows for r in done.values()))
    log.info(
        "batch: model %s version %d (sha256 %s), %d input file(s), %d chunk(s) done before, "
        "%s engine, %d scorer thread(s)",
        name,
        version,
        manifest.model_sha256[:12],
        len(files),
        len(done),
        options.engine,
        loaded.threads,
    )
    if options.engine == "ray":
        from edgewise.runtime.batch.engine_ray import run_ray

        loaded.model = None  # each actor loads its own
        result: EngineResult = run_ray(
            plan,
            loaded.collector,
            progress,
            address=options.ray_address,
            actors=options.ray_actors,
            threads=loaded.threads,
        )
    else:
        from edgewise.runtime.batch.pipeline import run_local

        result = run_local(plan, loaded.model, loaded.collector, progress, loaded.threads)
    progress.finish()
    return _finish(
        options,
        folder,
        plan,
        manifest.model_sha256,
        result,
        loaded.collector,
        loaded.no_report,
        started,
        settings.resumed,
        source.uri,
    )


def _finish(
    options: BatchOptions,
    folder: JobFolder | ObjectJobFolder,
    plan: JobPlan,
    sha256: str,
    result: EngineResult,
    collector: DriftCollector | None,
    no_report: str,
    started: float,
    resumed: bool,
    source_uri: str | None,
) -> BatchSummary:
    """Check every chunk is done, write the drift report and the summary, mark the job done."""
    records = folder.recover()
    missing = _missing_chunks(plan.files, plan.chunk_rows, records, result.file_chunks)
    if missing:  # pragma: no cover - an engine that returns without error finished every chunk
        raise InvalidInput(f"the job did not finish: missing {'; '.join(missing[:3])}")
    rows = sum(r.rows for r in records.values())
    expected = [f.rows for f in plan.files]
    # Rows set aside (--bad-records, every run of the job) are not in the output: with them, the
    # output still accounts for every input row exactly once.
    set_aside = 0 if plan.bad_records is None else count_bad_records(plan.bad_records)
    if all(r is not None for r in expected) and rows + set_aside != sum(r or 0 for r in expected):
        raise InvalidInput(  # pragma: no cover - guards the exactly-once invariant
            f"the output holds {rows} rows and {set_aside} were set aside, but the inputs hold "
            f"{sum(r or 0 for r in expected)}"
        )
    if collector is not None:
        report = build_report(
            collector.report(), collector.distributions(), collector.reference, sha256
        )
    else:
        report = unavailable_report(plan.model_name, str(plan.version), sha256, no_report)
    folder.write_json(REPORT_JSON, report)
    folder.write_text(REPORT_HTML, render_html(report))
    seconds = time.perf_counter() - started
    summary = BatchSummary(
        output=str(options.output),
        model=plan.model_name,
        version=plan.version,
        sha256=sha256,
        engine=options.engine,
        inputs=len(plan.files),
        rows=rows,
        rows_this_run=result.rows_scored,
        parts=len(folder.parts()),
        seconds=round(seconds, 4),
        scoring_seconds=round(result.seconds, 4),
        rows_per_second=round(result.rows_scored / seconds, 1) if seconds > 0 else 0.0,
        resumed=resumed,
        source=source_uri,
        bad_records=set_aside,
        drift={
            "available": report["available"],
            "drifting": report["drifting"],
            "drifting_features": report["drifting_features"],
            "insufficient_data": report["insufficient_data"],
            "report": folder.location(REPORT_HTML),
        },
    )
    folder.write_json(SUMMARY_FILE, summary.to_json())
    folder.mark_complete()
    return summary
