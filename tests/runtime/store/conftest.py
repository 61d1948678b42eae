from __future__ import annotations

from tests.mlflow_server import mlflow_server

__all__ = ["mlflow_server"]  # one real MLflow server per test module of this folder
