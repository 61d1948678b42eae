"""Model versions for rollout tests: logreg version 1, and candidates of the same schema that
are good (same training, other coefficients), bad by labels (trained on inverted labels),
slow (the same answers after a long chain of no-op work) or drifting (a reference profile
from shifted data: the live traffic drifts against it)."""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from edgewise.runtime.convert.converter import convert
from edgewise.runtime.package.manifest import MODEL_FILE
from tests import models
from tests.runtime.store.helpers import logreg_inputs

NAME = "logreg"


@functools.cache
def _inverted() -> Any:
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))]).fit(
        X, 1 - y
    )


@functools.cache
def _good() -> Any:
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    return Pipeline(
        [("scale", StandardScaler()), ("clf", LogisticRegression(C=0.05, max_iter=1000))]
    ).fit(X, y)


def add_version(repo: Path, kind: str, version: int, name: str = NAME) -> Path:
    """Convert a candidate of ``kind`` (good, inverted, slow, drifting) as ``<name>/<version>``."""
    X = load_breast_cancer(as_frame=True).data
    if kind == "good":
        return convert(_good(), X, name=name, repo=repo, version=version).path
    if kind == "inverted":
        return convert(_inverted(), X, name=name, repo=repo, version=version).path
    if kind == "slow":  # a wide MLP: the same schema, many times the work per row
        from sklearn.neural_network import MLPClassifier

        y = load_breast_cancer().target
        wide = MLPClassifier(hidden_layer_sizes=(2048, 2048, 2048), max_iter=1, random_state=0)
        with warnings.catch_warnings():  # one iteration on purpose: it does not converge
            warnings.simplefilter("ignore")
            model = Pipeline([("scale", StandardScaler()), ("clf", wide)]).fit(X[:60], y[:60])
        return convert(model, X, name=name, repo=repo, version=version).path
    if kind == "drifting":  # the same model, profiled on shifted data
        model = models.train_logreg()[0]
        shifted = X * 1.8 + X.std() * 2
        return convert(model, shifted, name=name, repo=repo, version=version).path
    raise ValueError(kind)


def two_version_repo(source: Path, target: Path, kind: str) -> Path:
    """A repository with ``logreg`` version 1 (from ``source``) and a version 2 of ``kind``."""
    target.mkdir(parents=True)
    shutil.copytree(source / NAME, target / NAME)
    add_version(target, kind, 2)
    return target


def direct(folder: Path, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    """A package's answer computed by onnxruntime directly (the oracle)."""
    session = ort.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def rows(folder: Path, count: int, start: int = 0) -> dict[str, Any]:
    return logreg_inputs(folder, rows=count, start=start)
