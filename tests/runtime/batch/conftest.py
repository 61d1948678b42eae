"""Real input files for the batch tests, made once per session from scikit-learn's datasets."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.runtime.batch.helpers import Inputs, cancer_frame, mixed_with_nulls


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    folder = tmp_path_factory.mktemp("batch-inputs")
    cancer = cancer_frame()
    cancer_parquet = folder / "cancer.parquet"
    pq.write_table(
        pa.Table.from_pandas(cancer, preserve_index=False), cancer_parquet, row_group_size=3000
    )
    cancer_csv = folder / "cancer.csv"
    cancer.to_csv(cancer_csv, index=False)
    cancer_npy = folder / "cancer.npy"
    np.save(cancer_npy, cancer.to_records(index=False), allow_pickle=False)
    mixed = mixed_with_nulls()
    mixed_parquet = folder / "mixed.parquet"
    mixed.to_parquet(mixed_parquet, index=False)
    mixed_csv = folder / "mixed.csv"
    mixed.to_csv(mixed_csv, index=False)
    return Inputs(
        folder, cancer, cancer_parquet, cancer_csv, cancer_npy, mixed, mixed_parquet, mixed_csv
    )
