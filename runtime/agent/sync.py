"""The sync agent: keeps one model on one edge server at the version a store's alias names.

Each poll (every ``interval`` seconds, with jitter) resolves the alias. When the version, or its
sha256, differs from what the agent deployed:

1. **download** every file into ``REPO/NAME/.incoming-<version>-<sha12>/`` (streamed, resumed
   with HTTP Range after a dropped connection or an agent restart, capped at ``max_bytes``), and
   verify each file's sha256 and size against the store's record;
2. **validate**: the manifest (its own checksums, the model's sha256), the ONNX checker, the input
   schema against the deployed version (unless the package's manifest config sets
   ``allow_schema_change``), and, in the agent's process, an onnxruntime load and the package's
   golden requests (``--no-local-load`` skips that on nodes short of memory);
3. **install**: fsync, then rename the folder to ``REPO/NAME/VERSION/`` (atomic);
4. **load** it on the server beside the current version, wait for ModelReady, replay the golden
   requests through the server at that version, then **switch** the server's default to it (one
   atomic swap on the server: requests never fail during it);
5. **watch** it for ``watch_seconds``: when the server's error rate for the model since the switch
   exceeds the rate before it by more than ``max_error_rate`` (with at least ``min_requests``
   requests seen; read from the server's Prometheus endpoint), roll back; otherwise it becomes the
   **last good** version: pinned in ``REPO/NAME/config.json`` (``default_version`` and a
   ``specific`` version policy), so a restarted server serves it; older versions are unloaded and
   only the last ``keep`` versions stay on disk. A watch that cannot read the server's metrics
   promotes nothing: the previous version stays the last good one and the agent reports itself
   unhealthy until it can read them (the watch's time starts then).

**Rollback protection**: the state file remembers the highest version the agent made the
default; an alias naming a lower one is refused before anything is downloaded (counted in
``edgewise_agent_refusals{reason="rollback"}``, recorded among the store's decisions, reported)
unless ``allow_rollback`` (``--allow-rollback``) is set. The agent's own rollbacks (a failed
watch or canary) and ``edgewise rollback`` by hand are explicit and always allowed. With trusted
keys, a signature must name the model and the store's version number and match the files and
``config.json``'s sections (:mod:`edgewise.runtime.package.signing`); the agent keeps those
sections when it pins versions.

A version that fails any step is refused (recorded in the state file with its reason, not retried
until the alias names something else; a corrupted download is retried after
``corrupt_retry_seconds``), and the server keeps serving the last good version. ``edgewise
rollback NAME`` does a rollback by hand; while a version is on its way (installed, loading, in
its rollout policy's steps: recorded in the state file, see
:class:`~edgewise.runtime.agent.state.Rollout`), it aborts that candidate instead.

The state lock is held while the state changes, never across a load, a golden request or a
step's wait (docs/rollout.md): a reader or ``edgewise rollback`` never waits for a rollout.

Store or server unreachable, slow or failing: exponential backoff with jitter, one log line per
failure, the server untouched. State lives in ``REPO/.edgewise-agent/NAME.json``; a restarted
agent resumes from it and never downloads what is already on disk. Each node reports its state to
the store (a tag or table row per node) and exposes Prometheus metrics (``edgewise_agent_*``), set
from the state file each time the agent reads or writes it (so ``edgewise rollback`` from another
process shows at the next poll). The agent never creates the store it reads: while it is missing
the store is reported unavailable and the agent retries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from edgewise.runtime._fs import fsync_dir, write_text_atomic
from edgewise.runtime.agent.policy import DECISION_PREFIX, RolloutPolicy, read_policy
from edgewise.runtime.agent.progressive import (
    Decision,
    Progressive,
    RolloutAborted,
    RolloutStopped,
)
from edgewise.runtime.agent.state import (
    AgentState,
    Deployed,
    Rejection,
    Rollout,
    StateFile,
    Watch,
)
from edgewise.runtime.agent.waves import wave_wait
from edgewise.runtime.client.client import EdgewiseClient, ServerError
from edgewise.runtime.config.settings import server_metrics_port
from edgewise.runtime.errors import (
    EdgewiseError,
    InvalidInput,
    ModelLoadError,
    ModelNotFound,
    PackageError,
    ResourceExhausted,
    Unavailable,
)
from edgewise.runtime.package.golden import GOLDEN_FILE, compare_outputs, read_golden
from edgewise.runtime.package.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    list_versions,
    parse_manifest,
    read_manifest,
    read_manifest_bytes,
    sha256_file,
    validate_model_name,
    verify_files,
)
from edgewise.runtime.package.model_config import MODEL_CONFIG_FILE, ModelConfig, VersionPolicy
from edgewise.runtime.package.paths import check_external_data
from edgewise.runtime.package.signing import SignatureError, TrustedKeys, verify_package
from edgewise.runtime.store.base import (
    ArtifactCorrupt,
    NodeReport,
    Store,
    StoreAuthError,
    StoreUnavailable,
    VersionRecord,
    safe_join,
    validate_alias,
    validate_node_id,
)
from edgewise.runtime.store.lineage import utc_now
from edgewise.runtime.store.register import ALLOW_SCHEMA_CHANGE
from edgewise.runtime.store.transfer import check_size_cap, fetch_file

__all__ = [
    "Agent",
    "AgentMetrics",
    "AgentSettings",
    "rollback",
    "schema_changes",
    "validate_package",
]

log = logging.getLogger(__name__)

INCOMING_PREFIX: Final = ".incoming-"
TRASH_PREFIX: Final = ".trash-"
OK_CODES: Final = frozenset({"OK", "NOT_FOUND"})


@dataclass(frozen=True)
class AgentSettings:
    model: str
    repo: Path
    server: str = "127.0.0.1:8001"
    alias: str = "production"
    node_id: str = field(default_factory=socket.gethostname)
    interval: float = 30.0  # seconds between polls
    jitter: float = 0.2  # each wait is interval * uniform(1 - jitter, 1 + jitter)
    backoff_initial: float = 1.0  # first retry delay after a failure; doubles up to backoff_max
    backoff_max: float = 300.0
    keep: int = 3  # versions kept on disk (the deployed and last good ones always are)
    max_bytes: int = 1 << 30  # download cap per version
    download_attempts: int = 3  # per poll, each resuming where the last stopped
    load_timeout: float = 120.0
    watch_seconds: float = 60.0
    max_error_rate: float = 0.05
    min_requests: int = 20
    # The server's Prometheus URL (None: the server's host at the metrics port of the server's
    # own settings, EDGEWISE_METRICS_PORT or its default).
    server_metrics: str | None = None
    local_load: bool = True
    require_golden: bool = False
    corrupt_retry_seconds: float = 600.0
    report_interval: float = 60.0
    state_dir: Path | None = None
    trusted_keys: Path | None = None  # refuse packages not signed by one of these keys
    # Rollback protection: a version lower than the highest this node has served is refused
    # unless this is set (--allow-rollback) or the rollback is the agent's own or by hand.
    allow_rollback: bool = False

    def __post_init__(self) -> None:
        validate_model_name(self.model)
        validate_alias(self.alias)
        validate_node_id(self.node_id)
        positive = {"interval": self.interval, "backoff_initial": self.backoff_initial}
        for key, value in positive.items():
            if not value > 0:
                raise InvalidInput(f"agent: {key} must be > 0, got {value}")
        if not 0 <= self.jitter < 1:
            raise InvalidInput(f"agent: jitter must be in [0, 1), got {self.jitter}")
        if self.keep < 1 or self.max_bytes < 1 or self.download_attempts < 1:
            raise InvalidInput("agent: keep, max_bytes and download_attempts must be >= 1")
        if not 0 <= self.max_error_rate <= 1:
            raise InvalidInput(
                f"agent: max_error_rate must be in [0, 1], got {self.max_error_rate}"
            )
        _ = self.metrics_url  # a malformed EDGEWISE_METRICS_PORT fails here, at start-up

    @property
    def metrics_url(self) -> str | None:
        """The server's Prometheus endpoint; None when it cannot be known (the server's metrics
        port setting is 0, a free port, or -1, none) and no ``server_metrics`` is given."""
        if self.server_metrics:
            return self.server_metrics
        port = server_metrics_port()
        if port <= 0:
            return None
        host = self.server.rsplit(":", 1)[0] or "127.0.0.1"
        return f"http://{host}:{port}/metrics"


class AgentMetrics:
    """The agent's own Prometheus metrics (a registry of their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "edgewise_agent_info", "Constant 1, labelled.", ["model", "alias", "node"], registry=r
        )
        self.deployed = Gauge(
            "edgewise_agent_deployed_version", "Version the server serves by default.", registry=r
        )
        self.last_good = Gauge(
            "edgewise_agent_last_good_version", "Pinned last good version.", registry=r
        )
        self.target = Gauge(
            "edgewise_agent_target_version", "Version the alias names (last poll).", registry=r
        )
        self.rolling = Gauge(
            "edgewise_agent_rollout_version",
            "Version on its way to the default (loading, in its policy's steps; 0: none).",
            registry=r,
        )
        self.polls = Counter("edgewise_agent_polls", "Polls by result.", ["result"], registry=r)
        self.deploys = Counter(
            "edgewise_agent_deploys", "Deployments by outcome.", ["result"], registry=r
        )
        self.rollbacks = Counter(
            "edgewise_agent_rollbacks", "Rollbacks by reason.", ["reason"], registry=r
        )
        self.refusals = Counter(
            "edgewise_agent_refusals",
            "Versions refused before anything changed, by reason (rollback: lower than one "
            "served; signature_<why>: expired_key, revoked_key, version_mismatch, ...).",
            ["reason"],
            registry=r,
        )
        self.download_bytes = Counter(
            "edgewise_agent_download_bytes", "Bytes downloaded from the store.", registry=r
        )
        self.download_seconds = Counter(
            "edgewise_agent_download_seconds", "Time spent downloading.", registry=r
        )
        self.failures = Gauge(
            "edgewise_agent_consecutive_failures", "Failed polls in a row.", registry=r
        )
        self.store_up = Gauge(
            "edgewise_agent_store_up", "1 when the last store call succeeded.", registry=r
        )
        self.healthy = Gauge(
            "edgewise_agent_healthy",
            "1 when the agent polls fine and serves the alias's version (0 when degraded).",
            registry=r,
        )
        self.last_success = Gauge(
            "edgewise_agent_last_success_timestamp_seconds", "Last successful poll.", registry=r
        )
        self.next_poll = Gauge(
            "edgewise_agent_next_poll_seconds", "Delay before the next poll.", registry=r
        )


class _Stopped(Exception):
    """The agent was asked to stop in the middle of a download or a rollout step."""


class _Refused(Exception):
    """A version failed a step: refuse it (not an EdgewiseError: handled inside the agent)."""

    def __init__(self, reason: str, retry_after: float | None = None, kind: str = "rejected"):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.kind = kind


# ---- validation ----------------------------------------------------------------------------------


def schema_changes(old: Manifest, new: Manifest) -> list[str]:
    """How ``new``'s input schema breaks clients of ``old`` (empty: compatible). Inputs must keep
    their names, datatypes and shapes; features must keep their kind, tensor and column. New
    categories are fine; outputs may gain tensors but not lose or retype one."""
    problems: list[str] = []
    old_inputs = {t.name: t for t in old.inputs}
    new_inputs = {t.name: t for t in new.inputs}
    for name in sorted(set(old_inputs) | set(new_inputs)):
        before, after = old_inputs.get(name), new_inputs.get(name)
        if before is None:
            problems.append(f"new input {name!r}")
        elif after is None:
            problems.append(f"input {name!r} removed")
        elif (before.datatype, before.shape) != (after.datatype, after.shape):
            problems.append(
                f"input {name!r} changed from {before.datatype} {list(before.shape)} to "
                f"{after.datatype} {list(after.shape)}"
            )
    new_features = {f.name: f for f in new.features}
    for feature in old.features:
        other = new_features.get(feature.name)
        if other is None:
            problems.append(f"feature {feature.name!r} removed")
        elif (feature.kind, feature.input, feature.column) != (
            other.kind,
            other.input,
            other.column,
        ):
            problems.append(
                f"feature {feature.name!r} moved from {feature.kind} "
                f"{feature.input}[{feature.column}] to {other.kind} {other.input}[{other.column}]"
            )
    new_outputs = {t.name: t for t in new.outputs}
    for output in old.outputs:
        other_out = new_outputs.get(output.name)
        if other_out is None:
            problems.append(f"output {output.name!r} removed")
        elif other_out.datatype != output.datatype:
            problems.append(
                f"output {output.name!r} changed from {output.datatype} to {other_out.datatype}"
            )
    return problems


@dataclass(frozen=True)
class Validation:
    manifest: Manifest
    golden_requests: int
    local_load_seconds: float | None


def validate_package(
    folder: Path,
    record: VersionRecord,
    deployed: Manifest | None,
    *,
    local_load: bool = True,
    require_golden: bool = False,
    trusted: TrustedKeys | None = None,
) -> Validation:
    """Check a downloaded package before it goes near the server; :class:`PackageError` or
    :class:`ModelLoadError` naming the first problem. With ``trusted`` keys the manifest's
    signature is checked first (:class:`~edgewise.runtime.package.signing.SignatureError`).

    The graph is checked by onnx's checker where onnx is installed (the ``convert`` extra), and
    by the onnxruntime load of ``local_load`` in any case; a node without onnx, validating with
    ``local_load=False``, leaves the graph to the server's own load, which refuses it before
    anything switches."""
    raw_manifest = read_manifest_bytes(folder)
    if trusted is not None:
        verify_package(folder, trusted, raw_manifest, name=record.name, version=record.version)
    manifest = parse_manifest(raw_manifest, str(folder / MANIFEST_FILE))
    if manifest.name != record.name:
        raise PackageError(f"manifest names model {manifest.name!r}, not {record.name!r}")
    if manifest.model_sha256 != record.model_sha256:
        raise PackageError(
            f"manifest's model sha256 {manifest.model_sha256[:12]}… differs from the store's "
            f"{record.model_sha256[:12]}…"
        )
    verify_files(folder, manifest)
    # Before the checker, which would open external data files wherever they point.
    check_external_data(folder / MODEL_FILE, folder, [f.path for f in manifest.files])
    _check_graph(folder / MODEL_FILE)
    if deployed is not None and not manifest.config.get(ALLOW_SCHEMA_CHANGE):
        problems = schema_changes(deployed, manifest)
        if problems:
            raise PackageError(
                "input schema is not compatible with the deployed version: "
                + "; ".join(problems[:5])
                + f" (set config.{ALLOW_SCHEMA_CHANGE} in the package to allow it)"
            )
    golden = read_golden(folder)
    if golden is not None and not any(f.path == GOLDEN_FILE for f in manifest.files):
        raise PackageError(f"{GOLDEN_FILE} is not listed in the manifest's files")
    if golden is None and require_golden:
        raise PackageError(f"the package has no golden requests ({GOLDEN_FILE})")
    seconds = None
    if local_load:
        from edgewise.runtime.package.golden import check_golden
        from edgewise.runtime.serving.model import SessionSettings, load_model

        started = time.perf_counter()
        model = load_model(
            record.name, record.version, folder, SessionSettings(), verify=False, trusted=trusted
        )
        try:
            if golden is not None:
                check_golden(model, golden)
        finally:
            del model
        seconds = time.perf_counter() - started
    return Validation(manifest, 0 if golden is None else len(golden.requests), seconds)


# ---- helpers -------------------------------------------------------------------------------------


def _check_graph(model_path: Path) -> None:
    """onnx's checker on the model, where onnx is installed: :class:`ModelLoadError` with its
    first line. Serving nodes go without onnx (it is the ``convert`` extra); there the
    onnxruntime load that follows is the check."""
    try:
        import onnx
    except ImportError:
        return
    try:
        onnx.checker.check_model(str(model_path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"ONNX checker: {first[:300]}") from None


def _remove_tree(path: Path) -> None:
    """Rename a folder out of the way (a reader never sees half of it), then delete it."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():
        path.unlink()
        return
    trash = path.parent / f"{TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(folder):
        for filename in filenames:
            fd = os.open(Path(dirpath) / filename, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _package_matches(folder: Path, record: VersionRecord) -> bool:
    """True when ``folder`` holds exactly the files of ``record`` (sizes and sha256)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        for entry in record.files:
            path = safe_join(folder, entry.path)
            if not path.is_file() or path.stat().st_size != entry.size:
                return False
            if sha256_file(path) != entry.sha256:
                return False
    except (OSError, PackageError):
        return False
    return True


def scrape_request_counts(url: str, model: str, timeout: float = 5.0) -> tuple[float, float]:
    """``(requests, errors)`` of ``model`` from a server's Prometheus endpoint (cumulative)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise Unavailable(f"server metrics at {url}: {exc}") from None
    total = errors = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "edgewise_requests":
            continue
        for sample in family.samples:
            if sample.name != "edgewise_requests_total" or sample.labels.get("model") != model:
                continue
            total += sample.value
            if sample.labels.get("code") not in OK_CODES:
                errors += sample.value
    return total, errors


# ---- the agent -----------------------------------------------------------------------------------


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        store: Store,
        client: EdgewiseClient,
        metrics: AgentMetrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.metrics = metrics if metrics is not None else AgentMetrics()
        self.rng = rng if rng is not None else random.Random()
        self.state_file = StateFile.for_repo(settings.repo, settings.model, settings.state_dir)
        self.model_dir = settings.repo / settings.model
        self.failures = 0
        self.phase = "idle"
        self.health = "unknown"
        self.detail = ""
        self.target: VersionRecord | None = None
        self._last_report = 0.0
        self._report_due = True
        self._stop = threading.Event()
        self._said: str = ""
        self._watching = False
        self._wave_seen: tuple[int, float] | None = None  # (version, when first seen)
        self._rollback_refused: tuple[int, str] | None = None  # counted once per target
        self._rolling: int | None = None  # the version this agent is rolling out (no lock held)
        # Where the rollout of (version, sha256) was when it was aborted (for its decision).
        self._abort_evidence: tuple[int, str, dict[str, object]] | None = None
        self.metrics.info.labels(settings.model, settings.alias, settings.node_id).set(1)
        # The alias's rollout policy, when it has one (docs/rollout.md).
        self.progressive = Progressive(
            client,
            store,
            settings.model,
            settings.alias,
            settings.node_id,
            lambda: settings.metrics_url,
            self.metrics.registry,
            self._wait,
            self._guard,
        )
        self.trusted: TrustedKeys | None = None
        if settings.trusted_keys is not None:
            self.trusted = TrustedKeys.load(settings.trusted_keys)
            log.info(
                "model %s: packages must be signed by one of %d trusted key(s) (%s)",
                settings.model,
                len(self.trusted),
                ", ".join(self.trusted),
            )

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the agent is stopping (reads the event of the
        moment: :meth:`run` replaces it with the caller's). During a rollout, the state file is
        read every 0.1 s meanwhile (no lock): :class:`RolloutAborted` when it was aborted."""
        if self._rolling is None:
            return self._stop.wait(seconds)
        deadline = time.monotonic() + seconds
        while True:
            self._check_abort(self._read_state(publish=False))
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self._stop.wait(min(left, 0.1)):
                return True

    def _check_abort(self, state: AgentState) -> None:
        """:class:`RolloutAborted` when the rollout this agent runs was aborted (its record says
        so, or is gone)."""
        if self._rolling is None:
            return
        rollout = state.rollout
        if rollout is None or rollout.version != self._rolling:
            raise RolloutAborted("the rollout's record is gone from the state file")
        if rollout.aborted is not None:
            raise RolloutAborted(rollout.aborted)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """The state lock around one change of the candidate's traffic, which happens only if
        the rollout was not aborted (``edgewise rollback`` takes the same lock)."""
        with self.state_file.locked():
            self._check_abort(self._read_state())
            yield

    # ---- the loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (SIGTERM in the CLI)."""
        if stop is not None:
            self._stop = stop
        self._check_repo()
        self.state_file.claim_agent()
        try:
            self._startup()
            while not self._stop.is_set():
                delay = self.cycle()
                self.metrics.next_poll.set(delay)
                self._stop.wait(delay)
        finally:
            self.state_file.release_agent()

    def run_once(self) -> bool:
        """One poll (``--once``); True when it succeeded."""
        self._check_repo()
        self.state_file.claim_agent()
        try:
            self._startup()
            self.cycle()
            return self.failures == 0
        finally:
            self.state_file.release_agent()

    def stop(self) -> None:
        self._stop.set()

    def _check_repo(self) -> None:
        """The server's repository must exist: the agent creates only its model's folder and
        its state folder inside (a typo, or a volume not mounted yet, is not a new repository)."""
        if not self.settings.repo.is_dir():
            raise EdgewiseError(
                f"model repository {self.settings.repo} does not exist (the agent never creates "
                "it: it is the server's)"
            )

    def _startup(self) -> None:
        self.model_dir.mkdir(exist_ok=True)
        for entry in self.model_dir.iterdir():
            if entry.name.startswith(TRASH_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
        state = self._read_state()
        if state.deployed is not None:
            log.info(
                "model %s: resuming; deployed version %d (last good %s)",
                self.settings.model,
                state.deployed.version,
                state.last_good.version if state.last_good else "none",
            )

    def poll_delay(self) -> float:
        jitter = self.settings.jitter
        return self.settings.interval * self.rng.uniform(1 - jitter, 1 + jitter)

    def backoff_delay(self) -> float:
        base = self.settings.backoff_initial * 2.0 ** min(self.failures - 1, 30)
        capped = min(self.settings.backoff_max, base)
        return capped * self.rng.uniform(0.5, 1.0)  # "equal jitter"

    def cycle(self) -> float:
        """One poll; returns the delay before the next one."""
        self._watching = False
        try:
            state = self._read_state()  # publishes what another process (rollback) changed
            if state.rollout is not None:  # aborted, or left by an agent that died meanwhile
                state = self._settle_rollout(state.rollout.version)
            if state.watch is not None:
                state = self._watch_step(state)
                self._watching = state.watch is not None
            record = self.store.resolve_alias(self.settings.model, self.settings.alias)
            self.metrics.store_up.set(1)
            self.target = record
            self.metrics.target.set(record.version)
            self._sync(record, state)
        except _Stopped:
            return 0.0
        except StoreUnavailable as exc:
            self.metrics.store_up.set(0)
            return self._failed("store_unavailable", exc.message, report=False)
        except StoreAuthError as exc:
            self.metrics.store_up.set(0)
            return self._failed("auth_error", exc.message, report=False)
        except ModelNotFound as exc:
            return self._failed("not_found", exc.message)
        except Unavailable as exc:
            return self._failed("server_unavailable", exc.message)
        except EdgewiseError as exc:
            return self._failed("error", exc.message)
        except _Refused as exc:
            return self._failed("error", exc.reason)
        except OSError as exc:
            return self._failed("error", f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            # A store answering garbage, or a bug: the agent logs it and carries on polling;
            # the server keeps serving what it serves.
            log.exception("model %s: unexpected error in a poll", self.settings.model)
            return self._failed("error", f"unexpected {type(exc).__name__}: {exc}")
        self.failures = 0
        self._publish_health()
        self.metrics.polls.labels("ok").inc()
        self.metrics.last_success.set(time.time())
        self._maybe_report()
        state = self._read_state()
        if state.watch is not None:
            remaining = state.watch.since + self.settings.watch_seconds - time.time()
            if remaining > 0:
                return max(0.05, min(self.poll_delay(), 1.0, remaining))
        return self.poll_delay()  # (a watch past its time cannot see: retried at each poll)

    def _failed(self, result: str, message: str, report: bool = True) -> float:
        self.failures += 1
        self.metrics.polls.labels(result).inc()
        delay = self.backoff_delay()
        if self._watching:
            delay = min(delay, 1.0)  # a switch being watched is judged on time, store or not
        self.health = "failing" if self.failures >= 3 else self.health
        self.detail = message
        self._publish_health()
        log.warning(
            "model %s: %s (failure %d in a row; next try in %.1f s; the server keeps serving "
            "what it serves)",
            self.settings.model,
            message,
            self.failures,
            delay,
        )
        if report:
            self._maybe_report()
        return delay

    def _say_once(self, message: str) -> None:
        if message != self._said:
            log.warning("model %s: %s", self.settings.model, message)
            self._said = message

    # ---- state -----------------------------------------------------------------------------------

    # The agent's gauges are set in two places only: _publish_state after every read and write
    # of the state file (which `edgewise rollback` changes too, from another process), and
    # _publish_health after every change of health or of the failure count.

    def _publish_state(self, state: AgentState) -> None:
        self.metrics.deployed.set(state.deployed.version if state.deployed else 0)
        self.metrics.last_good.set(state.last_good.version if state.last_good else 0)
        rollout = state.rollout
        running = rollout is not None and rollout.aborted is None
        self.metrics.rolling.set(rollout.version if rollout is not None and running else 0)

    def _publish_health(self) -> None:
        healthy = self.failures == 0 and self.health in ("ok", "watching")
        self.metrics.healthy.set(1 if healthy else 0)
        self.metrics.failures.set(self.failures)

    def _read_state(self, publish: bool = True) -> AgentState:
        """The state file; :class:`EdgewiseError` (never :class:`PackageError`, which refuses a
        candidate) when it cannot be read: a state-file problem fails the poll, not the
        package."""
        try:
            state = self.state_file.read()
        except PackageError as exc:
            raise EdgewiseError(f"the agent's state: {exc.message}") from None
        if publish:
            self._publish_state(state)
        return state

    def _save(self, state: AgentState) -> AgentState:
        state = replace(state, updated_at=utc_now())
        self.state_file.write(state)
        self._publish_state(state)
        self._report_due = True
        return state

    def _write_config(self, state: AgentState, extra: int | None = None) -> None:
        """Pin the last good version in ``config.json`` so a restarted server serves it."""
        pinned = state.last_good or state.deployed
        versions = {d.version for d in (state.last_good, state.deployed) if d is not None}
        if extra is not None:
            versions.add(extra)
        if not versions:
            return
        default = pinned.version if pinned else extra
        assert default is not None
        pin_versions(self.model_dir, tuple(sorted(versions)), default)

    def _deployed_manifest(self, state: AgentState) -> Manifest | None:
        candidates = [d.version for d in (state.deployed, state.last_good) if d is not None]
        if not candidates:
            candidates = list(reversed(list_versions(self.model_dir)))
        for version in candidates:
            try:
                return read_manifest(self.model_dir / str(version))
            except PackageError:
                continue
        return None

    # ---- sync ------------------------------------------------------------------------------------

    def _sync(self, record: VersionRecord, state: AgentState) -> None:
        self.phase = "idle"  # "waiting" holds only while this poll finds the node waiting
        deployed = state.deployed
        if deployed and (deployed.version, deployed.sha256) == (
            record.version,
            record.model_sha256,
        ):
            self._reconcile(state)
            if state.watch is None:
                self._set_health("ok", f"serving version {deployed.version}")
            return
        refused = state.rejection(record.version, record.model_sha256)
        if refused is not None:
            self._reconcile(state)
            self._set_health(
                "degraded",
                f"alias {self.settings.alias} names version {record.version}, refused: "
                f"{refused.reason}",
            )
            self._say_once(self.detail)
            return
        floor = state.served_floor
        if floor is not None and record.version < floor:
            if not self.settings.allow_rollback:
                self._refuse_rollback(record, floor, state)
                return
            log.warning(
                "model %s: alias %s names version %d, lower than version %d served before; "
                "deploying it (--allow-rollback)",
                self.settings.model,
                self.settings.alias,
                record.version,
                floor,
            )
        self._rollback_refused = None
        if state.watch is not None:
            return  # finish watching the current switch first
        if deployed is not None:
            try:
                waiting = self._wave_wait(record)
            except _Refused as invalid:  # an invalid stored policy refuses the version
                self._refuse(record, invalid)
                return
            if waiting:
                self.phase = "waiting"
                self._set_health("ok", f"serving version {deployed.version}; {waiting}")
                return
        self._deploy(record, state)

    def _refuse_rollback(self, record: VersionRecord, floor: int, state: AgentState) -> None:
        """Rollback protection: the alias names a version lower than one this node served.
        Nothing is downloaded or written; counted and reported once per target, and the server
        keeps (or is put back on) the deployed version."""
        reason = (
            f"alias {self.settings.alias} names version {record.version}, lower than version "
            f"{floor} this node has served: rollback protection refuses it (an explicit "
            "rollback: the agent's --allow-rollback, or edgewise rollback on the node)"
        )
        self._reconcile(state)
        self._set_health("degraded", reason)
        target = (record.version, record.model_sha256)
        if self._rollback_refused == target:
            return
        self._rollback_refused = target
        self.metrics.refusals.labels("rollback").inc()
        self._said = self.detail
        log.error("model %s: %s", self.settings.model, reason)
        self._record_refusal(
            record, state, "rollback protection", reason, {"highest_served": floor}
        )
        self._maybe_report(force=True)

    def _record_refusal(
        self,
        record: VersionRecord,
        state: AgentState,
        what: str,
        reason: str,
        evidence: dict[str, object],
    ) -> None:
        """A refusal in the store's decision record (``edgewise models show``), beside the
        rollout verdicts; a store that cannot take it is logged (the refusal stands)."""
        decision = Decision(
            self.settings.node_id,
            record.name,
            self.settings.alias,
            record.version,
            state.deployed.version if state.deployed else 0,
            0,
            what,
            "refused",
            (reason,),
            {**evidence, "sha256": record.model_sha256},
            utc_now(),
        )
        key = f"{DECISION_PREFIX}{self.settings.node_id}.{record.version}.refused"
        try:
            self.store.set_model_tag(
                record.name, key, json.dumps(decision.to_json(), sort_keys=True)
            )
        except EdgewiseError as exc:
            log.error("model %s: recording a refusal: %s", record.name, exc)

    def _wave_wait(self, record: VersionRecord) -> str:
        """Why this node waits for the nodes of earlier fleet waves ("" when it may go)."""
        try:
            policy = read_policy(self.store, self.settings.model, self.settings.alias)
        except InvalidInput as exc:
            raise _Refused(exc.message, kind="invalid") from None
        if policy is None or not policy.waves:
            return ""
        now = time.time()
        if self._wave_seen is None or self._wave_seen[0] != record.version:
            self._wave_seen = (record.version, now)
        reports = self.store.node_reports(self.settings.model)
        return wave_wait(
            self.settings.node_id,
            reports,
            record.version,
            record.model_sha256,
            policy.waves,
            now,
            self._wave_seen[1],
            _wave_fresh_seconds(self.settings),
        )

    def _set_health(self, health: str, detail: str) -> None:
        if (health, detail) != (self.health, self.detail):
            self._report_due = True
        self.health, self.detail = health, detail
        self._publish_health()

    def _reconcile(self, state: AgentState) -> None:
        """Make the server's default the deployed version again if it drifted (e.g. after a
        server restart mid-watch)."""
        if state.deployed is None or self._default_is(state.deployed.version):
            return
        # Checked again under the lock: the state read before it may predate an
        # `edgewise rollback` that switched the default meanwhile (not to be switched back).
        with self.state_file.locked():
            state = self._read_state()
            if state.deployed is None:
                return
            name, version = self.settings.model, state.deployed.version
            statuses = [s for s in self.client.repository_index() if s.name == name]
            default = next((s for s in statuses if s.is_default and s.state == "READY"), None)
            if default is not None and default.version == str(version):
                return
            log.warning(
                "model %s: the server's default is %s, not version %d; switching it back",
                name,
                default.version if default else "nothing",
                version,
            )
            self._load(version, make_default=True)

    def _default_is(self, version: int) -> bool:
        """The server's default version of the model is ``version`` (and ready)."""
        name = self.settings.model
        return any(
            s.name == name and s.is_default and s.state == "READY" and s.version == str(version)
            for s in self.client.repository_index()
        )

    def _load(self, version: int, make_default: bool) -> None:
        """Load ``version`` on the server; ``make_default``: its default until it restarts, not
        in ``config.json``. That file pins the last good version and only the agent writes it
        (:meth:`_write_config`), so a server restarted while a version is under watch serves
        the last good one."""
        try:
            self.client.load_model(
                self.settings.model,
                str(version),
                make_default=make_default,
                timeout=self.settings.load_timeout,
                transient_default=make_default,
            )
        except ServerError as exc:
            if exc.status.name in ("FAILED_PRECONDITION", "NOT_FOUND", "INVALID_ARGUMENT"):
                raise _Refused(
                    f"the server could not load it: {exc.details}", kind="load"
                ) from None
            raise Unavailable(f"server {self.settings.server}: {exc.message}") from None

    def _wait_ready(self, version: int) -> None:
        deadline = time.monotonic() + self.settings.load_timeout
        delay = 0.02
        while not self.client.model_ready(self.settings.model, str(version)):
            if time.monotonic() > deadline:
                raise _Refused(
                    f"not ready on the server {self.settings.load_timeout:g} s after loading",
                    kind="load",
                )
            if self._wait(delay):
                raise _Stopped()
            delay = min(delay * 2, 0.5)

    def _golden_on_server(self, folder: Path, version: int) -> int:
        golden = read_golden(folder)
        if golden is None:
            return 0
        for index, request in enumerate(golden.requests):
            try:
                result = self.client.infer(
                    self.settings.model,
                    request.inputs,
                    version=str(version),
                    outputs=list(request.outputs),
                )
            except ServerError as exc:
                raise _Refused(
                    f"golden request {index} failed on the server: {exc.message}", kind="golden"
                ) from None
            problems = compare_outputs(request.outputs, result.outputs, golden.atol, golden.rtol)
            if problems:
                raise _Refused(
                    f"golden request {index} on the server: {problems[0]}", kind="golden"
                )
        return len(golden.requests)

    def _download(self, record: VersionRecord, staging: Path) -> None:
        started = time.perf_counter()
        transferred = 0

        def counted(count: int) -> None:
            nonlocal transferred
            transferred += count
            self.metrics.download_bytes.inc(count)
            if self._stop.is_set():
                raise _Stopped()

        for attempt in range(1, self.settings.download_attempts + 1):
            try:
                for entry in record.files:
                    result = fetch_file(self.store, record, entry, staging, counted)
                    if result.resumed_from:
                        log.info(
                            "model %s version %d: %s resumed at byte %d",
                            record.name,
                            record.version,
                            entry.path,
                            result.resumed_from,
                        )
                break
            except StoreUnavailable as exc:
                if attempt == self.settings.download_attempts:
                    raise
                delay = min(5.0, 0.2 * 2**attempt) * self.rng.uniform(0.5, 1.0)
                log.warning(
                    "model %s version %d: download attempt %d failed (%s); resuming in %.1f s",
                    record.name,
                    record.version,
                    attempt,
                    exc.message,
                    delay,
                )
                if self._stop.wait(delay):
                    raise _Stopped() from None
        seconds = time.perf_counter() - started
        self.metrics.download_seconds.inc(seconds)
        if transferred:
            log.info(
                "model %s version %d: downloaded %d bytes in %.2f s (%.1f MB/s)",
                record.name,
                record.version,
                transferred,
                seconds,
                transferred / max(seconds, 1e-9) / 1e6,
            )

    def _deploy(self, record: VersionRecord, state: AgentState) -> None:
        name, version = record.name, record.version
        if name != self.settings.model:
            raise PackageError(
                f"the store answered for model {name!r}, not {self.settings.model!r}"
            )
        log.info(
            "model %s: alias %s names version %d (sha256 %s…); deployed: %s",
            name,
            self.settings.alias,
            version,
            record.model_sha256[:12],
            f"version {state.deployed.version}" if state.deployed else "nothing",
        )
        final = self.model_dir / str(version)
        staging = self.model_dir / f"{INCOMING_PREFIX}{version}-{record.model_sha256[:12]}"
        try:
            check_size_cap(record, self.settings.max_bytes)
            for entry in record.files:
                safe_join(staging, entry.path)  # refuses traversal before anything is written
            installed = _package_matches(final, record)
            folder = final if installed else staging
            if not installed:
                if staging.is_symlink():
                    raise PackageError(f"{staging}: is a symbolic link")
                staging.mkdir(exist_ok=True)
                self.phase = "downloading"
                self._download(record, staging)
            self.phase = "validating"
            validation = validate_package(
                folder,
                record,
                self._deployed_manifest(state),
                local_load=self.settings.local_load,
                require_golden=self.settings.require_golden,
                trusted=self.trusted,
            )
            log.info(
                "model %s version %d: valid (%d golden request(s) %s)",
                name,
                version,
                validation.golden_requests,
                "passed locally" if validation.local_load_seconds is not None else "to check",
            )
            # The state lock is held for the state's changes only, never across the load,
            # the golden requests or the steps' waits: the rollout is recorded in the state
            # (edgewise rollback aborts it there) and checked at each change of traffic.
            with self.state_file.locked():
                state = self._read_state()
                self.phase = "installing"
                if not installed:
                    self._write_config(state)
                    _fsync_tree(staging)
                    if final.exists() or final.is_symlink():
                        _remove_tree(final)  # same number, different content: replaced
                    os.rename(staging, final)
                    fsync_dir(self.model_dir)
                self._write_config(state, extra=version)
                previous = state.deployed.version if state.deployed else None
                rollout = Rollout(version, record.model_sha256, previous, time.time())
                state = self._save(replace(state, rollout=rollout))
            self._rolling = version
            self.phase = "loading"
            self._load(version, make_default=False)
            self._wait_ready(version)
            checked = self._golden_on_server(final, version)
            policy = self._rollout_policy(previous, version)
            rolled = policy is not None and previous is not None and bool(policy.steps)
            if policy is not None and previous is not None and rolled:
                self.phase = "rollout"
                try:
                    failed = self.progressive.run(policy, previous, version)
                except RolloutStopped:
                    raise _Stopped() from None  # no verdict, nothing refused
                if failed:
                    self.metrics.rollbacks.labels("rollout").inc()
                    raise _Refused(failed, kind="rollout")
            with self.state_file.locked():
                state = self._read_state()
                self._check_abort(state)  # a rollback meanwhile: no switch
                try:
                    baseline, blind = self._baseline()
                    self.phase = "switching"
                    self._load(version, make_default=True)
                    if policy is not None and previous is not None and rolled:
                        self.progressive.finish(policy, previous, version)
                except BaseException:
                    if rolled and previous is not None:  # no canary route outlives the switch
                        self.progressive.withdraw(previous, version)
                    raise
                self._rolling = None
                now_iso = utc_now()
                item = Deployed(version, record.model_sha256, now_iso)
                state = replace(state.serving(item), rollout=None)
                if self.settings.watch_seconds > 0 and previous is not None:
                    state = replace(
                        state,
                        watch=Watch(
                            version,
                            record.model_sha256,
                            previous,
                            time.time(),
                            baseline[0] if baseline else None,
                            baseline[1] if baseline else None,
                        ),
                    )
                    state = self._save(state)
                    if blind:
                        self._set_blind(version, state, blind)
                    else:
                        self._set_health("watching", f"watching version {version} after the switch")
                else:
                    state = self._promote_locked(state, item)
            self.metrics.deploys.labels("success").inc()
            log.info(
                "model %s: version %d is the default now (%d golden request(s) passed on the "
                "server)",
                name,
                version,
                checked,
            )
        except RolloutAborted:
            self._abort_evidence = (version, record.model_sha256, self._where())
        except _Refused as refused:
            self._refuse(record, refused)
        except ArtifactCorrupt as exc:
            self._refuse(
                record, _Refused(exc.message, self.settings.corrupt_retry_seconds, "corrupt")
            )
        except (PackageError, ModelLoadError, ResourceExhausted, InvalidInput) as exc:
            if isinstance(exc, SignatureError):
                self.metrics.refusals.labels(f"signature_{exc.reason}").inc()
                self._record_refusal(
                    record, state, "signature", exc.message, {"signature": exc.reason}
                )
            self._refuse(record, _Refused(exc.message, kind="invalid"))
        finally:
            pending = sys.exc_info()[1]
            where = self._where()
            self._rolling = None
            self.phase = "idle"
            try:
                if self._read_state(publish=False).rollout is not None:
                    why = (
                        "the agent stopped"
                        if isinstance(pending, _Stopped)
                        else (f"{type(pending).__name__}: {pending}" if pending else "no verdict")
                    )
                    self._settle_rollout(version, why, where)
            except (EdgewiseError, OSError) as exc:
                if pending is None:
                    raise
                # The exception in flight is what the poll reports; this one is logged.
                log.error(
                    "model %s: ending the rollout of version %d: %s",
                    self.settings.model,
                    version,
                    exc.message if isinstance(exc, EdgewiseError) else exc,
                )

    def _where(self) -> dict[str, object]:
        """Where the rollout this agent runs is (its phase, its step): evidence for its
        decision."""
        where: dict[str, object] = {"phase": self.phase}
        reached = self.progressive.reached if self.phase == "rollout" else None
        if reached is not None:
            index, description, began = reached
            where.update(
                step=index + 1,
                step_description=description,
                step_seconds=round(time.time() - began, 3),
            )
        return where

    def _rollout_policy(self, previous: int | None, version: int) -> RolloutPolicy | None:
        """The alias's rollout policy when ``version`` replaces a served one (None: the switch
        is at once); a stored policy that is invalid refuses the version."""
        if previous is None or previous == version:
            return None
        try:
            return read_policy(self.store, self.settings.model, self.settings.alias)
        except InvalidInput as exc:
            raise _Refused(exc.message, kind="invalid") from None

    def _refuse(self, record: VersionRecord, refused: _Refused) -> None:
        name, version = record.name, record.version
        with self.state_file.locked():
            state = self._read_state()
            rollout = state.rollout
            ours = rollout is not None and rollout.version == version
            aborted = ours and rollout is not None and rollout.aborted is not None
            if aborted and refused.kind != "rollout":
                # The abort came first: it is the outcome (settled in _deploy's finally).
                log.info(
                    "model %s: version %d: %s (after its rollout was aborted)",
                    name,
                    version,
                    refused.reason,
                )
                return
            if ours:  # a failed step's verdict came first: the refusal is the outcome
                state = replace(state, rollout=None)
            serving = state.deployed is not None and state.deployed.version == version
            if refused.kind in ("load", "golden", "rollout") and not serving:
                with contextlib.suppress(EdgewiseError):
                    self.client.unload_model(name, str(version))
            final = self.model_dir / str(version)
            keep_final = serving or any(d.version == version for d in state.good)
            if not keep_final:
                _remove_tree(final)
            for entry in self.model_dir.iterdir():
                if (
                    entry.name.startswith(f"{INCOMING_PREFIX}{version}-")
                    and refused.kind != "corrupt"
                ):
                    _remove_tree(entry)
            retry_at = None if refused.retry_after is None else time.time() + refused.retry_after
            state = state.reject(
                Rejection(version, record.model_sha256, refused.reason, utc_now(), retry_at)
            )
            state = self._save(state)
            self._write_config(state)
        self.metrics.deploys.labels("rejected").inc()
        self._set_health("degraded", f"version {version} refused: {refused.reason}")
        self._said = self.detail
        log.error(
            "model %s: version %d refused (%s): %s; %s keeps serving",
            name,
            version,
            refused.kind,
            refused.reason,
            f"version {state.deployed.version}" if state.deployed else "the server",
        )
        self._maybe_report(force=True)

    def _settle_rollout(
        self,
        version: int,
        why: str = "left by an agent that stopped or died",
        where: dict[str, object] | None = None,
    ) -> AgentState:
        """End the rollout of ``version`` recorded in the state while none runs. Either way the
        candidate is taken out of traffic first (no split, no shadow, ``canary`` names the
        stable version), and only once the server took that is it unloaded: no client request
        meets an unloaded version. An aborted one (``edgewise rollback``): its decision goes to
        the store with its evidence (a store that cannot take it leaves the record, tried again
        at the next poll), counted (``edgewise_agent_rollbacks{reason}``,
        ``edgewise_agent_deploys{rolled_back}``), the candidate unloaded and refused. Any other
        (the agent stopped, failed or died mid-way: ``why``): cleared, the candidate unloaded
        unless the alias names it or the server serves it by default, unpinned, its
        ``withdrawn`` decision recorded and counted; not refused."""
        with self.state_file.locked():
            state = self._read_state()
            rollout = state.rollout
            if rollout is None or rollout.version != version:
                return state
            stable = rollout.stable
            if rollout.aborted is None:
                return self._withdrawn_locked(state, rollout, why, where or {})
            if stable is not None and not self.progressive.withdraw(stable, version):
                return state  # the server did not take it: unloading would fail its clients
            reason = rollout.aborted
            evidence: dict[str, object] = {
                "by": "edgewise rollback",
                "aborted_at": rollout.aborted_at,
                "rollout_seconds": round(time.time() - rollout.since, 3),
                "stable": stable,
                "sha256": rollout.sha256,
            }
            kept = self._abort_evidence
            if kept is not None and kept[:2] == (version, rollout.sha256):
                evidence.update(kept[2])
            if not self.progressive.abort(stable or 0, version, reason, evidence):
                return state  # the store did not take the decision: tried again next poll
            self._abort_evidence = None
            serving = state.deployed is not None and state.deployed.version == version
            if not serving:
                with contextlib.suppress(EdgewiseError):
                    self.client.unload_model(self.settings.model, str(version))
                if not any(d.version == version for d in state.good):
                    _remove_tree(self.model_dir / str(version))
            if state.rejection(version, rollout.sha256) is None:
                state = state.reject(Rejection(version, rollout.sha256, reason, utc_now()))
            # Counted with the state's change (a reader of the state sees the counts).
            self.metrics.rollbacks.labels(reason).inc()
            self.metrics.deploys.labels("rolled_back").inc()
            self._set_health(
                "degraded",
                f"version {version} rolled back ({reason}): its rollout was aborted; "
                f"version {stable} serves",
            )
            state = self._save(replace(state, rollout=None))
            self._write_config(state)
        self._said = self.detail
        log.error("model %s: %s", self.settings.model, self.detail)
        self._maybe_report(force=True)
        return state

    def _withdrawn_locked(
        self, state: AgentState, rollout: Rollout, why: str, where: dict[str, object]
    ) -> AgentState:
        """A rollout that ended with no verdict (the state lock is held): see
        :meth:`_settle_rollout`."""
        version, stable = rollout.version, rollout.stable
        target = self.target
        wanted = (
            target is not None
            and target.version == version
            and target.model_sha256 == rollout.sha256
        )
        serving = state.deployed is not None and state.deployed.version == version
        if stable is not None and not self.progressive.withdraw(stable, version):
            return state  # the server did not take it: tried again at the next poll
        unload = stable is not None and not wanted and not serving
        if unload:
            try:
                unload = not self._default_is(version)  # (a switch that failed half-way)
            except EdgewiseError:
                unload = False
            if unload:
                with contextlib.suppress(EdgewiseError):
                    self.client.unload_model(self.settings.model, str(version))
        state = self._save(replace(state, rollout=None))
        self._write_config(state, extra=None if unload else version)
        evidence: dict[str, object] = {
            "by": "agent",
            "rollout_seconds": round(time.time() - rollout.since, 3),
            "sha256": rollout.sha256,
            "unloaded": unload,
            **where,
        }
        if stable is not None:
            self.progressive.withdrawn(stable, version, why, evidence)
        log.warning(
            "model %s: the rollout of version %d ended with no verdict (%s): out of traffic%s; "
            "not refused",
            self.settings.model,
            version,
            why,
            ", unloaded and unpinned" if unload else "",
        )
        return state

    # ---- after the switch ------------------------------------------------------------------------

    def _request_counts(self) -> tuple[float, float]:
        """The server's ``(requests, errors)`` of the model; :class:`Unavailable` when they
        cannot be read."""
        url = self.settings.metrics_url
        if url is None:
            raise Unavailable(
                "the server's metrics port is not known (EDGEWISE_METRICS_PORT is 0 or -1): "
                "give --server-metrics"
            )
        return scrape_request_counts(url, self.settings.model)

    def _baseline(self) -> tuple[tuple[float, float] | None, str]:
        """The counts at the switch, or why they cannot be read."""
        try:
            return self._request_counts(), ""
        except Unavailable as exc:
            return None, exc.message

    def _set_blind(self, version: int, state: AgentState, why: str) -> None:
        """A watch that cannot see: it judges nothing and promotes nothing; unhealthy."""
        last_good = state.last_good.version if state.last_good else None
        self._set_health(
            "degraded",
            f"cannot see the server's metrics ({why}): version {version} stays under watch, "
            f"version {last_good} stays the last good one",
        )
        self._say_once(self.detail)

    def _watch_step(self, state: AgentState) -> AgentState:
        """Judge the version under watch: roll it back on errors, promote it once it was seen
        for ``watch_seconds``. Its time starts when the agent can see the server's metrics."""
        watch = state.watch
        assert watch is not None
        counts, blind = self._baseline()
        if counts is None:
            self._set_blind(watch.version, state, blind)
            return state
        if watch.baseline_total is None or watch.baseline_errors is None:
            return self._start_watch(watch, counts)
        total = counts[0] - watch.baseline_total
        errors = counts[1] - watch.baseline_errors
        base_total, base_errors = watch.baseline_total, watch.baseline_errors
        before = base_errors / base_total if base_total > 0 else 0.0
        if total >= self.settings.min_requests and total > 0:
            rate = errors / total
            if rate - before > self.settings.max_error_rate:
                reason = (
                    f"error rate {rate:.1%} over {int(total)} requests since the switch "
                    f"(before: {before:.1%}; allowed: +{self.settings.max_error_rate:.1%})"
                )
                return self._rollback(watch.version, watch.previous, reason, "error_rate")
        self._set_health("watching", f"watching version {watch.version} after the switch")
        if time.time() - watch.since >= self.settings.watch_seconds:
            with self.state_file.locked():
                state = self._read_state()
                if state.watch is None or state.watch.version != watch.version:
                    return state
                state = self._promote_locked(
                    state, Deployed(watch.version, watch.sha256, utc_now())
                )
        return state

    def _start_watch(self, watch: Watch, counts: tuple[float, float]) -> AgentState:
        """The switch's counts could not be read: the watch starts now, from these."""
        with self.state_file.locked():
            state = self._read_state()
            if state.watch is None or state.watch.version != watch.version:
                return state
            started = replace(
                watch, since=time.time(), baseline_total=counts[0], baseline_errors=counts[1]
            )
            state = self._save(replace(state, watch=started))
        self._set_health("watching", f"watching version {watch.version} after the switch")
        log.info(
            "model %s: the server's metrics can be read again; watching version %d from now",
            self.settings.model,
            watch.version,
        )
        return state

    def _promote_locked(self, state: AgentState, item: Deployed) -> AgentState:
        """Make ``item`` the last good version (the state lock is held)."""
        state = replace(state.with_good(item).serving(item), watch=None)
        state = self._save(state)
        self._write_config(state)
        name = self.settings.model
        for status in self.client.repository_index():
            ours = status.name == name and status.version != str(item.version)
            if ours and status.state == "READY":
                with contextlib.suppress(EdgewiseError):
                    self.client.unload_model(name, status.version)
        self._prune(state)
        self._set_health("ok", f"serving version {item.version}")
        log.info("model %s: version %d is the last good version (pinned)", name, item.version)
        return state

    def _prune(self, state: AgentState) -> None:
        protected = {d.version for d in (state.deployed, state.last_good) if d is not None}
        if state.watch is not None:
            protected.add(state.watch.version)
        keep = set(protected)
        for item in reversed(state.good):
            if len(keep) >= self.settings.keep:
                break
            keep.add(item.version)
        for version in list_versions(self.model_dir):
            if version not in keep:
                log.info("model %s: removing version %d from disk", self.settings.model, version)
                _remove_tree(self.model_dir / str(version))
        target = self.target
        for entry in self.model_dir.iterdir():
            if not entry.name.startswith(INCOMING_PREFIX):
                continue
            current = target is not None and entry.name == (
                f"{INCOMING_PREFIX}{target.version}-{target.model_sha256[:12]}"
            )
            if not current:
                _remove_tree(entry)

    def _rollback(self, bad: int, previous: int | None, reason: str, why: str) -> AgentState:
        with self.state_file.locked():
            state = self._read_state()
            state = rollback_locked(
                self.client,
                self.state_file,
                self.model_dir,
                state,
                bad,
                previous,
                reason,
                self.settings.load_timeout,
            )
            self._publish_state(state)
        self.metrics.rollbacks.labels(why).inc()
        self.metrics.deploys.labels("rolled_back").inc()
        self._set_health("degraded", f"version {bad} rolled back: {reason}")
        self._said = self.detail
        log.error("model %s: rolled back from version %d: %s", self.settings.model, bad, reason)
        self._maybe_report(force=True)
        return state

    # ---- reporting -------------------------------------------------------------------------------

    def _maybe_report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (
            force or self._report_due or now - self._last_report >= self.settings.report_interval
        ):
            return
        state = self._read_state()
        report = NodeReport(
            node=self.settings.node_id,
            model=self.settings.model,
            version=state.deployed.version if state.deployed else None,
            sha256=state.deployed.sha256 if state.deployed else "",
            health=self.health,
            state="watching" if state.watch else self.phase,
            detail=self.detail,
            target_version=self.target.version if self.target else None,
            updated_at=utc_now(),
        )
        try:
            self.store.report_node(report)
        except EdgewiseError as exc:
            log.warning(
                "model %s: cannot report to the store: %s", self.settings.model, exc.message
            )
            return
        self._last_report = now
        self._report_due = False


def _wave_fresh_seconds(settings: AgentSettings) -> float:
    """How old a node's report may be and the node still count for a wave: five of the longer of
    the poll and report intervals (the fleet shares them), at least a minute."""
    every = max(settings.interval * (1.0 + settings.jitter), settings.report_interval)
    return max(60.0, 5.0 * every)


def _pick_previous(state: AgentState, current: int) -> int | None:
    """The good version that came before ``current`` (never a refused one)."""
    if state.watch is not None and state.watch.version == current and state.watch.previous:
        return state.watch.previous
    order = [d.version for d in state.good]
    earlier = order[: order.index(current)] if current in order else order
    for item in reversed(state.good):
        if item.version in earlier and state.rejection(item.version, item.sha256) is None:
            return item.version
    return None


def _repoint_labels(client: EdgewiseClient, name: str, bad: int, target: int) -> None:
    """The rollout labels ("stable", "canary") that name ``bad``, unloaded by a rollback, name
    ``target`` afterwards (errors logged: the rollback stands; a label naming another version,
    or none, is left as it is)."""
    try:
        labels = dict(client.get_rollout(name).labels)
        for label in ("stable", "canary"):
            if labels.get(label) == str(bad):
                client.set_version_label(name, label, str(target))
    except EdgewiseError as exc:
        log.error("model %s: pointing the rollout labels at version %d: %s", name, target, exc)


def rollback_locked(
    client: EdgewiseClient,
    state_file: StateFile,
    model_dir: Path,
    state: AgentState,
    bad: int,
    previous: int | None,
    reason: str,
    load_timeout: float = 120.0,
) -> AgentState:
    """Switch the server back to ``previous`` (default: the last good version before ``bad``),
    refuse ``bad`` and pin ``previous``. The state lock must be held."""
    name = state.model
    target = previous if previous is not None else _pick_previous(state, bad)
    if target is None:
        raise EdgewiseError(f"model {name!r}: no earlier good version to roll back to")
    if target == bad:
        raise InvalidInput(f"model {name!r}: version {bad} is the one being rolled back")
    try:
        client.load_model(name, str(target), make_default=True, timeout=load_timeout)
    except ServerError as exc:
        raise EdgewiseError(
            f"model {name!r}: cannot roll back to version {target}: {exc.message}"
        ) from None
    with contextlib.suppress(EdgewiseError):
        client.unload_model(name, str(bad))
    _repoint_labels(client, name, bad, target)
    sha = ""
    for item in (*state.good, state.deployed, state.last_good):
        if item is not None and item.version == target:
            sha = item.sha256
    bad_sha = ""
    for candidate in (state.deployed, state.watch):
        if candidate is not None and candidate.version == bad:
            bad_sha = candidate.sha256
    good_item = Deployed(target, sha, utc_now())
    state = replace(state, deployed=good_item, watch=None)
    if state.last_good is None or state.last_good.version == bad:
        state = replace(state, last_good=good_item)
    state = state.reject(Rejection(bad, bad_sha, reason, utc_now(), None))
    state = replace(state, updated_at=utc_now())
    state_file.write(state)
    if model_dir.is_dir():
        pin_versions(model_dir, (target,), target)
    return state


def abort_rollout_locked(
    client: EdgewiseClient, state_file: StateFile, state: AgentState, reason: str
) -> AgentState:
    """Abort the rollout the state records (the state lock must be held): the candidate is
    refused with ``reason`` and marked aborted in the state (the agent, at its next check of
    the rollout, ends it: its decision, its metrics, the unload), then taken out of traffic at
    once (no split, no shadow, ``canary`` names the stable version; the default never left
    it). Aborting an aborted rollout takes it out of traffic again and changes nothing else.
    :class:`EdgewiseError` when the server cannot be reached for that (the abort stands: the
    agent takes the candidate out of traffic itself)."""
    rollout = state.rollout
    if rollout is None or rollout.stable is None:
        raise InvalidInput(f"model {state.model!r}: no rollout to abort")
    name = state.model
    if rollout.aborted is None:
        at = utc_now()
        state = state.reject(Rejection(rollout.version, rollout.sha256, reason, at, None))
        aborted = replace(rollout, aborted=reason, aborted_at=at)
        state = replace(state, rollout=aborted, updated_at=at)
        state_file.write(state)
    undo: list[tuple[Callable[..., object], tuple[object, ...]]] = [
        (client.set_traffic_split, (name, [])),
        (client.set_shadow, (name, "")),
        (client.set_version_label, (name, "canary", str(rollout.stable))),
    ]
    for call, args in undo:
        try:
            call(*args)
        except EdgewiseError as exc:
            raise EdgewiseError(
                f"model {name!r}: the rollout of version {rollout.version} is aborted, but the "
                f"server could not take it out of traffic ({exc.message}); the agent does at "
                "its next check"
            ) from None
    return state


def pin_versions(model_dir: Path, versions: tuple[int, ...], default: int) -> None:
    """Pin ``config.json``'s ``version_policy`` (these versions) and ``default_version``,
    keeping every other section as it is (monitoring, capture, ...: what a package signature
    covers, so they must not change under a signed version). A config.json that cannot be read
    is replaced by the pins alone (logged)."""
    path = model_dir / MODEL_CONFIG_FILE
    sections: dict[str, object] = {}
    if path.exists() or path.is_symlink():
        try:
            data = json.loads(path.read_bytes())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            sections = data
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            log.warning("%s: unreadable (%s); writing the version pins alone", path, exc)
    pins = ModelConfig(
        VersionPolicy(latest=None, specific=versions), default_version=default
    ).to_json()
    write_text_atomic(path, json.dumps({**sections, **pins}, indent=2) + "\n")


def _refuse_other_target(name: str, state: AgentState, to: int | None) -> None:
    """While a rollout runs, a rollback aborts it and goes back to its stable version: ``--to``
    naming another is refused (:class:`EdgewiseError`, nothing changed)."""
    rollout = state.rollout
    if rollout is None or rollout.stable is None or to is None or to == rollout.stable:
        return
    raise EdgewiseError(
        f"model {name!r}: version {rollout.version} is being rolled out; a rollback aborts it "
        f"and goes back to the stable version {rollout.stable} (--to {to} is another)"
    )


def rollback(
    repo: Path,
    name: str,
    client: EdgewiseClient,
    to: int | None = None,
    state_dir: Path | None = None,
    reason: str = "rolled back by hand",
) -> tuple[int, int]:
    """``edgewise rollback``: from the deployed version to ``to`` (default: the last good one
    before it). Returns ``(from, to)``. While a rollout runs (a candidate on its way, not yet
    the default) the candidate is what goes back: the rollout is aborted (:func:`abort_rollout`)
    and ``to``, if given, must be the stable version."""
    validate_model_name(name)
    state_file = StateFile.for_repo(repo, name, state_dir)
    # Refused before the lock, which would create the state folder and its lock file.
    first = state_file.read()
    _refuse_other_target(name, first, to)
    if first.deployed is None:
        raise EdgewiseError(
            f"model {name!r}: the agent's state ({state_file.path}) records no deployed version"
        )
    if to is not None and to not in list_versions(repo / name):
        raise EdgewiseError(f"model {name!r}: version {to} is not on disk in {repo / name}")
    with state_file.locked():
        state = state_file.read()
        _refuse_other_target(name, state, to)  # (a rollout may have begun since the read)
        rollout = state.rollout
        if rollout is not None and rollout.stable is not None and to in (None, rollout.stable):
            abort_rollout_locked(client, state_file, state, "manual")
            return rollout.version, rollout.stable
        if state.deployed is None:  # (only a state file that vanished since gets here)
            raise EdgewiseError(f"model {name!r}: the agent's state records no deployed version")
        bad = state.deployed.version
        state = rollback_locked(client, state_file, repo / name, state, bad, to, reason)
    assert state.deployed is not None
    return bad, state.deployed.version
