"""Ground truth for earlier predictions, one entry for every front end.

A batch of labels for a model goes to the versions that answered the requests: the version named,
else every served version that keeps predictions (the default one first), each label to the
version that kept its request id (:func:`~edgewise.runtime.serving.quality.submit_feedback`:
every label checked before any is joined). Labels taken are also written beside the captured
requests when data capture is on, for ``edgewise capture export --labelled``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from edgewise.runtime.errors import ModelNotReady
from edgewise.runtime.serving.quality import Label, OnlineQuality, submit_feedback

if TYPE_CHECKING:
    from edgewise.runtime.serving.capture import Capture
    from edgewise.runtime.serving.repository import ModelRepository

__all__ = ["Feedback"]


class Feedback:
    """Labels joined with the predictions a model's versions kept; ``capture``: where taken
    labels are also written (None: capture is off)."""

    def __init__(self, repository: ModelRepository, capture: Capture | None = None) -> None:
        self.repository = repository
        self.capture = capture

    def quality(self, model_name: str, version: str) -> OnlineQuality:
        """The online quality of one version; ModelNotReady where it keeps no predictions."""
        model = self.repository.get(model_name, version)
        if model.quality is None:
            raise ModelNotReady(
                f"model {model.name!r} version {model.version} keeps no predictions for "
                "feedback (quality tracking is off, or the model is not a classifier or regressor)"
            )
        return model.quality

    def _qualities(self, model_name: str, version: str) -> list[OnlineQuality]:
        """Where labels may go: the version named, else every served version that keeps
        predictions, the default one first."""
        if version:
            return [self.quality(model_name, version)]
        default = self.repository.get(model_name)
        others = [
            self.repository.get(model_name, str(number))
            for number in self.repository.served_versions(model_name)
            if number != default.version
        ]
        qualities = [m.quality for m in (default, *others) if m.quality is not None]
        return qualities or [self.quality(model_name, "")]

    def submit(
        self, model_name: str, version: str, labels: Sequence[Label]
    ) -> tuple[int, int, int]:
        """Join ``labels`` (request id, row, truth): (joined, unknown, duplicate). A refused
        batch (a bad label, an unknown model) joins, counts and captures nothing."""
        qualities = self._qualities(model_name, version)
        counts = submit_feedback(qualities, labels)
        if self.capture is not None:  # taken (every label checked): kept for the export
            self.capture.record_labels(model_name, labels)
        return counts
