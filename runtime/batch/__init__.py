"""``edgewise batch``: score Parquet, CSV and NumPy files with a model package, resumably.

Inputs are read in fixed chunks with pyarrow (:mod:`.reader`), turned into model inputs by
``arrow_to_inputs`` (``frame_to_inputs``' Arrow fast path) and scored with the server's
onnxruntime session settings (:mod:`.scoring`);
each chunk becomes one Parquet part file, written atomically and journaled, so a job killed at
any point and resumed produces exactly the output of an uninterrupted run (:mod:`.writer`). The
local engine (:mod:`.pipeline`) overlaps reading, scoring and writing on threads; the Ray engine
(:mod:`.engine_ray`) runs the same chunks on Ray Data actors. Every chunk's inputs also feed the
server's monitor, which gives the batch drift report (:mod:`.report`).

pyarrow and pandas come with the ``edgewise[data]`` extra, Ray with ``edgewise[ray]``; this
package imports neither until a job runs.
"""

from __future__ import annotations

from edgewise.runtime.batch.options import (
    DEFAULT_CHUNK_ROWS,
    BatchOptions,
    BatchSummary,
    parse_model_ref,
)
from edgewise.runtime.package.tabular import require_module

__all__ = ["DEFAULT_CHUNK_ROWS", "BatchOptions", "BatchSummary", "parse_model_ref", "run_batch"]


def run_batch(options: BatchOptions) -> BatchSummary:
    """Run or resume the batch job ``options`` describes (see :mod:`.job`); raises
    :class:`~edgewise.runtime.package.tabular.MissingDependency` without the ``data`` extra."""
    require_module("pyarrow", "batch scoring")
    require_module("pandas", "batch scoring")
    from edgewise.runtime.batch.job import run_batch as run

    return run(options)
