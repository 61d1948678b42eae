"""Option values are checked by argparse: a bad timeout, cooldown or limit is a usage error
(exit 2, one line naming the option), never a traceback or a misleading error later."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgewise.runtime.cli.main import main


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0", "soon"])
@pytest.mark.parametrize(
    "command",
    [
        ["models", "list"],
        ["models", "show", "m"],
        ["agent", "--model", "m", "--repo", "r"],
    ],
)
def test_store_timeout_must_be_a_finite_positive_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], value: str
) -> None:
    store = tmp_path / "store.db"
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--store", str(store), f"--store-timeout={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --store-timeout" in err and "Traceback" not in err
    assert not store.exists()


@pytest.mark.parametrize("value", ["-5", "0", "x"])
def test_runs_limit_must_be_at_least_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "runs", "--store", str(tmp_path / "s.db"), f"--limit={value}"])
    assert exit_.value.code == 2
    assert "argument --limit" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_trigger_seconds_must_be_finite_and_not_negative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", "trigger", str(tmp_path / "p.toml"), f"--cooldown={value}"])
    assert exit_.value.code == 2
    assert "argument --cooldown" in capsys.readouterr().err
