"""With monitoring off, a server never loads numba (about 120 MB of resident memory); with it on,
the kernels load at start, from the ahead-of-time compiled module when it is built (still
without numba, also for online quality's detectors) or through numba. Checked in a fresh
interpreter, where ``sys.modules`` tells."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.fresh import run_python
from tests.prerequisites import native_kernels_missing, requires

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from edgewise.runtime.serving.quality import OnlineQuality
    from edgewise.runtime.serving.repository import ModelRepository
    from edgewise.runtime.serving.monitor_config import MonitorConfig

    monitoring = sys.argv[2] == "on"
    repo = ModelRepository(
        Path(sys.argv[1]),
        monitor_defaults=MonitorConfig(enabled=monitoring),
        quality_enabled=True,
    )
    repo.load_all()
    model = repo.get("logreg")
    loaded_after_load = "numba" in sys.modules
    quality = model.quality
    assert isinstance(quality, OnlineQuality)
    import numpy as np
    feeds = {"features": np.zeros((1, 30), dtype=np.float32)}
    if model.monitor is not None:  # what the request path and the drift timer run
        for _ in range(3):
            model.monitor.observe(feeds)
        report = model.monitor.evaluate().report
        assert report.rows == 3, report.rows
    loaded_after_report = "numba" in sys.modules
    quality.remember("r1", feeds, model.run(feeds))
    quality.feedback([("r1", 0, 1)])
    print(json.dumps({
        "after_load": loaded_after_load,
        "after_report": loaded_after_report,
        "after_labels": "numba" in sys.modules,
        "monitored": model.monitor is not None,
        "labelled": quality.snapshot()["labelled"],
    }))
    """
)


def _run(repo: Path, monitoring: str, native: str) -> dict[str, object]:
    out = run_python(SCRIPT, str(repo), monitoring, env={"EDGEWISE_NATIVE_KERNELS": native})
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    ("monitoring", "native", "after_load", "monitored"),
    [
        ("off", "1", False, False),
        ("on", "0", True, True),  # numba's JIT kernels
        pytest.param(
            "on",
            "1",
            False,
            True,
            marks=requires(native_kernels_missing()),
        ),
    ],
)
def test_numba_loads_only_when_needed(
    model_repo: Path, monitoring: str, native: str, after_load: bool, monitored: bool
) -> None:
    result = _run(model_repo, monitoring, native)
    assert result["after_load"] is after_load
    assert result["after_report"] is after_load  # the drift timer's kernels load nothing more
    assert result["monitored"] is monitored
    # The change detectors of online quality run with the first labels: compiled ahead of time
    # where that module serves (no numba then either), else numba's.
    compiled = native == "1" and native_kernels_missing() is None
    assert result["after_labels"] is not compiled
    assert result["labelled"] == 1


WARM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from edgewise.runtime.app.server import warm_request_kernels

    seconds = warm_request_kernels()
    skipped_blas = "scipy.linalg" not in sys.modules
    import scipy.linalg  # still importable by anything that wants it later

    from edgewise.kernels import FeatureProfile, quantile_edges
    import numpy as np

    rows = np.random.default_rng(1).normal(size=(256, 3))
    profile = FeatureProfile(quantile_edges(rows, n_bins=8))
    profile.update(rows)
    print(json.dumps({"skipped_blas": skipped_blas, "seconds": seconds,
                      "rows": int(profile.moments.count[0]),
                      "mean_ok": bool(np.allclose(profile.moments.mean, rows.mean(axis=0)))}))
    """
)


def test_warming_the_request_kernels_skips_numbas_blas_probe() -> None:
    """The server's kernels load without SciPy's BLAS (about 16 MB), and still compute."""
    # numba's path: the probe runs there
    out = run_python(WARM_SCRIPT, env={"EDGEWISE_NATIVE_KERNELS": "0"})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["skipped_blas"] is True
    assert result["seconds"] > 0
    assert result["rows"] == 256
    assert result["mean_ok"] is True
