"""Options whose errors name them and whose --help is true: ``convert --labels/--held-out``,
``convert --atol/--rtol`` (the relative slack an unbounded output gets) and ``keys generate
--name``."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression

from edgewise.runtime.cli.main import build_parser, main


def _run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("option", ["--labels", "--held-out"])
def test_convert_names_the_option_of_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str
) -> None:
    x = np.random.default_rng(0).random((40, 3))
    joblib.dump(LogisticRegression().fit(x, x[:, 0] > 0.5), tmp_path / "m.joblib")
    np.save(tmp_path / "s.npy", x.astype(np.float32))
    code, err = _run(
        capsys, "convert", tmp_path / "m.joblib", "--sample", tmp_path / "s.npy", "--name", "m",
        "--out", tmp_path / "repo", option, tmp_path / "nosuch.csv",
    )  # fmt: skip
    assert code == 1 and err.count("\n") == 1
    assert f"{option} {tmp_path / 'nosuch.csv'}: no such file" in err
    assert not (tmp_path / "repo").exists()


def test_convert_help_tells_both_tolerances() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()  # type: ignore[union-attr]
    flat = " ".join(text.split())
    assert "--atol" in flat and "--rtol" in flat
    assert "atol + rtol * |value|" in flat and "unbounded outputs" in flat


def test_a_regressor_gets_the_relative_slack_unless_rtol_is_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = np.random.default_rng(0).random((60, 3)) * 1000
    model = RandomForestRegressor(n_estimators=20, random_state=0).fit(x, x[:, 0] * 5)
    joblib.dump(model, tmp_path / "r.joblib")
    np.save(tmp_path / "s.npy", x.astype(np.float32))
    base = ["convert", tmp_path / "r.joblib", "--sample", tmp_path / "s.npy", "--out",
            tmp_path / "repo", "--atol", "0"]  # fmt: skip
    code, err = _run(capsys, *base, "--name", "r")
    assert code == 0, err  # float32 inference within rtol 1e-5 * |value|
    manifest = json.loads((tmp_path / "repo" / "r" / "1" / "manifest.json").read_text())
    assert manifest["parity"]["rtol"] == 1e-5 and manifest["parity"]["atol"] == 0.0
    code, err = _run(capsys, *base, "--name", "strict", "--rtol", "0")
    assert code == 1 and "parity check failed" in err and "allowed: atol 0)" in err
    code, err = _run(capsys, *base, "--name", "loose", "--rtol", "1e-3")
    assert code == 0, err


def test_keys_generate_names_the_name_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", "../evil"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --name: key name '../evil' is not valid" in err and "model name" not in err
    assert not (tmp_path / "keys").exists() and not (tmp_path / "evil.key").exists()
