"""Online quality as a state machine (hypothesis): two served versions of a 3-class model keep
predictions; labels arrive in batches without a version, good ones, repeated ones, and batches
with one bad label; the report is read any number of times and reset now and then.

The reference model in this file says what must hold: each label joins the version that kept its
request id (the default version first); a refused batch changes nothing; reading changes nothing;
only the reset clears ``drifting``; the detectors see the joined errors in batch order (the
reference feeds the same errors to its own DDM and ADWIN).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from edgewise.kernels import ADWIN, DDM
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.serving.quality import OnlineQuality, QualityConfig, submit_feedback

CLASSES = (0, 1, 2)
JOIN_SIZE = 4
DDM_SETTINGS = {"warm_start": 5}
ADWIN_SETTINGS = {"delta": 0.1, "clock": 4, "grace_period": 5}
IDS = st.sampled_from([f"r{i}" for i in range(7)])
ROWS = st.integers(0, 3)
GOOD = st.tuples(IDS, ROWS, st.sampled_from(CLASSES))
BAD_TRUTH = st.sampled_from([math.nan, math.inf, -math.inf, 0.5, 7, -1, "benign", "0"])


@dataclass
class Version:
    """What one version must hold."""

    kept: OrderedDict[str, tuple[list[int], list[bool]]] = field(default_factory=OrderedDict)
    labelled: int = 0
    error_sum: float = 0.0
    drifts: int = 0
    drifting: bool = False
    ddm: DDM | None = None
    adwin: ADWIN | None = None

    def remember(self, request_id: str, predictions: list[int]) -> None:
        self.kept[request_id] = (predictions, [False] * len(predictions))
        self.kept.move_to_end(request_id)
        while len(self.kept) > JOIN_SIZE:
            self.kept.popitem(last=False)

    def join(self, labels: list[tuple[str, int, int]]) -> tuple[int, int, int]:
        errors: list[float] = []
        unknown = duplicate = 0
        for request_id, row, truth in labels:
            if request_id not in self.kept or row >= len(self.kept[request_id][0]):
                unknown += 1
            elif self.kept[request_id][1][row]:
                duplicate += 1
            else:
                self.kept[request_id][1][row] = True
                errors.append(0.0 if self.kept[request_id][0][row] == truth else 1.0)
        if errors:
            self.learn(np.asarray(errors))
        return len(errors), unknown, duplicate

    def learn(self, errors: np.ndarray) -> None:
        self.labelled += errors.size
        self.error_sum += float(errors.sum())
        if self.ddm is None or self.adwin is None:
            self.ddm, self.adwin = DDM(**DDM_SETTINGS), ADWIN(**ADWIN_SETTINGS)
        fired = int(np.count_nonzero(self.ddm.update_status(errors) == 2))
        fired += int(self.adwin.update(errors).size)
        if fired:
            event("a detector fired")
            self.drifts += fired
            self.drifting = True


class OnlineQualityMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        config = QualityConfig(join_size=JOIN_SIZE, ddm=DDM_SETTINGS, adwin=ADWIN_SETTINGS)
        # Served: version 2 (the default) and version 1.
        self.served = [
            OnlineQuality("m", version, True, "label", config, classes=CLASSES)
            for version in ("2", "1")
        ]
        self.expected = [Version(), Version()]

    def reports(self) -> list[dict[str, Any]]:
        return [quality.report() for quality in self.served]

    def remember(self, version: int, request_id: str, predictions: list[int]) -> None:
        rows = np.asarray(predictions, dtype=np.int64)
        self.served[version].remember(request_id, {}, {"label": rows})
        self.expected[version].remember(request_id, predictions)

    @rule(version=st.sampled_from([0, 1]), request_id=IDS, data=st.data())
    def predict(self, version: int, request_id: str, data: st.DataObject) -> None:
        predictions = data.draw(st.lists(st.sampled_from(CLASSES), min_size=1, max_size=6))
        self.remember(version, request_id, predictions)

    @rule(version=st.sampled_from([0, 1]))
    def a_change(self, version: int) -> None:
        """One request of 16 rows, labelled right on 12, then wrong: the detectors may fire."""
        request_id = f"change-{version}"  # only this version ever keeps it
        self.remember(version, request_id, [0] * 16)
        self.feedback([(request_id, row, 0 if row < 12 else 1) for row in range(16)])

    def owner(self, request_id: str) -> int:
        return next((i for i, v in enumerate(self.expected) if request_id in v.kept), 0)

    @rule(labels=st.lists(GOOD, max_size=8))
    def feedback(self, labels: list[tuple[str, int, int]]) -> None:
        groups: dict[int, list[tuple[str, int, int]]] = {}
        for label in labels:
            groups.setdefault(self.owner(label[0]), []).append(label)
        expected = [0, 0, 0]
        for owner, group in groups.items():
            counts = self.expected[owner].join(group)
            expected = [a + b for a, b in zip(expected, counts, strict=True)]
        assert submit_feedback(self.served, labels) == tuple(expected)

    @rule(right=st.booleans())
    def label_every_kept_row(self, right: bool) -> None:
        """Labels that agree (or disagree) with every kept prediction: a run of these is a
        change of the error rate the detectors may see."""
        labels = [
            (request_id, row, predicted if right else (predicted + 1) % len(CLASSES))
            for version in self.expected
            for request_id, (predictions, _) in version.kept.items()
            for row, predicted in enumerate(predictions)
        ]
        self.feedback(labels)

    @rule(data=st.data())
    def resend_a_label(self, data: st.DataObject) -> None:
        """A label for a row that has one already is a duplicate and changes nothing else."""
        labelled = [
            (request_id, row)
            for index, version in enumerate(self.expected)
            for request_id, (_, marks) in version.kept.items()
            for row, mark in enumerate(marks)
            if mark and self.owner(request_id) == index  # where a label for it goes
        ]
        if not labelled:
            return
        request_id, row = data.draw(st.sampled_from(labelled))
        before = self.reports()
        assert submit_feedback(self.served, [(request_id, row, 0)]) == (0, 0, 1)
        assert self.reports() == before

    @rule(bad=BAD_TRUTH, data=st.data())
    def refused_batch(self, bad: Any, data: st.DataObject) -> None:
        """Good labels (for kept rows of either version, so they would join) and one bad one:
        the whole batch is refused and nothing changes."""
        kept = [
            (request_id, row)
            for version in self.expected
            for request_id, (predictions, _) in version.kept.items()
            for row in range(len(predictions))
        ]
        good = st.tuples(IDS, ROWS) if not kept else st.sampled_from(kept) | st.tuples(IDS, ROWS)
        labels = [
            (*where, truth)
            for where, truth in data.draw(st.lists(st.tuples(good, st.sampled_from(CLASSES))))
        ]
        place = data.draw(st.integers(0, len(labels)))
        bad_label = (*data.draw(good), bad)
        batch = [*labels[:place], bad_label, *labels[place:]]
        before = self.reports()
        with pytest.raises(InvalidInput, match=f"label {place} "):
            submit_feedback(self.served, batch)
        assert self.reports() == before

    @rule(times=st.integers(1, 3))
    def read(self, times: int) -> None:
        first = self.reports()
        for _ in range(times):
            assert self.reports() == first

    @rule(version=st.sampled_from([0, 1]))
    def reset(self, version: int) -> None:
        before = self.served[version].report()
        self.served[version].reset()
        self.expected[version].drifting = False
        after = self.served[version].report()
        assert after == {**before, "drifting": False}

    @invariant()
    def matches_the_reference(self) -> None:
        if not hasattr(self, "served"):
            return
        for quality, expected in zip(self.served, self.expected, strict=True):
            report = quality.report()
            assert report["labelled"] == expected.labelled
            assert report["kept_predictions"] == len(expected.kept)
            assert report["drifts"] == expected.drifts
            assert report["drifting"] is expected.drifting
            if expected.labelled:
                assert report["error"] == pytest.approx(expected.error_sum / expected.labelled)
            else:
                assert math.isnan(report["error"])


OnlineQualityMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
TestOnlineQuality = OnlineQualityMachine.TestCase
