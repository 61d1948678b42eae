"""Input statistics of a batch job, through the server's monitor.

Each chunk's statistics go into a window of their own
(:meth:`~edgewise.runtime.serving.monitor.ModelMonitor.new_window`), filled by the monitor
(:meth:`~edgewise.runtime.serving.monitor.ModelMonitor.observe_window`), so chunks can be observed
on any thread, or on another machine (the Ray engine ships a chunk's window back to the driver). The
job's :class:`DriftCollector` folds the chunk windows into its monitor
(:meth:`~edgewise.runtime.serving.monitor.ModelMonitor.fold`) in chunk order, whatever order they
finish in, and asks the monitor for the report at the end: the statistics and drift scores are the
monitor's, never recomputed here, and an interrupted and resumed job, or the Ray engine, reports
exactly what one uninterrupted local run does.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgewise.runtime.package.model_config import VersionPolicy, read_model_config
from edgewise.runtime.package.reference_profile import (
    NumericProfile,
    ReferenceProfile,
    read_profile,
)
from edgewise.runtime.serving.monitor import DriftReport, ModelMonitor, MonitorConfig, WindowStats

if TYPE_CHECKING:
    from edgewise.runtime.serving.model import LoadedModel

__all__ = ["ChunkWindow", "DriftCollector", "FeatureDistribution", "batch_monitor_config"]

ChunkWindow = WindowStats
"""The statistics of one chunk: a monitor window, folded into the job's by the collector."""


def batch_monitor_config(model_dir: Path) -> MonitorConfig:
    """The model's monitoring settings (thresholds, minimum rows) from its ``config.json``, as
    the server reads them, with one window over the whole job and no reservoir."""
    settings = read_model_config(model_dir, VersionPolicy()).monitoring or {}
    config = MonitorConfig.from_json(settings, MonitorConfig())
    return replace(config, enabled=True, window_rows=0, window_seconds=0.0, reservoir_rows=0)


@dataclass(frozen=True)
class FeatureDistribution:
    """Reference and batch counts of one feature, for the charts.

    Numeric: ``labels`` are the bins (below range, each reference bin, above range, missing) and
    ``edges`` the reference bin edges; categorical: the categories, then unseen.
    """

    name: str
    kind: str
    labels: tuple[str, ...]
    edges: tuple[float, ...]
    reference: tuple[int, ...]
    batch: tuple[int, ...]


class DriftCollector:
    """Observes chunks and merges their windows, in order, into one job-wide monitor."""

    def __init__(
        self, model: str, version: str, reference: ReferenceProfile, config: MonitorConfig
    ) -> None:
        self.model = model
        self.version = version
        self.reference = reference
        self.config = config
        self.monitor = ModelMonitor(model, version, reference, config)
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, int], ChunkWindow] = {}
        self._chunks: dict[int, int] = {}  # file -> chunks, once known
        self._file = 0
        self._chunk = 0
        self.merged_chunks = 0

    @classmethod
    def for_model(cls, model_dir: Path, version_dir: Path, manifest: Any) -> DriftCollector | None:
        """The collector of a model version, or None when its package has no reference profile."""
        profile = read_profile(version_dir, manifest)
        if profile is None:
            return None
        return cls(manifest.name, version_dir.name, profile, batch_monitor_config(model_dir))

    def observe(
        self,
        feeds: Mapping[str, npt.NDArray[Any]],
        outputs: Mapping[str, npt.NDArray[Any]] | None = None,
        model: LoadedModel | None = None,
    ) -> ChunkWindow:
        """The window of one chunk's model inputs and outputs (thread-safe: a window of its
        own). Prediction drift reads the model's ``outputs``; a chunk scored before (a resumed
        job) has none, and ``model`` computes the one output the monitor reads."""
        name = self.monitor.prediction_output
        if name is not None and (outputs is None or name not in outputs) and model is not None:
            outputs = model.run(feeds, [name])
        window = self.monitor.new_window()
        self.monitor.observe_window(window, feeds, outputs)
        return window

    def add(self, file: int, chunk: int, window: ChunkWindow) -> None:
        """Take a chunk's window; it is merged once every chunk before it has been."""
        with self._lock:
            self._waiting[(file, chunk)] = window
            self._advance()

    def file_chunks(self, file: int, chunks: int) -> None:
        """Say how many chunks file ``file`` has (needed to move past it)."""
        with self._lock:
            self._chunks[file] = chunks
            self._advance()

    def _advance(self) -> None:
        while True:
            total = self._chunks.get(self._file)
            if total is not None and self._chunk >= total:
                self._file += 1
                self._chunk = 0
                continue
            window = self._waiting.pop((self._file, self._chunk), None)
            if window is None:
                return
            self.monitor.fold(window)
            self.merged_chunks += 1
            self._chunk += 1

    @property
    def pending(self) -> int:
        """Windows received but not merged yet (waiting for an earlier chunk)."""
        return len(self._waiting)

    def report(self) -> DriftReport:
        if self._waiting:
            raise RuntimeError(f"{len(self._waiting)} chunk window(s) were never merged")
        return self.monitor.report("current")

    def distributions(self) -> list[FeatureDistribution]:
        """Reference vs batch counts per feature, in the report's feature order."""
        window = self.monitor.snapshot("current")
        assert window is not None
        result: list[FeatureDistribution] = []
        numeric = self.reference.numeric
        if numeric is not None and window.numeric is not None:
            result.extend(_binned(numeric, window.numeric.histogram.counts, "numeric"))
        if self.reference.categorical and window.categorical is not None:
            cat_counts: npt.NDArray[np.int64] = window.categorical.counts
            for index, cat in enumerate(self.reference.categorical):
                row = cat_counts[index]
                n = len(cat.categories)
                result.append(
                    FeatureDistribution(
                        name=cat.name,
                        kind="categorical",
                        labels=(*cat.categories, "unseen"),
                        edges=(),
                        reference=tuple(int(c) for c in cat.counts),
                        batch=(*(int(c) for c in row[:n]), int(row[-1])),
                    )
                )
        outputs = self.reference.outputs
        seen = window.outputs
        if outputs is not None and seen is not None and seen.moments.count.any():
            result.extend(_binned(outputs.values, seen.histogram.counts, "prediction"))
        return result


def _binned(
    profile: NumericProfile, counts: npt.NDArray[np.int64], kind: str
) -> list[FeatureDistribution]:
    """Reference vs batch counts of binned columns (input features or model outputs)."""
    layout = profile.edges
    result = []
    for index, name in enumerate(profile.names):
        edges = layout.edges_of(index)
        bins = [f"{a:.4g} .. {b:.4g}" for a, b in itertools.pairwise(edges)]
        # Counts layout: underflow, this column's bins, (unused bins), overflow, nan.
        columns = [0, *range(1, len(bins) + 1), layout.overflow_column, layout.nan_column]
        result.append(
            FeatureDistribution(
                name=name,
                kind=kind,
                labels=("below range", *bins, "above range", "missing"),
                edges=tuple(float(e) for e in edges),
                reference=tuple(int(profile.counts[index, c]) for c in columns),
                batch=tuple(int(counts[index, c]) for c in columns),
            )
        )
    return result
