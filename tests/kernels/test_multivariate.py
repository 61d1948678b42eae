"""ReconstructionState: the PCA reconstruction error against scikit-learn's PCA (the oracle)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from edgewise.kernels import ReconstructionState, reconstruction_errors


def _fitted(seed: int = 0) -> tuple[np.ndarray, StandardScaler, PCA]:
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated columns
    scaler = StandardScaler().fit(reference)
    pca = PCA(n_components=0.65).fit(scaler.transform(reference))
    return reference, scaler, pca


def _oracle(rows: np.ndarray, scaler: StandardScaler, pca: PCA) -> np.ndarray:
    """NannyML's reconstruction error: the Euclidean distance between the standardised row and
    its PCA reconstruction (``inverse_transform(transform(z))``)."""
    z = scaler.transform(rows)
    return np.asarray(np.linalg.norm(pca.inverse_transform(pca.transform(z)) - z, axis=1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_errors_match_scikit_learn(dtype: type) -> None:
    _, scaler, pca = _fitted()
    rows = np.random.default_rng(1).normal(size=(50, 6)).astype(dtype)
    got = reconstruction_errors(rows, scaler.mean_, scaler.scale_, pca.components_)
    want = _oracle(rows.astype(np.float64), scaler, pca)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_window_sums_match_the_errors_and_merge() -> None:
    _, scaler, pca = _fitted()
    rows = np.random.default_rng(2).normal(size=(120, 6))
    want = _oracle(rows, scaler, pca)
    whole = ReconstructionState(6, range(6), scaler.mean_, scaler.scale_, pca.components_)
    parts = [whole.copy(), whole.copy()]
    whole.update(rows)
    for i in range(0, 60):
        parts[0].update(rows[i : i + 1])
    parts[1].update(np.asfortranarray(rows[60:]))  # another layout: copied, same numbers
    parts[0].merge(parts[1])
    for state in (whole, parts[0]):
        assert state.count == 120
        assert state.mean == pytest.approx(want.mean(), rel=1e-12)
        assert state.variance == pytest.approx(want.var(ddof=1), rel=1e-9)
    whole.reset()
    assert whole.count == 0 and np.isnan(whole.mean) and np.isnan(whole.variance)


def test_columns_select_from_the_batch_and_missing_values_are_the_reference_mean() -> None:
    _, scaler, pca = _fitted()
    rows = np.random.default_rng(3).normal(size=(10, 6))
    wide = np.zeros((10, 9))
    columns = [8, 0, 5, 1, 2, 7]
    wide[:, columns] = rows
    state = ReconstructionState(9, columns, scaler.mean_, scaler.scale_, pca.components_)
    np.testing.assert_allclose(state.errors(wide), _oracle(rows, scaler, pca), rtol=1e-10)
    # NaN and inf are imputed with the reference mean (NannyML's SimpleImputer(mean)).
    holes = rows.copy()
    holes[0, 1], holes[1, 4] = np.nan, np.inf
    imputed = rows.copy()
    imputed[0, 1], imputed[1, 4] = scaler.mean_[1], scaler.mean_[4]
    got = reconstruction_errors(holes, scaler.mean_, scaler.scale_, pca.components_)
    np.testing.assert_allclose(got, _oracle(imputed, scaler, pca), rtol=1e-10)
    assert state.count == 0  # errors() leaves the state alone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, [0], [0.0], [1.0], [[1.0]]), "n_inputs"),
        ((2, [], [], [], [[1.0]]), "columns"),
        ((2, [0, 2], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]]), "index"),
        ((2, [0, 1], [0.0], [1.0, 1.0], [[1.0, 0.0]]), "mean and scale"),
        ((2, [0, 1], [0.0, 0.0], [1.0, 0.0], [[1.0, 0.0]]), "scale"),
        ((2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0, 0.0]]), "components"),
        ((2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[np.nan, 0.0]]), "finite"),
    ],
)
def test_bad_models_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReconstructionState(*args)


def test_bad_batches_are_refused() -> None:
    state = ReconstructionState(2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1.0, 0.0]])
    for batch in (np.ones(2), np.ones((2, 3)), np.ones((2, 2), dtype=np.int64), [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="batch"):
            state.update(batch)  # type: ignore[arg-type]
    assert state.count == 0
    with pytest.raises(ValueError, match="same model"):
        state.merge(ReconstructionState(2, [0, 1], [0.0, 0.0], [1.0, 1.0], [[1, 0], [0, 1]]))
