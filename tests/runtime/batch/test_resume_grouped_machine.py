"""Resume of a compacted, partitioned job (``--part-rows`` + ``--partition-by``) as a state
machine (hypothesis): runs that fail after some parts of a group are renamed or after some
groups are recorded, what a SIGKILL can leave (temporary files in partition folders, a part no
record names, a torn journal line), and runs to the end, in any order. Invariants: no chunk is
in two recorded groups, and the finished output, read as a hive dataset, holds every input row
exactly once with onnxruntime's scores (computed on the same chunks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from edgewise.runtime.batch import compact
from edgewise.runtime.batch.options import PartLayout
from edgewise.runtime.batch.writer import JobFolder
from edgewise.runtime.errors import EdgewiseError
from tests.runtime.batch.helpers import ID, batch, cancer_frame, expected_scores

CHUNK_ROWS = 40
FILE_ROWS = (130, 80, 95)  # 4 + 2 + 3 chunks
LAYOUT = PartLayout(part_rows=30, partition_by="band")  # groups of 2-3 chunks


class _Injected(Exception):
    """The failure that interrupts a run."""


def _groups(out: Path) -> list[dict[str, Any]]:
    try:
        lines = (out / "_chunks.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line
    return found


def test_grouped_resume_state_machine(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path_factory.mktemp("grouped-inputs")
    frame = cancer_frame(1)
    frame["band"] = np.array(["low", "mid", "high"])[np.arange(len(frame)) % 3]
    frames, start = [], 0
    for number, rows in enumerate(FILE_ROWS):
        part = frame.iloc[start : start + rows]
        part.to_parquet(source / f"in-{number}.parquet", index=False)
        frames.append(part)
        start += rows
    rows_in = pd.concat(frames)
    oracle: dict[str, np.ndarray] = {}
    for part in frames:  # chunk boundaries restart with each file
        for key, value in expected_scores(model_repo, "logreg", part, CHUNK_ROWS).items():
            oracle[key] = np.concatenate([oracle[key], value]) if key in oracle else value
    by_id = np.argsort(rows_in[ID].to_numpy())
    chunks = {(f, c) for f, rows in enumerate(FILE_ROWS) for c in range(-(-rows // CHUNK_ROWS))}
    real_install, real_commit = compact._install, JobFolder.commit_group
    jobs = iter(range(1_000_000))
    runs: list[int] = []

    class GroupedMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.out = tmp_path_factory.mktemp("grouped-out") / f"job-{next(jobs)}"
            self.complete = False

        def _run(self) -> Any:
            runs.append(len(self._done()))
            return batch(
                model_repo, "logreg", source, self.out, chunk_rows=CHUNK_ROWS, threads=1,
                resume=True, id_columns=(ID, "band"), layout=LAYOUT, drift_report=False,
            )  # fmt: skip

        def _done(self) -> list[tuple[int, int]]:
            return [(g[0], g[1]) for group in _groups(self.out) for g in group["chunks"]]

        @rule(step=st.sampled_from(["install", "commit"]), after=st.integers(0, 6))
        def interrupted_run(self, step: str, after: int) -> None:
            count = [0]

            def install(temporary: Path, final: Path) -> None:
                if step == "install" and count[0] >= after:
                    raise _Injected
                count[0] += 1
                real_install(temporary, final)

            def commit(folder: JobFolder, record: Any) -> None:
                if step == "commit" and count[0] >= after:
                    raise _Injected
                count[0] += 1
                real_commit(folder, record)

            monkeypatch.setattr(compact, "_install", install)
            monkeypatch.setattr(JobFolder, "commit_group", commit)
            try:
                summary = self._run()
            except _Injected:
                assert not self.complete
                return
            finally:
                monkeypatch.setattr(compact, "_install", real_install)
                monkeypatch.setattr(JobFolder, "commit_group", real_commit)
            assert summary.rows == len(rows_in)
            self.complete = True

        @rule(which=st.integers(0, 8))
        def crash_leftovers(self, which: int) -> None:
            if self.complete or not (self.out / "_job.json").exists():
                return
            folder = self.out / "band=mid"
            folder.mkdir(exist_ok=True)
            (folder / ".tmp-part-00001-000000.parquet").write_bytes(b"half a file")
            done = set(self._done())
            missing = sorted(chunks - done)
            some = next(self.out.rglob("part-*.parquet"), None)
            if some is not None and missing:
                file, chunk = missing[which % len(missing)]  # a group's start, or not
                (folder / f"part-{file:05d}-{chunk:06d}.parquet").write_bytes(some.read_bytes())
            with (self.out / "_chunks.jsonl").open("a") as journal:
                journal.write('{"group": "00000-0000')

        @rule()
        def run_to_the_end(self) -> None:
            summary = self._run()
            assert summary.already_complete == self.complete
            assert summary.rows == len(rows_in)
            self.complete = True

        @invariant()
        def no_chunk_is_in_two_groups(self) -> None:
            done = self._done()
            assert len(done) == len(set(done))
            if self.complete:
                assert set(done) == chunks

        @invariant()
        def the_finished_output_is_exactly_once(self) -> None:
            if not self.complete:
                return
            table = ds.dataset(self.out, format="parquet", partitioning="hive").to_table()
            got = table.to_pandas().sort_values(ID).reset_index(drop=True)
            np.testing.assert_array_equal(got[ID].to_numpy(), rows_in[ID].to_numpy()[by_id])
            assert got["band"].tolist() == rows_in["band"].to_numpy()[by_id].tolist()
            np.testing.assert_array_equal(got["label"].to_numpy(), oracle["label"][by_id])
            np.testing.assert_array_equal(
                np.stack(got["probabilities"].to_numpy()), oracle["probabilities"][by_id]
            )

    try:
        run_state_machine_as_test(
            GroupedMachine,
            settings=settings(
                max_examples=12, stateful_step_count=10, deadline=None, database=None
            ),
        )
    except EdgewiseError as exc:  # pragma: no cover - shows the message of a failing step
        raise AssertionError(exc.message) from exc
    assert len(runs) > 30 and len(set(runs)) > 3, "the machine hardly ran any job"
