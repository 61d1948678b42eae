"""Real models trained on scikit-learn's bundled datasets, shared by the whole test suite.

Each ``train_*`` function returns ``(model, X, y)`` where ``X`` is the DataFrame the model was fit
on and ``y`` a numpy array; results are cached, so treat them as read-only.
:func:`build_repo` converts all of them into one model repository with the names ``logreg``,
``forest``, ``mixed`` and ``regressor``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from edgewise.runtime.convert.converter import ConvertResult, convert

MODEL_NAMES = ("logreg", "forest", "mixed", "regressor")

# The categorical columns of ``mixed``: quantile buckets of a numeric column, as strings.
MIXED_CATEGORICALS = {"alcohol_level": "alcohol", "color_band": "color_intensity"}
MIXED_INTEGER = "magnesium"  # stored as int64 to exercise integer columns

Trained = tuple[Any, Any, np.ndarray]


@functools.cache
def train_logreg() -> Trained:
    """StandardScaler + LogisticRegression on breast cancer as a DataFrame (30 numeric columns
    such as "mean radius"; binary labels 0/1)."""
    data = load_breast_cancer(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=1000))])
    return model.fit(X, y), X, y


@functools.cache
def train_forest() -> Trained:
    """RandomForestClassifier (30 trees, depth 6) on wine as a DataFrame (13 numeric columns,
    one with a '/' in its name; labels 0/1/2)."""
    data = load_wine(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    model = RandomForestClassifier(n_estimators=30, max_depth=6, random_state=0).fit(X, y)
    return model, X, y


def mixed_frame() -> pd.DataFrame:
    """Wine as a DataFrame with an int64 column and two string columns ("low"/"mid"/"high")."""
    X = load_wine(as_frame=True).data.copy()
    X[MIXED_INTEGER] = X[MIXED_INTEGER].astype("int64")
    for column, source in MIXED_CATEGORICALS.items():
        X[column] = pd.qcut(X[source], 3, labels=["low", "mid", "high"]).astype(str).astype(object)
    return X


@functools.cache
def train_mixed() -> Trained:
    """ColumnTransformer (StandardScaler on the numeric columns, OneHotEncoder on the string
    ones) + LogisticRegression on wine (labels 0/1/2)."""
    X = mixed_frame()
    y = load_wine().target
    categorical = list(MIXED_CATEGORICALS)
    numeric = [c for c in X.columns if c not in MIXED_CATEGORICALS]
    pre = ColumnTransformer(
        [
            ("num", StandardScaler(), numeric),
            ("cat", OneHotEncoder(handle_unknown="ignore"), categorical),
        ]
    )
    model = Pipeline([("pre", pre), ("clf", LogisticRegression(max_iter=2000))]).fit(X, y)
    return model, X, y


@functools.cache
def train_regressor() -> Trained:
    """GradientBoostingRegressor (50 trees, depth 3) on diabetes as a DataFrame (10 columns)."""
    data = load_diabetes(as_frame=True)
    X, y = data.data, data.target.to_numpy()
    model = GradientBoostingRegressor(n_estimators=50, max_depth=3, random_state=0).fit(X, y)
    return model, X, y


TRAINERS = {
    "logreg": train_logreg,
    "forest": train_forest,
    "mixed": train_mixed,
    "regressor": train_regressor,
}


def build_repo(path: Path) -> Path:
    """Convert every model into the repository at ``path`` (version 1 of each); returns it."""
    path.mkdir(parents=True, exist_ok=True)
    for name in MODEL_NAMES:
        convert_model(name, path)
    return path


def convert_model(name: str, repo: Path, **kwargs: Any) -> ConvertResult:
    """Convert one of the models, its full training data as the sample."""
    model, X, _ = TRAINERS[name]()
    return convert(model, X, name=name, repo=repo, **kwargs)
