"""The batch package's public names, its lazy imports, and the one-line errors when an optional
dependency is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import edgewise.runtime.batch as batch_package
from tests.runtime.batch.helpers import Inputs


def test_public_names() -> None:
    assert sorted(batch_package.__all__) == sorted(
        ["DEFAULT_CHUNK_ROWS", "BatchOptions", "BatchSummary", "parse_model_ref", "run_batch"]
    )
    assert batch_package.parse_model_ref("forest:12") == ("forest", 12)
    assert batch_package.parse_model_ref("forest") == ("forest", None)


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )


def test_importing_the_package_loads_neither_pyarrow_nor_ray() -> None:
    done = _python(
        "import sys, edgewise.runtime.batch, edgewise.runtime.cli.main\n"
        "assert 'pyarrow' not in sys.modules and 'ray' not in sys.modules, sorted(sys.modules)\n"
    )
    assert done.returncode == 0, done.stderr


def test_without_pyarrow_the_error_names_the_extra(model_repo: Path, tmp_path: Path) -> None:
    done = _python(
        "import sys\n"
        "sys.modules['pyarrow'] = None\n"
        "from edgewise.runtime.cli.main import main\n"
        f"sys.exit(main(['batch', '--repo', {str(model_repo)!r}, '--model', 'logreg', "
        f"'--input', 'x.parquet', '--output', {str(tmp_path / 'out')!r}]))\n"
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "edgewise batch: error: batch scoring needs the Python package 'pyarrow', which is not "
        "installed: run pip install 'edgewise[data]'"
    )


def test_without_ray_the_error_names_the_extra(
    model_repo: Path, inputs: Inputs, tmp_path: Path
) -> None:
    done = _python(
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "from edgewise.runtime.cli.main import main\n"
        f"sys.exit(main(['batch', '--repo', {str(model_repo)!r}, '--model', 'logreg', "
        f"'--input', {str(inputs.cancer_parquet)!r}, '--output', {str(tmp_path / 'out')!r}, "
        "'--engine', 'ray']))\n"
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("edgewise batch: error: the Ray engine needs the Python package")
    assert last.endswith("run pip install 'edgewise[ray]'")
    assert "Traceback" not in done.stderr
