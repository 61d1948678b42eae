"""``edgewise pipeline reproduce RUN``: rerun a recorded run with the same code version, arguments
and data, and say whether the model and the metrics came out identical.

The recorded pipeline document is used (not the file as it is now). Before anything runs, the
training code must be at the recorded version (same commit, same hash of uncommitted changes) and
the data must have the recorded fingerprint; otherwise the reproduction is refused with one line
saying what differs (``--data PATH`` points at a copy of the data elsewhere; its fingerprint is
checked the same way). The rerun has no cache: data, train, convert and evaluate all run, into a
scratch folder; nothing is registered or moved. Compared: the trained model file's sha256, the
ONNX model's sha256 (the converter's output is byte-stable for a byte-identical model) and every
overall and per-slice metric, exactly. The reproduction is recorded as a run of kind
``reproduce`` (outcome ``identical`` or ``differs``).
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgewise.runtime.errors import EdgewiseError, InvalidInput
from edgewise.runtime.pipeline import steps as st
from edgewise.runtime.pipeline.fingerprint import CodeVersion, code_version
from edgewise.runtime.pipeline.records import RunRecord, open_run_log
from edgewise.runtime.pipeline.runner import (
    PipelineFailed,
    StepTimer,
    begin_record,
    code_excludes,
    execute,
    fail_unexpectedly,
    new_run_id,
    terminated_as_exit,
)
from edgewise.runtime.pipeline.spec import parse_spec
from edgewise.runtime.store.lineage import data_fingerprint, utc_now
from edgewise.runtime.store.uri import StoreURI

__all__ = ["Comparison", "compare_runs", "reproduce"]


@dataclass(frozen=True)
class Comparison:
    identical: bool
    differences: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"identical": self.identical, "differences": list(self.differences)}


def compare_runs(original: RunRecord, again: RunRecord) -> Comparison:
    """What differs between a run and its reproduction (models by sha256, metrics exactly)."""
    differences = []
    for key, what in (("model_sha256", "trained model"), ("onnx_sha256", "ONNX model")):
        before, after = original.artifacts.get(key), again.artifacts.get(key)
        if before != after:
            differences.append(f"{what} sha256 {str(before)[:12]} -> {str(after)[:12]}")
    for name in sorted(set(original.metrics) | set(again.metrics)):
        before_m, after_m = original.metrics.get(name), again.metrics.get(name)
        if before_m != after_m:
            differences.append(f"metric {name} {before_m!r} -> {after_m!r}")
    slices_before = {s["key"]: s for s in original.slices}
    slices_after = {s["key"]: s for s in again.slices}
    for key in sorted(set(slices_before) | set(slices_after), key=str):
        a, b = slices_before.get(key), slices_after.get(key)
        if a is None or b is None:
            differences.append(f"slice {key}: only in the {'reproduction' if a is None else 'run'}")
            continue
        if a.get("count") != b.get("count"):
            differences.append(f"slice {key}: {a.get('count')} -> {b.get('count')} rows")
        for name in sorted(set(a["metrics"]) | set(b["metrics"])):
            if a["metrics"].get(name) != b["metrics"].get(name):
                differences.append(
                    f"slice {key} metric {name} {a['metrics'].get(name)!r} -> "
                    f"{b['metrics'].get(name)!r}"
                )
    return Comparison(not differences, differences)


def _check_code(recorded: CodeVersion, now: CodeVersion) -> None:
    if recorded.same_as(now):
        return
    if recorded.commit != now.commit:
        raise InvalidInput(
            f"the training code in {now.folder} is at {now.label}, the run used "
            f"{recorded.label}: check out {recorded.commit} (and its recorded changes) first"
        )
    raise InvalidInput(
        f"the training code in {now.folder} has other uncommitted changes than the run's "
        f"({now.label}, the run used {recorded.label})"
    )


def _fingerprint_as(source: Path, name: str, holdout: Path | None) -> str:
    """The data fingerprint of ``source`` as if it still had the recorded file name (the
    fingerprint covers names; a copy elsewhere under another name is the same data)."""
    with tempfile.TemporaryDirectory(prefix="edgewise-fingerprint-") as scratch:
        alias = Path(scratch) / name
        alias.symlink_to(source.resolve())
        return data_fingerprint([alias] + ([holdout] if holdout is not None else []))


def reproduce(run_id: str, uri: StoreURI, *, data: Path | None = None) -> RunRecord:
    """Reproduce ``run_id`` recorded in the store ``uri``; returns the reproduction's record
    (``comparison`` says what differs). :class:`InvalidInput` when the code or the data no
    longer match the record (nothing runs)."""
    reader = open_run_log(uri, create=False)
    try:
        original = reader.get_run(run_id)
    finally:
        reader.close()
    if original.kind != "run" or not original.artifacts.get("onnx_sha256"):
        raise InvalidInput(
            f"run {run_id} ({original.kind}, {original.outcome}) produced no model to compare "
            "with; reproduce a run that got past convert"
        )
    document = original.arguments.get("pipeline_file")
    if not isinstance(document, dict):
        raise InvalidInput(f"run {run_id}: its record holds no pipeline document")
    spec = parse_spec(document, source=original.pipeline)
    recorded_code = CodeVersion.from_json(original.code)
    now = code_version(spec.train.code, code_excludes(spec, uri))
    _check_code(recorded_code, now)
    recorded_fp = str(original.data.get("fingerprint", ""))
    source = data if data is not None else Path(str(original.data.get("path", "")))
    if not source.is_file():
        raise InvalidInput(f"data {source}: no such file (give its new place with --data PATH)")
    recorded_name = Path(str(original.data.get("path", ""))).name
    fingerprint = _fingerprint_as(source, recorded_name, spec.data.holdout)
    if fingerprint != recorded_fp:
        raise InvalidInput(
            f"data {source}: fingerprint {fingerprint[:19]} differs from the run's "
            f"{recorded_fp[:19]} (the data changed; give the run's data with --data PATH)"
        )
    log = open_run_log(uri, create=True)
    try:
        record = begin_record(spec, new_run_id(), now, {"by": "reproduce", "run": run_id})
        record.kind, record.reproduces = "reproduce", run_id
        steps = StepTimer(record)
        with (
            terminated_as_exit(),
            tempfile.TemporaryDirectory(prefix="edgewise-reproduce-") as scratch,
        ):
            log.begin(record)
            try:
                execute(
                    spec, record, steps, store=None, code=now, run_dir=Path(scratch),
                    cache=None, data_path=source,
                )  # fmt: skip
            except EdgewiseError as exc:
                step = exc.step if isinstance(exc, st.StepFailed) else steps.current
                reason = exc.reason if isinstance(exc, st.StepFailed) else exc.message
                record.outcome, record.failed_step, record.reason = "failed", step, reason
                record.finished_at = utc_now()
                with contextlib.suppress(EdgewiseError):
                    log.finish(record)
                raise PipelineFailed(
                    f"reproduction {record.run_id} of {run_id} failed at {step}: {reason}", record
                ) from None
            except BaseException as exc:
                fail_unexpectedly(record, steps, log, exc)
                raise
        record.artifacts.pop("package", None)  # a scratch folder, gone now
        comparison = compare_runs(original, record)
        record.comparison = comparison.to_json()
        record.outcome = "identical" if comparison.identical else "differs"
        record.finished_at = utc_now()
        log.finish(record)
        return record
    finally:
        log.close()
