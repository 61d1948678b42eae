"""A real Feast feature repository for tests, and Feast in an environment of its own.

Feast 0.67 installs ~560 MB and ``import feast`` takes seconds, so it never goes into the
project's environment: it lives in ``.venv-feast`` (or ``$EDGEWISE_FEAST_VENV``), installed by
:func:`ensure_feast` under a file lock (``python -m tests.feast_repo install`` does the same by
hand). The tests run Feast only through :func:`run_feast` (tests/feast_side.py in that
environment) and ``feast`` commands, once per test module.

The repository: the local provider (SQLite online store, file offline store) over a Parquet
file built from scikit-learn's diabetes data set: entity ``patient`` (join key ``patient_id``,
INT64), feature view ``patient_stats`` with nine of its columns (``bmi`` is sent with the
request instead, a request-time input), two snapshots (``OLD`` at :data:`T0`, ``NEW`` = old +
1 at :data:`T1`), and feature service ``diabetes_v1``. :func:`write_repo` with ``redis=PORT``
writes the same repository with Redis as its online store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENT = "feast[redis]==0.67.0"
PROJECT = "edgewise_test"
SERVICE = "diabetes_v1"
VIEW = "patient_stats"
ENTITY = "patient_id"
REQUEST_INPUT = "bmi"
FEATURES = ("age", "sex", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
COLUMNS = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")  # the model's order
NOW = datetime.now(UTC).replace(microsecond=0)
T0 = NOW - timedelta(hours=3)  # the old snapshot
T1 = NOW - timedelta(hours=1)  # the new one
BETWEEN = NOW - timedelta(hours=2)  # materializing up to here loads the old snapshot only

DEFINITIONS = """
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

patient = Entity(name="patient", join_keys=["patient_id"], value_type=ValueType.INT64)
source = FileSource(name="patients", path={path!r}, timestamp_field="event_timestamp")
stats = FeatureView(
    name="patient_stats",
    entities=[patient],
    ttl=timedelta(days=2),
    schema=[Field(name=n, dtype=Float64) for n in {features!r}],
    source=source,
)
service = FeatureService(name="diabetes_v1", features=[stats])
OBJECTS = [patient, stats, service]
"""


def venv_path() -> Path:
    return Path(os.environ.get("EDGEWISE_FEAST_VENV", ROOT / ".venv-feast"))


def feast_missing() -> str | None:
    """Why Feast cannot run here (None: it can), installing it first when it is missing."""
    try:
        ensure_feast()
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"Feast ({REQUIREMENT}) could not be installed into {venv_path()}: {exc}"
    return None


def ensure_feast(quiet: bool = True) -> Path:
    """The Feast environment's python, installing it first when missing or stale."""
    venv = venv_path()
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if python.exists() and stamp.exists() and stamp.read_text() == REQUIREMENT:
        return python
    lock_path = ROOT / ".build" / "feast-venv.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == REQUIREMENT:
            return python
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
        if quiet:
            pip.append("--quiet")
        subprocess.run([*pip, REQUIREMENT], check=True)
        stamp.write_text(REQUIREMENT)
    return python


def snapshots() -> pd.DataFrame:
    """Both snapshots of every patient: the features at T0 and, one higher, at T1."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    old = frame[list(FEATURES)].copy()
    old.insert(0, ENTITY, range(len(frame)))
    old["event_timestamp"] = pd.Timestamp(T0)
    new = old.copy()
    for name in FEATURES:
        new[name] = new[name] + 1.0
    new["event_timestamp"] = pd.Timestamp(T1)
    return pd.concat([old, new], ignore_index=True)


def training_entities() -> pd.DataFrame:
    """The entity rows of the training set: every patient at BETWEEN (old values apply), its
    request-time input and its target."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    return pd.DataFrame(
        {
            ENTITY: range(len(frame)),
            "event_timestamp": pd.Timestamp(BETWEEN),
            REQUEST_INPUT: frame[REQUEST_INPUT],
            "target": frame["target"],
        }
    )


def write_repo(folder: Path, redis_port: int | None = None) -> Path:
    """A feature repository in ``folder`` (data/patients.parquet, definitions.py,
    feature_store.yaml); Redis at ``redis_port`` as its online store, else SQLite."""
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    snapshots().to_parquet(data / "patients.parquet")
    (folder / "definitions.py").write_text(
        DEFINITIONS.format(path=str(data / "patients.parquet"), features=list(FEATURES))
    )
    if redis_port is None:
        online = "  type: sqlite\n  path: data/online_store.db\n"
    else:
        online = f'  type: redis\n  connection_string: "127.0.0.1:{redis_port}"\n'
    (folder / "feature_store.yaml").write_text(
        f"project: {PROJECT}\nregistry: data/registry.db\nprovider: local\n"
        f"online_store:\n{online}offline_store:\n  type: file\n"
        "entity_key_serialization_version: 3\n"
    )
    return folder


def run_feast(repo: Path, **job: Any) -> dict[str, Any]:
    """Run tests/feast_side.py on ``repo`` with ``job`` (see there); its answer."""
    python = ensure_feast()
    out = repo / f"answer-{time.monotonic_ns()}.json"
    job_path = repo / f"job-{time.monotonic_ns()}.json"
    job_path.write_text(json.dumps({"repo": str(repo), "service": SERVICE, "out": str(out), **job}))
    completed = subprocess.run(
        [str(python), str(ROOT / "tests" / "feast_side.py"), str(job_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"feast_side failed:\n{completed.stdout}\n{completed.stderr}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def feast_command(repo: Path, *args: str) -> subprocess.Popen[str]:
    """``feast -c REPO ARGS`` of the Feast environment, started (the caller waits)."""
    feast = ensure_feast().parent / "feast"
    return subprocess.Popen(
        [str(feast), "-c", str(repo), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


def redis_socket(workdir: Path) -> Path:
    """The Unix socket of the :func:`redis_server` started in ``workdir``."""
    return workdir / "redis.sock"


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[int]:
    """A redis-server on 127.0.0.1 with a free port, and on the Unix socket
    :func:`redis_socket` ``(workdir)``, no persistence, waited on with PING."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir),
         "--unixsocket", str(redis_socket(workdir)), "--unixsocketperm", "700"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield port
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


if __name__ == "__main__":
    if sys.argv[1:] == ["install"]:
        print(ensure_feast(quiet=False))
