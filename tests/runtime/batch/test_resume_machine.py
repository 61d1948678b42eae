"""Batch resume as a state machine (hypothesis): runs interrupted after some chunks (an injected
write failure), leftovers of a crash, a bad input file dropped into the input folder, and runs
to the end, in any order. The reference model: the rows scored before (the journal's chunks),
whether the job exists and is complete; the oracle for scores: onnxruntime run directly on each
chunk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from edgewise.runtime.batch import pipeline
from edgewise.runtime.errors import EdgewiseError, InvalidInput
from tests.runtime.batch.helpers import (
    ID,
    assert_scores_equal,
    batch,
    cancer_frame,
    expected_scores,
    output_arrays,
    read_output,
)

CHUNK_ROWS = 40
FILE_ROWS = (130, 80, 95)  # 4 + 2 + 3 chunks


class _Injected(Exception):
    """The write failure that interrupts a run."""


def _journal(out: Path) -> dict[tuple[int, int], int]:
    """The journaled chunks and their rows."""
    try:
        lines = (out / "_chunks.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return {}
    records = [json.loads(line) for line in lines if line.strip()]
    return {(r["file"], r["chunk"]): r["rows"] for r in records}


def _snapshot(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_resume_state_machine(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path_factory.mktemp("machine-inputs")
    frame = cancer_frame(1)
    frames, start = [], 0
    for number, rows in enumerate(FILE_ROWS):
        part = frame.iloc[start : start + rows]
        part.to_parquet(source / f"in-{number}.parquet", index=False)
        frames.append(part)
        start += rows
    all_ids = pd.concat(frames)[ID].to_numpy()
    oracle: dict[str, np.ndarray] = {}
    for part in frames:  # chunk boundaries restart with each file
        for key, value in expected_scores(model_repo, "logreg", part, CHUNK_ROWS).items():
            oracle[key] = np.concatenate([oracle[key], value]) if key in oracle else value
    chunks = {(f, c) for f, rows in enumerate(FILE_ROWS) for c in range(-(-rows // CHUNK_ROWS))}
    real_write_part = pipeline.write_part
    jobs = iter(range(1_000_000))
    runs: list[int] = []  # the chunks done before each run: the machine did run jobs

    class ResumeMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.out = tmp_path_factory.mktemp("machine-out") / f"job-{next(jobs)}"
            self.started = False  # the model: a job was recorded
            self.complete = False
            self.scored: dict[tuple[int, int], int] = {}  # chunks journaled so far: rows

        def _run(self, **options: Any) -> Any:
            runs.append(len(self.scored))
            return batch(
                model_repo, "logreg", source, self.out, chunk_rows=CHUNK_ROWS, threads=1,
                resume=True, **options,
            )  # fmt: skip

        @rule(writes=st.integers(0, 5))
        def interrupted_run(self, writes: int) -> None:
            done = [0]

            def failing(*args: Any) -> int:
                if done[0] >= writes:
                    raise _Injected(f"after {writes} part file(s)")
                done[0] += 1
                return real_write_part(*args)

            monkeypatch.setattr(pipeline, "write_part", failing)
            try:
                if self.complete:  # nothing left to write: the job says it is complete
                    assert self._run().already_complete
                    return
                left = len(chunks) - len(self.scored)
                if writes >= left:
                    summary = self._run()
                    self._finished(summary, before=dict(self.scored))
                    return
                with pytest.raises(_Injected):
                    self._run()
            finally:
                monkeypatch.setattr(pipeline, "write_part", real_write_part)
            self.started = True
            journal = _journal(self.out)
            assert set(self.scored) <= set(journal), "a finished chunk was lost"
            assert len(journal) == len(self.scored) + writes
            self.scored = journal

        @rule()
        def crash_leftovers(self) -> None:
            """What a SIGKILL can leave: a temporary file, an unjournaled part, a torn line."""
            if not self.started or self.complete:
                return
            missing = sorted(chunks - set(self.scored))
            (self.out / ".tmp-0123-part-00000-000000.parquet").write_bytes(b"half a file")
            any_part = next(self.out.glob("part-*.parquet"), None)
            if any_part is not None and missing:
                file, chunk = missing[0]
                shutil.copy(any_part, self.out / f"part-{file:05d}-{chunk:06d}.parquet")
            with (self.out / "_chunks.jsonl").open("a") as journal:
                journal.write('{"file": 0, "chu')

        @rule(kind=st.sampled_from(["missing column", "unreadable"]))
        def a_bad_input_file_is_refused_and_changes_nothing(self, kind: str) -> None:
            bad = source / "zz-bad.parquet"
            if kind == "missing column":
                frame.iloc[:10].drop(columns=["mean radius"]).to_parquet(bad, index=False)
            else:
                bad.write_bytes(b"PAR1 but not really")
            before = _snapshot(self.out)
            try:
                with pytest.raises(InvalidInput) as refused:
                    self._run()
            finally:
                bad.unlink()
            assert "zz-bad.parquet" in refused.value.message
            assert _snapshot(self.out) == before, "a refused run changed the output folder"

        @rule()
        def run_to_the_end(self) -> None:
            before = dict(self.scored)
            summary = self._run()
            if self.complete:
                assert summary.already_complete
                return
            self._finished(summary, before)

        def _finished(self, summary: Any, before: dict[tuple[int, int], int]) -> None:
            assert not summary.already_complete
            assert summary.rows == len(all_ids)
            assert summary.rows_this_run == len(all_ids) - sum(before.values())
            self.started = self.complete = True
            self.scored = _journal(self.out)
            assert set(self.scored) == chunks

        @invariant()
        def output_is_exactly_once_and_equals_onnxruntime(self) -> None:
            if not self.complete:
                return
            table = read_output(self.out)
            np.testing.assert_array_equal(table.column(ID).to_numpy(), all_ids)
            assert_scores_equal(output_arrays(table), oracle)

        @invariant()
        def a_started_job_is_recorded(self) -> None:
            assert (self.out / "_job.json").exists() == self.started

    try:
        run_state_machine_as_test(
            ResumeMachine,
            settings=settings(
                max_examples=25, stateful_step_count=20, deadline=None, database=None
            ),
        )
    except EdgewiseError as exc:  # pragma: no cover - shows the message of a failing step
        raise AssertionError(exc.message) from exc
    assert len(runs) > 100 and len(set(runs)) > 3, "the machine hardly ran any job"
