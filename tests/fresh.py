"""Run a Python script in a fresh interpreter (where ``sys.modules`` shows what got imported)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_python(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """The script's standard output; ``env`` is added to this process's environment. A failing
    script fails the test with its standard error."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,  # the error below carries the script's standard error
        env=os.environ | (env or {}),
    )
    if done.returncode != 0:
        raise AssertionError(f"script exited with {done.returncode}:\n{done.stderr}")
    return done.stdout
