"""The automated run: data -> train (the user's command) -> convert -> evaluate (sliced) -> gate
against what the alias serves now -> register with lineage -> move the alias, each run recorded
in the metadata store (SQLite or MLflow) so it can be listed, shown and reproduced.

- :mod:`.spec`: the pipeline file (TOML), strictly validated.
- :mod:`.fingerprint`: code version, environment and data fingerprints.
- :mod:`.records`: the run record and where runs are kept (SQLite table, MLflow runs).
- :mod:`.steps`: one function per step.
- :mod:`.runner`: a run, step by step, with the cache and validate-then-commit.
- :mod:`.reproduce`: rerun a recorded run and compare.
- :mod:`.trigger`: alert- and schedule-started runs: a lock file and a cooldown.
"""
