"""A test whose prerequisite is missing is skipped with the reason on a developer's machine and
fails under CI (tests/prerequisites.py, applied by tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    from tests.prerequisites import requires, unmet

    @requires("no widget here")
    def test_marked_without_its_prerequisite():
        pass

    def test_stopped_without_its_prerequisite():
        unmet("no gadget here")

    @requires(None)
    def test_marked_with_its_prerequisite():
        pass
    """
)


def run_probe(tmp_path: Path, ci: str | None) -> str:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": ci} if ci else {})
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rsE", "-p",
         "no:randomly", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(probe)],
        cwd=ROOT, env=env | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_a_missing_prerequisite_skips_with_its_reason(
    tmp_path: Path, ci: str | None
) -> None:
    out = run_probe(tmp_path, ci)
    assert "1 passed, 2 skipped" in out, out
    assert "no widget here" in out and "no gadget here" in out, out


@pytest.mark.parametrize("ci", ["true"])
def test_under_ci_a_missing_prerequisite_fails(tmp_path: Path, ci: str) -> None:
    out = run_probe(tmp_path, ci)
    # The mark stops the test in its setup (an error), unmet() in its body (a failure).
    assert "1 failed, 1 passed, 1 error" in out, out
    assert "CI must run this test, but no widget here" in out, out
    assert "CI must run this test, but no gadget here" in out, out
