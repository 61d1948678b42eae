"""A pipeline run: data -> train -> convert -> evaluate -> gate -> register -> alias.

Validate, then commit: the store is asked first (a store that is down stops the run before any
work: nothing recorded, nothing registered); every step before ``register`` writes only into the
pipeline's work folder; a step that fails stops the run, is recorded with its reason, and nothing
is registered or moved. ``register`` publishes the version only after the gate passed, and the
alias moves last.

Steps whose inputs' fingerprints are unchanged are skipped: ``train`` (keyed on the data
fingerprint, the split, the features, the command, its environment variables and the code
version), ``convert`` (the trained model's sha256 and the converter's versions) and ``evaluate``
(the converted model, the data, the gate and the baseline version) reuse their outputs from the
work folder's cache (``<workdir>/cache/<step>-<key>/``, written whole or not at all);
``register`` is skipped when the store already holds the version a run with the same convert key
registered; ``alias`` when the alias names that version already.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.errors import EdgewiseError, ModelNotFound
from edgewise.runtime.package.manifest import sha256_file
from edgewise.runtime.pipeline import steps as st
from edgewise.runtime.pipeline.fingerprint import CodeVersion, code_version, environment, step_key
from edgewise.runtime.pipeline.records import RunLog, RunRecord, open_run_log
from edgewise.runtime.pipeline.spec import PipelineSpec
from edgewise.runtime.store import open_store
from edgewise.runtime.store.base import Store
from edgewise.runtime.store.lineage import utc_now
from edgewise.runtime.store.uri import StoreURI, parse_store_uri

__all__ = [
    "ORDER",
    "PipelineFailed",
    "StepTimer",
    "Terminated",
    "begin_record",
    "code_excludes",
    "execute",
    "fail_unexpectedly",
    "new_run_id",
    "pipeline_store",
    "run_pipeline",
]

ORDER: Final = ("data", "train", "convert", "evaluate", "gate", "register", "alias")
CONVERT_SAMPLE_ROWS: Final = 10_000
"""Rows of the training and holdout data the converter checks parity on (the first ones)."""
LINEAGE_CONVERT_KEY: Final = "pipeline.convert_key"


class PipelineFailed(EdgewiseError):
    """A run stopped at a step; it is recorded (``record``) unless the store itself failed."""

    def __init__(self, message: str, record: RunRecord) -> None:
        super().__init__(message)
        self.record = record


class Terminated(SystemExit):
    """SIGTERM during a run: the run is recorded ``failed`` (``terminated``), then the process
    exits with 128 + SIGTERM, as the signal's default would, without a traceback."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def terminated_as_exit() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (so the
    run can record its end); elsewhere, or off the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def unexpected_reason(exc: BaseException) -> str:
    """One line for a failure that is not edgewise's own error (an OSError, a bug, a signal)."""
    if isinstance(exc, Terminated):
        return "terminated"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fail_unexpectedly(record: RunRecord, steps: StepTimer, log: RunLog, exc: BaseException) -> None:
    """Record ``record`` as failed by ``exc`` (not an :class:`EdgewiseError`), best effort: the
    caller re-raises ``exc``; a run is never left ``running``."""
    record.outcome, record.failed_step = "failed", steps.current or ORDER[0]
    record.reason = unexpected_reason(exc)
    steps.not_run()
    record.finished_at = utc_now()
    with contextlib.suppress(Exception):
        log.finish(record)


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def pipeline_store(spec: PipelineSpec, override: StoreURI | str | None) -> StoreURI:
    """The store a run uses: ``override`` (the CLI's ``--store``, relative to the working
    directory), else the file's ``store`` (relative to the file), else the embedded default."""
    if isinstance(override, StoreURI):
        return override
    if override:
        return parse_store_uri(override)
    uri = parse_store_uri(spec.store)
    if spec.store and uri.kind == "sqlite" and uri.path is not None and not uri.path.is_absolute():
        return dataclasses.replace(uri, path=spec.base_dir / uri.path)
    return uri


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    return out


WARM_MODULES: Final = ("sklearn.base", "skl2onnx", "onnx", "onnxruntime", "joblib")
"""What convert and evaluate import (seconds of a run's fixed cost), imported in the background
while the user's command trains."""


def _import_quietly(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # a missing one is reported by the step that needs it
            return


def warm_imports() -> threading.Thread:
    """Start importing :data:`WARM_MODULES` on a daemon thread (Python's import locks keep a
    module from being imported twice; a step that needs one waits for it)."""
    thread = threading.Thread(
        target=_import_quietly, args=(WARM_MODULES,), name="edgewise-warm-imports", daemon=True
    )
    thread.start()
    return thread


class StepTimer:
    """Times each step into the record; the name of the step running now."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record
        self.current = ""

    @contextlib.contextmanager
    def step(self, name: str, key: str = "") -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"name": name, "status": "ran", "seconds": 0.0}
        if key:
            entry["key"] = key
        self.record.steps.append(entry)
        self.current = name
        started = time.perf_counter()
        try:
            yield entry
        except BaseException:
            entry["status"] = "failed"
            raise
        finally:
            entry["seconds"] = round(time.perf_counter() - started, 6)

    def not_run(self) -> None:
        done = {s["name"] for s in self.record.steps}
        for name in ORDER:
            if name not in done:
                self.record.steps.append({"name": name, "status": "not_run", "seconds": 0.0})


def _arguments(spec: PipelineSpec) -> dict[str, Any]:
    return {
        "train.command": list(spec.train.command),
        "train.env": dict(spec.train.env),
        "train.code": str(spec.train.code),
        "data.path": "" if spec.data.path is None else str(spec.data.path),
        "data.capture": (
            {}
            if spec.data.capture is None
            else {
                "dir": str(spec.data.capture.folder),
                "model": spec.data.capture.model,
                "version": spec.data.capture.version,
            }
        ),
        "data.label": spec.data.label,
        "data.features": list(spec.data.features),
        "data.holdout": "" if spec.data.holdout is None else str(spec.data.holdout),
        "data.holdout_fraction": spec.data.holdout_fraction,
        "data.seed": spec.data.seed,
        "convert.opset": spec.convert.opset,
        "convert.atol": spec.convert.atol,
        "evaluate.slice_by": list(spec.evaluate.slice_by),
        "register.alias": spec.register.alias or "",
        "pipeline_sha256": spec.sha256,
        "pipeline_file": dict(spec.raw),
    }


def _evaluate(
    spec: PipelineSpec, package: Path, baseline: Path | None, data: st.DataSet
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation (JSON) and the gate's verdict summary ({} without a [gate])."""
    from edgewise.runtime.evaluation.evaluate import evaluate_models, load_package
    from edgewise.runtime.evaluation.gate import GateSpec, evaluate_gate

    holdout = data.holdout[[*data.features, data.label, *(
        c for c in spec.evaluate.slice_by if c not in (*data.features, data.label)
    )]]  # fmt: skip
    if spec.gate is None:
        model = load_package(package)
        base = load_package(baseline) if baseline is not None else None
        evaluation = evaluate_models(
            model, holdout, data.label, baseline=base, slice_by=spec.evaluate.slice_by,
            min_slice_size=spec.evaluate.min_slice_size, data_info={"path": "<holdout rows>"},
        )  # fmt: skip
        return evaluation.to_json(), {}
    gate = GateSpec.from_mapping(spec.gate, source=f"{spec.source} [gate]")
    slices_table = spec.gate.get("slices", {})
    if not (isinstance(slices_table, Mapping) and "min_size" in slices_table):
        gate = dataclasses.replace(gate, min_slice_size=spec.evaluate.min_slice_size)
    verdict = evaluate_gate(
        gate, package, baseline=baseline, data=holdout, label=data.label,
        slice_by=spec.evaluate.slice_by or None,
    )  # fmt: skip
    assert verdict.evaluation is not None
    summary = {
        "passed": verdict.passed,
        # the candidate is not registered yet: its package's version number is the converter's
        # (1 in the run's own repository), not a version of the store, where it is the baseline's
        "summary": verdict.summary().replace(
            f"{verdict.model} version {verdict.version}", f"{verdict.model} candidate", 1
        ),
        "failures": [c.message for c in verdict.failures][:20],
        "counts": verdict.counts(),
        "baseline": None if verdict.baseline is None else list(verdict.baseline),
    }
    return verdict.evaluation.to_json(), summary


def _registered_by_key(store: Store, model: str, key: str, onnx_sha: str) -> int | None:
    try:
        versions = store.list_versions(model)
    except ModelNotFound:
        return None
    for version in versions:
        if version.lineage.params.get(LINEAGE_CONVERT_KEY) == key and (
            version.model_sha256 == onnx_sha
        ):
            return version.version
    return None


def execute(
    spec: PipelineSpec,
    record: RunRecord,
    steps: StepTimer,
    *,
    store: Store | None,
    code: CodeVersion,
    run_dir: Path,
    cache: Path | None,
    data_path: Path | None = None,
    previous_schema: list[dict[str, str]] | None = None,
    reuse: bool = True,
) -> None:
    """Run the steps into ``record``. ``store`` None: data to evaluate only, no baseline (a
    reproduction); ``cache`` None: every step runs and nothing is cached; ``reuse`` False:
    every step runs, its outputs replace the cached ones. Raises on the first failure."""
    warm_imports()
    import pandas as pd

    from edgewise.runtime.convert.converter import convert, load_model

    # -- data
    with steps.step("data") as entry:
        data, origin = st.load_data(spec.data, data_path, run_dir, slice_by=spec.evaluate.slice_by)
        record.data = {
            **origin,
            "path": str(data.path),
            "fingerprint": data.fingerprint,
            "rows": data.rows,
            "train_rows": len(data.train),
            "holdout_rows": len(data.holdout),
            "label": data.label,
            "features": list(data.features),
            "schema": data.schema,
            **data.split_info(spec.data),
        }
        if previous_schema is not None and not spec.data.allow_schema_change:
            change = st.compare_schema(previous_schema, data.schema)
            if change:
                raise st.StepFailed(
                    "data",
                    f"the data's schema changed since the last successful run ({change}); "
                    "set [data] allow_schema_change = true if that is intended",
                )
        entry["fingerprint"] = data.fingerprint
        run_dir.mkdir(parents=True, exist_ok=True)
        train_path = run_dir / "train.parquet"
        pd.DataFrame(data.train).to_parquet(train_path, index=False)

    # -- train
    inputs = {
        "data": data.fingerprint,
        "split": data.split_info(spec.data),
        "features": list(data.features),
        "label": data.label,
        "command": list(spec.train.command),
        "env": dict(spec.train.env),
        "code": [code.commit, code.diff_sha256],
    }
    train_key = step_key("train", inputs)
    with steps.step("train", train_key) as entry:
        model_path: Path | None = None
        if cache is not None and reuse:
            folder = cache / f"train-{train_key}"
            done = st.read_done(folder)
            candidate = folder / st.TRAIN_MODEL
            if done and candidate.is_file() and sha256_file(candidate) == done.get("sha256"):
                model_path, entry["status"] = candidate, "skipped"
        if model_path is None:
            if cache is not None:
                with st.cached_folder(cache, "train", train_key) as scratch:
                    result = st.run_train(
                        spec.train, train_data=train_path, out_dir=scratch,
                        features=data.features, label=data.label, run_id=record.run_id,
                        seed=spec.data.seed, log_path=run_dir / "train.log",
                    )  # fmt: skip
                    st.write_done(scratch, {"sha256": result.model_sha256, "run": record.run_id})
                model_path = cache / f"train-{train_key}" / st.TRAIN_MODEL
                entry["command_seconds"] = round(result.seconds, 6)
            else:
                out = run_dir / "train"
                out.mkdir(parents=True, exist_ok=True)
                result = st.run_train(
                    spec.train, train_data=train_path, out_dir=out, features=data.features,
                    label=data.label, run_id=record.run_id, seed=spec.data.seed,
                    log_path=run_dir / "train.log",
                )  # fmt: skip
                model_path = result.model_path
                entry["command_seconds"] = round(result.seconds, 6)
        model_sha = sha256_file(model_path)
        record.artifacts["model_sha256"] = model_sha
        entry["model_sha256"] = model_sha

    # -- convert
    env = record.environment.get("packages", {})
    convert_key = step_key(
        "convert",
        {
            "model": model_sha,
            "data": data.fingerprint,
            "split": data.split_info(spec.data),
            "features": list(data.features),
            "opset": spec.convert.opset,
            "atol": spec.convert.atol,
            "versions": [env.get(p, "") for p in ("edgewise", "skl2onnx", "onnx", "scikit-learn")],
        },
    )
    with steps.step("convert", convert_key) as entry:
        package: Path | None = None
        relative = Path("repo") / spec.model / "1"
        if cache is not None and reuse:
            folder = cache / f"convert-{convert_key}"
            if st.read_done(folder) and (folder / relative).is_dir():
                package, entry["status"] = folder / relative, "skipped"
        if package is None:
            model = load_model(model_path)
            sample = data.train[list(data.features)].head(CONVERT_SAMPLE_ROWS)
            held = data.holdout[list(data.features)].head(CONVERT_SAMPLE_ROWS)
            if cache is not None:
                with st.cached_folder(cache, "convert", convert_key) as scratch:
                    convert(
                        model, sample, name=spec.model, repo=scratch / "repo", version=1,
                        opset=spec.convert.opset, atol=spec.convert.atol, held_out=held,
                        source={"pipeline_run": record.run_id, "model_sha256": model_sha},
                    )  # fmt: skip
                    st.write_done(scratch, {"run": record.run_id})
                package = cache / f"convert-{convert_key}" / relative
            else:
                package = convert(
                    model, sample, name=spec.model, repo=run_dir / "repo", version=1,
                    opset=spec.convert.opset, atol=spec.convert.atol, held_out=held,
                    source={"pipeline_run": record.run_id, "model_sha256": model_sha},
                ).path  # fmt: skip
        onnx_sha = st.onnx_sha256(package)
        record.artifacts.update(onnx_sha256=onnx_sha, package=str(package))
        entry["onnx_sha256"] = onnx_sha

    # -- evaluate (and the gate's verdict, judged in the next step)
    current = (
        st.current_version(store, spec.model, spec.register.alias) if store is not None else None
    )
    baseline_id = None if current is None else [current.version, current.model_sha256]
    evaluate_key = step_key(
        "evaluate",
        {
            "convert": convert_key,
            "baseline": baseline_id,
            "gate": spec.gate,
            "slice_by": list(spec.evaluate.slice_by),
            "min_slice_size": spec.evaluate.min_slice_size,
        },
    )
    with steps.step("evaluate", evaluate_key) as entry:
        judged: dict[str, Any] | None = None
        if cache is not None and reuse:
            judged = st.read_done(cache / f"evaluate-{evaluate_key}")
            if judged is not None and "evaluation" in judged:
                entry["status"] = "skipped"
            else:
                judged = None
        if judged is None:
            with tempfile.TemporaryDirectory(prefix="edgewise-baseline-") as scratch:
                baseline = None
                if current is not None and store is not None:
                    baseline = st.fetch_baseline(store, current, Path(scratch))
                evaluation, verdict = _evaluate(spec, package, baseline, data)
            judged = {"evaluation": evaluation, "gate": verdict}
            if cache is not None:
                with st.cached_folder(cache, "evaluate", evaluate_key) as folder:
                    st.write_done(folder, judged)
        evaluation = judged["evaluation"]
        overall = evaluation.get("overall", {})
        record.metrics = _finite(overall.get("metrics", {}))
        record.slices = [
            {"key": s.get("key"), "count": s.get("count"), "metrics": _finite(s.get("metrics", {}))}
            for s in evaluation.get("slices", ())
        ]
        if baseline_id is not None:
            entry["baseline_version"] = baseline_id[0]

    # -- gate
    if store is None:
        return  # a reproduction stops here: nothing is judged, registered or moved
    verdict = judged.get("gate") or {}
    with steps.step("gate") as entry:
        if not verdict:
            entry["status"] = "skipped"
            entry["detail"] = "no [gate] in the pipeline file"
        else:
            record.gate = dict(verdict)
            if not verdict.get("passed"):
                first = (verdict.get("failures") or [""])[0]
                raise st.StepFailed(
                    "gate", f"{verdict.get('summary')}" + (f": {first}" if first else "")
                )

    # -- register
    from edgewise.runtime.store.register import register

    with steps.step("register") as entry:
        version = _registered_by_key(store, spec.model, convert_key, onnx_sha)
        if version is not None:
            entry["status"] = "skipped"
            entry["detail"] = f"version {version} has this model already (same convert key)"
        else:
            paths = [data.path]
            if spec.data.holdout is not None:
                paths.append(spec.data.holdout)
            params = {
                "pipeline.run_id": record.run_id,
                LINEAGE_CONVERT_KEY: convert_key,
                "pipeline.code_diff_sha256": code.diff_sha256,
                "pipeline.train_command": json.dumps(list(spec.train.command)),
                "pipeline.file_sha256": spec.sha256,
            }
            published = register(
                store, package, alias=None, description=spec.register.description,
                params=params, metrics=record.metrics, data=paths, code_dir=spec.train.code,
            )  # fmt: skip
            version = published.record.version
        record.registered = {"model": spec.model, "version": version}
        entry["version"] = version

    # -- alias
    with steps.step("alias") as entry:
        alias = spec.register.alias
        if alias is None:
            entry["status"] = "skipped"
            entry["detail"] = "no [register] alias"
            return
        now = st.current_version(store, spec.model, alias)
        record.registered.update(alias=alias, previous_version=None if now is None else now.version)
        if now is not None and now.version == version:
            entry["status"] = "skipped"
            entry["detail"] = f"{alias} names version {version} already"
            return
        gated = None if current is None else (current.version, current.model_sha256)
        if (None if now is None else (now.version, now.model_sha256)) != gated:
            raise st.StepFailed(  # the gate judged against another version: nothing moved
                "alias",
                f"{alias} moved since the gate (version "
                f"{None if current is None else current.version} -> "
                f"{None if now is None else now.version}); rerun",
            )
        store.set_alias(spec.model, alias, version)
        entry["detail"] = f"{alias}: {None if now is None else now.version} -> {version}"


def _previous_schema(log: RunLog, model: str) -> list[dict[str, str]] | None:
    for run in log.list_runs(model, limit=50):
        if run.kind == "run" and run.outcome == "succeeded" and run.data.get("schema"):
            return list(run.data["schema"])
    return None


def begin_record(
    spec: PipelineSpec, run_id: str, code: CodeVersion, trigger: Mapping[str, Any]
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        model=spec.model,
        pipeline=spec.source,
        started_at=utc_now(),
        trigger=dict(trigger),
        code=code.to_json(),
        arguments=_arguments(spec),
        environment=environment(),
    )


def code_excludes(spec: PipelineSpec, uri: StoreURI) -> list[Path]:
    """What under the code folder is not code: the work folder, the pipeline file (recorded
    as arguments), the data files (fingerprinted) and the store's files."""
    excludes = [spec.workdir, Path(spec.source)]
    for path in (spec.data.path, spec.data.holdout):
        if path is not None:
            excludes.append(path)
    if spec.data.capture is not None:
        excludes.append(spec.data.capture.folder)
    if uri.kind == "sqlite" and uri.path is not None:
        excludes.append(uri.path)
    return excludes


def run_pipeline(
    spec: PipelineSpec,
    *,
    store: StoreURI | str | None = None,
    trigger: Mapping[str, Any] | None = None,
    use_cache: bool = True,
) -> RunRecord:
    """Run ``spec`` and record it (``use_cache`` False: every step runs, refreshing the
    cache); returns the record of a run that succeeded, raises
    :class:`PipelineFailed` (recorded) for a failed step, or the store's error when the store
    cannot be reached (nothing recorded, nothing registered)."""
    uri = pipeline_store(spec, store)
    code = code_version(spec.train.code, code_excludes(spec, uri))  # before a store is created
    the_store = open_store(uri, create=True)
    log = open_run_log(uri, create=True)
    try:
        previous = _previous_schema(log, spec.model)  # the store answers, or the run stops here
        run_id = new_run_id()
        record = begin_record(spec, run_id, code, trigger or {"by": "cli"})
        steps = StepTimer(record)
        run_dir = spec.workdir / "runs" / run_id
        with terminated_as_exit():
            log.begin(record)
            _run_recorded(spec, record, steps, log, the_store, code, run_dir, use_cache, previous)
        return record
    finally:
        log.close()
        the_store.close()


def _run_recorded(
    spec: PipelineSpec,
    record: RunRecord,
    steps: StepTimer,
    log: RunLog,
    the_store: Store,
    code: CodeVersion,
    run_dir: Path,
    use_cache: bool,
    previous: list[dict[str, str]] | None,
) -> None:
    """Execute a begun run and record how it ended (whatever ended it)."""
    run_id = record.run_id
    try:
        try:
            execute(
                spec, record, steps, store=the_store, code=code, run_dir=run_dir,
                cache=spec.workdir / "cache", reuse=use_cache, previous_schema=previous,
            )  # fmt: skip
        except EdgewiseError as exc:
            step = exc.step if isinstance(exc, st.StepFailed) else steps.current
            reason = exc.reason if isinstance(exc, st.StepFailed) else exc.message
            reason = " ".join(reason.split())  # one line, whatever the step said
            record.outcome, record.failed_step, record.reason = "failed", step, reason
            steps.not_run()
            record.finished_at = utc_now()
            moved = (
                f"version {record.registered['version']} registered, alias not moved"
                if record.registered.get("version") is not None
                else "nothing registered or moved"
            )
            message = f"run {run_id} failed at {step}: {reason} ({moved})"
            try:
                log.finish(record)
            except EdgewiseError as store_exc:
                message += f"; the failure could not be recorded: {store_exc.message}"
            raise PipelineFailed(message, record) from None
        finally:
            with contextlib.suppress(OSError):
                for name in ("train.parquet",):
                    (run_dir / name).unlink(missing_ok=True)
    except PipelineFailed:
        raise
    except BaseException as exc:
        fail_unexpectedly(record, steps, log, exc)
        raise
    record.outcome = "succeeded"
    steps.not_run()
    record.finished_at = utc_now()
    log.finish(record)
