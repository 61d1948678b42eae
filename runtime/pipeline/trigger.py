"""Runs started by alerts and schedules: at most one at a time, and none within a cooldown of
the last start, so a flapping alert cannot start a storm of runs.

``edgewise serve --alert-command "edgewise pipeline trigger PIPELINE.toml"`` hands each drift or
quality alert (JSON on standard input) to :func:`fire`; a schedule (cron, a systemd timer, a
Kubernetes CronJob) runs the same verb with ``--foreground``. State lives in a folder (default
``<workdir>/trigger``):

``run.lock``
    the run in progress: created with ``O_CREAT | O_EXCL`` (one creator wins), holding the pid
    of the process running the pipeline and when it started. A lock whose process is gone
    (killed, crashed) or that is older than ``stale_after_s`` is stale: the next trigger removes
    it (and says so) before it decides.
``state.json``
    when the last run started, how many runs were started and how many alerts were declined
    (cooldown, running, another model's alert), written atomically.
``.guard``
    an ``flock`` held while a trigger reads the lock and the state, decides, and takes the lock,
    so two alerts arriving together cannot both see a stale lock and both start a run.

:func:`decide` is the whole policy, a pure function of the time, the lock and the state.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime._process import pid_alive
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "ALERT_KINDS",
    "Decision",
    "LockInfo",
    "Trigger",
    "TriggerConfig",
    "TriggerState",
    "decide",
    "pid_alive",
]

ALERT_KINDS: Final = ("data_drift", "quality_drift")
"""The alert kinds ``edgewise serve`` emits (runtime/serving/monitor.py, quality.py)."""
LOCK_FILE: Final = "run.lock"
STATE_FILE: Final = "state.json"
GUARD_FILE: Final = ".guard"
DEFAULT_COOLDOWN_S: Final = 900.0
DEFAULT_STALE_AFTER_S: Final = 6 * 3600.0


class Decision(enum.Enum):
    START = "start"  # no run in progress, cooldown over: a run starts
    RUNNING = "running"  # a run is in progress: declined
    COOLDOWN = "cooldown"  # the last run started less than the cooldown ago: declined
    IGNORED = "ignored"  # an alert this trigger does not take (kind or model): declined


@dataclass(frozen=True)
class TriggerConfig:
    cooldown_s: float = DEFAULT_COOLDOWN_S
    stale_after_s: float = DEFAULT_STALE_AFTER_S
    kinds: tuple[str, ...] = ()  # alert kinds that start a run (empty: any)
    model: str = ""  # an alert naming another model is ignored

    def __post_init__(self) -> None:
        for name in ("cooldown_s", "stale_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0):
                raise InvalidInput(f"trigger {name}: expected a number >= 0, got {value!r}")
        unknown = [k for k in self.kinds if k not in ALERT_KINDS]
        if unknown:
            raise InvalidInput(
                f"trigger kinds: unknown alert kind {unknown[0]!r} "
                f"(serve emits {', '.join(ALERT_KINDS)})"
            )


@dataclass(frozen=True)
class LockInfo:
    pid: int
    started: float


@dataclass
class TriggerState:
    last_started: float | None = None
    started: int = 0
    declined: dict[str, int] = field(default_factory=dict)
    stale_locks_removed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "last_started": self.last_started,
            "started": self.started,
            "declined": dict(self.declined),
            "stale_locks_removed": self.stale_locks_removed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TriggerState:
        last = data.get("last_started")
        return cls(
            last_started=None if last is None else float(last),
            started=int(data.get("started", 0)),
            declined={str(k): int(v) for k, v in dict(data.get("declined", {})).items()},
            stale_locks_removed=int(data.get("stale_locks_removed", 0)),
        )


def decide(
    now: float,
    lock: LockInfo | None,
    state: TriggerState,
    config: TriggerConfig,
    alert: Mapping[str, Any] | None,
) -> Decision:
    """The policy: ignore an alert of another kind or model; decline while a (live) run holds
    the lock or within the cooldown of the last start; else start. ``lock`` is a live lock
    (stale ones are removed before deciding); ``alert`` None is a scheduled start."""
    if alert is not None:
        kind = str(alert.get("kind", ""))
        if config.kinds and kind not in config.kinds:
            return Decision.IGNORED
        model = alert.get("model")
        if config.model and model is not None and str(model) != config.model:
            return Decision.IGNORED
    if lock is not None:
        return Decision.RUNNING
    if state.last_started is not None and now - state.last_started < config.cooldown_s:
        return Decision.COOLDOWN
    return Decision.START


class Trigger:
    """The file-backed trigger (module docstring). ``clock`` and ``alive`` are for tests."""

    def __init__(
        self,
        folder: Path,
        config: TriggerConfig,
        *,
        clock: Callable[[], float] = time.time,
        alive: Callable[[int], bool] = pid_alive,
    ) -> None:
        self.folder = folder
        self.config = config
        self.clock = clock
        self.alive = alive
        self.lock_path = folder / LOCK_FILE
        self.state_path = folder / STATE_FILE
        self.notes: list[str] = []  # what the last call did besides deciding (stale locks)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / GUARD_FILE).open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def read_lock(self) -> LockInfo | None:
        try:
            data = json.loads(self.lock_path.read_text(encoding="utf-8"))
            return LockInfo(int(data["pid"]), float(data["started"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            # garbage (every writer holds the guard, so no reader sees a lock half-written):
            # no process owns it, it is stale
            return LockInfo(-1, 0.0)

    def read_state(self) -> TriggerState:
        try:
            return TriggerState.from_json(json.loads(self.state_path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return TriggerState()
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"trigger state {self.state_path}: unreadable: {exc}") from None

    def _live_lock(self, now: float) -> LockInfo | None:
        lock = self.read_lock()
        if lock is None:
            return None
        age = now - lock.started
        if self.alive(lock.pid) and age <= self.config.stale_after_s:
            return lock
        why = "its process is gone" if not self.alive(lock.pid) else f"{age:.0f} s old"
        self.notes.append(f"removed a stale lock of pid {lock.pid} ({why})")
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        return None

    def _create_lock(self, pid: int, now: float) -> None:
        fd = os.open(self.lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"pid": pid, "started": now}, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def fire(self, alert: Mapping[str, Any] | None, pid: int) -> Decision:
        """Decide on one alert (None: a schedule); on START the lock is taken for ``pid`` and
        the start recorded, before this returns."""
        self.notes = []
        with self._guard():
            now = self.clock()
            lock = self._live_lock(now)
            state = self.read_state()
            state.stale_locks_removed += len(self.notes)
            decision = decide(now, lock, state, self.config, alert)
            if decision is Decision.START:
                try:
                    self._create_lock(pid, now)
                except OSError as exc:
                    if exc.errno != errno.EEXIST:
                        raise
                    decision = Decision.RUNNING  # created outside the guard: respect it
            if decision is Decision.START:
                state.last_started = now
                state.started += 1
            else:
                state.declined[decision.value] = state.declined.get(decision.value, 0) + 1
            write_text_atomic(self.state_path, json.dumps(state.to_json(), sort_keys=True))
            return decision

    def hand_over(self, from_pid: int, to_pid: int) -> bool:
        """Give the lock ``from_pid`` holds to ``to_pid`` (the detached process that runs the
        pipeline); False when ``from_pid`` does not hold it."""
        with self._guard():
            lock = self.read_lock()
            if lock is None or lock.pid != from_pid:
                return False
            write_text_atomic(self.lock_path, json.dumps({"pid": to_pid, "started": lock.started}))
            return True

    def release(self, pid: int) -> bool:
        """Remove the lock if ``pid`` holds it (a run that ended); False otherwise."""
        with self._guard():
            lock = self.read_lock()
            if lock is None or lock.pid != pid:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            return True
