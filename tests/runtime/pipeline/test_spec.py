"""The pipeline file's checks, one line naming what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.pipeline.spec import load_spec, parse_spec

BASE: dict[str, Any] = {
    "model": "m",
    "data": {"path": "d.csv", "label": "y"},
    "train": {"command": ["python", "t.py"]},
    "convert": {},
    "evaluate": {},
    "register": {"alias": "candidate"},
}


def _with(**changes: Any) -> dict[str, Any]:
    document = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for key, value in changes.items():
        if value is None:
            document.pop(key)
        else:
            document[key] = value
    return document


def test_a_minimal_file_parses_with_defaults(tmp_path: Path) -> None:
    spec = parse_spec(BASE, source=str(tmp_path / "p.toml"))
    assert spec.data.path == tmp_path / "d.csv" and spec.train.code == tmp_path
    assert spec.data.holdout_fraction == 0.25 and spec.gate is None
    assert spec.workdir == tmp_path / ".edgewise-pipeline"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (_with(evaluate=None), "missing step(s) [evaluate]"),
        (_with(extra=1), "unknown key(s) 'extra'"),
        (_with(data={"label": "y"}), "[data] needs path"),
        (
            _with(data={"path": "d.csv", "capture": {"dir": "c", "model": "m"}, "label": "y"}),
            "[data] needs path",
        ),
        (_with(data={"path": "d.json", "label": "y"}), "expected a .parquet or .csv file"),
        (_with(data={"path": "d.csv"}), "[data] label is missing"),
        (_with(data={"path": "d.csv", "label": "y", "features": ["y"]}), "cannot be a feature"),
        (_with(data={"path": "d.csv", "label": "y", "holdout_fraction": 1.5}), "between 0 and 1"),
        (_with(data={"capture": {"dir": "c"}}), "[data.capture] model is missing"),
        (_with(train={"command": "python t.py"}), "must be a list of strings"),
        (_with(train={"command": ["p"], "env": {"EDGEWISE_X": "1"}}), "set by the pipeline"),
        (_with(train={"command": ["p"], "timeout_s": 0}), "timeout_s must be a positive"),
        (_with(register={"alias": "latest"}), "alias 'latest' is not valid"),
        (_with(register={"alias": "production"}), "needs a [gate]"),
        (_with(gate={"overall": {"acc": {"min": 1}}}), "'acc' is not a metric"),
        (
            _with(gate={"data": {"path": "x"}, "overall": {"accuracy": {"min": 1}}}),
            "[gate.data]",
        ),
        (_with(format=2), "format 2 is not known"),
        (_with(convert={"opset": 99}), "[convert] opset 99 is not supported; choose 9 to"),
        (_with(convert={"opset": 8}), "[convert] opset 8 is not supported"),
        (
            _with(evaluate={"slice_by": ["size", "region", "size"]}),
            "[evaluate] slice_by names 'size' more than once",
        ),
    ],
)
def test_bad_files_are_refused_naming_the_entry(document: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_spec(document, source="p.toml")
    assert message in info.value.message
    assert "\n" not in info.value.message


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        load_spec(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("model = \n")
    with pytest.raises(InvalidInput, match="not valid TOML"):
        load_spec(tmp_path / "bad.toml")
