"""Run by tests/feast_repo.py with the Python of the Feast environment (``.venv-feast``), never
imported by the tests: applies a feature repository's definitions (what ``feast apply`` does),
materializes it up to a given instant, and answers with Feast's own reads: online values
(``get_online_features``) and a point-in-time training set (``get_historical_features``).

``python tests/feast_side.py JOB.json`` where the job is
``{"repo": DIR, "apply": true, "materialize_end": ISO | null, "online_ids": [..],
"service": NAME, "historical": {"entities": PARQUET, "out": PARQUET} | null, "out": JSON}``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    from feast import FeatureStore

    repo = Path(job["repo"])
    store = FeatureStore(repo_path=str(repo))
    result: dict[str, object] = {}
    if job.get("apply"):
        spec = importlib.util.spec_from_file_location("definitions", repo / "definitions.py")
        assert spec is not None and spec.loader is not None
        definitions = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(definitions)
        store.apply(definitions.OBJECTS)
    if job.get("materialize_end"):
        store.materialize_incremental(end_date=datetime.fromisoformat(job["materialize_end"]))
    service = store.get_feature_service(job["service"])
    if job.get("online_ids") is not None:
        ids = [int(i) for i in job["online_ids"]]
        response = store.get_online_features(
            features=service, entity_rows=[{"patient_id": i} for i in ids]
        ).to_dict()
        result["online"] = {k: list(v) for k, v in response.items()}
    historical = job.get("historical")
    if historical:
        import pandas as pd

        entities = pd.read_parquet(historical["entities"])
        frame = store.get_historical_features(entity_df=entities, features=service).to_df()
        frame.to_parquet(historical["out"])
    Path(job["out"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
