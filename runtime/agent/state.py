"""The sync agent's local state: what it deployed, what is known good, what it refused.

One JSON file per model, ``<state dir>/<model>.json`` (default state dir: ``REPO/.edgewise-agent``,
which the server ignores because it starts with a dot), written atomically (temporary file, fsync,
rename). Beside it, ``<model>.lock`` serialises read-modify-write between the agent and
``edgewise rollback``, and ``<model>.agent.lock`` is held by the running agent for its lifetime
(two agents for one model on one repository refuse to run; the kernel drops the lock when an
agent dies, even by SIGKILL).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from edgewise.runtime._fs import write_text_atomic
from edgewise.runtime.errors import EdgewiseError, PackageError, Unavailable
from edgewise.runtime.package.manifest import validate_model_name

__all__ = [
    "STATE_FORMAT",
    "AgentState",
    "Deployed",
    "Rejection",
    "Rollout",
    "StateFile",
    "Watch",
]

STATE_FORMAT: Final = "edgewise.agent-state/1"
DEFAULT_STATE_DIR: Final = ".edgewise-agent"


@dataclass(frozen=True)
class Deployed:
    version: int
    sha256: str
    at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "sha256": self.sha256, "at": self.at}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Deployed:
        return cls(int(data["version"]), str(data["sha256"]), str(data.get("at", "")))


@dataclass(frozen=True)
class Rejection:
    """A (version, sha256) the agent will not deploy again (until ``retry_at``, if set)."""

    version: int
    sha256: str
    reason: str
    at: str = ""
    retry_at: float | None = None  # epoch seconds; None: never (until the alias moves on)

    @property
    def key(self) -> str:
        return f"{self.version}:{self.sha256}"

    def active(self, now: float | None = None) -> bool:
        return self.retry_at is None or (time.time() if now is None else now) < self.retry_at

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "reason": self.reason,
            "at": self.at,
            "retry_at": self.retry_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rejection:
        retry = data.get("retry_at")
        return cls(
            int(data["version"]),
            str(data["sha256"]),
            str(data.get("reason", "")),
            str(data.get("at", "")),
            None if retry is None else float(retry),
        )


@dataclass(frozen=True)
class Watch:
    """A version just switched to, watched for errors before it becomes the last good one."""

    version: int
    sha256: str
    previous: int | None  # the version to roll back to
    since: float  # epoch seconds of the switch
    # The server's request counters at the switch (None: its metrics could not be read).
    baseline_total: float | None = None
    baseline_errors: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "previous": self.previous,
            "since": self.since,
            "baseline_total": self.baseline_total,
            "baseline_errors": self.baseline_errors,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Watch:
        previous = data.get("previous")
        total, errors = data.get("baseline_total"), data.get("baseline_errors")
        return cls(
            int(data["version"]),
            str(data["sha256"]),
            None if previous is None else int(previous),
            float(data["since"]),
            None if total is None else float(total),
            None if errors is None else float(errors),
        )


@dataclass(frozen=True)
class Rollout:
    """A version on its way to the default: installed, loaded, through its policy's steps, not
    yet switched to. Recorded while the agent works without the state lock (loading, the steps'
    waits), so that ``edgewise rollback`` can abort it: ``aborted`` is then why ("manual"), the
    candidate is out of traffic and refused, and the agent, seeing it, ends the rollout (its
    decision, its metrics) instead of switching."""

    version: int
    sha256: str
    stable: int | None  # the version serving meanwhile (None: nothing served before)
    since: float  # epoch seconds
    aborted: str | None = None
    aborted_at: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sha256": self.sha256,
            "stable": self.stable,
            "since": self.since,
            "aborted": self.aborted,
            "aborted_at": self.aborted_at,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Rollout:
        stable, aborted = data.get("stable"), data.get("aborted")
        return cls(
            int(data["version"]),
            str(data["sha256"]),
            None if stable is None else int(stable),
            float(data["since"]),
            None if aborted is None else str(aborted),
            str(data.get("aborted_at", "")),
        )


@dataclass(frozen=True)
class AgentState:
    model: str
    deployed: Deployed | None = None  # the server's default version, as the agent set it
    last_good: Deployed | None = None  # pinned: passed validation, the switch and its watch
    good: tuple[Deployed, ...] = ()  # every version that was good, oldest first
    rejected: tuple[Rejection, ...] = ()
    watch: Watch | None = None
    updated_at: str = ""
    # The highest version the agent ever made the server's default (rollback protection: a
    # lower one is refused unless the rollback is explicit). None: as the other fields say.
    highest_served: int | None = None
    rollout: Rollout | None = None  # a version on its way (see Rollout)

    @property
    def served_floor(self) -> int | None:
        """The highest version served so far: ``highest_served``, or for a state file written
        before it existed the highest of the deployed, last good and good versions."""
        versions = [d.version for d in (self.deployed, self.last_good, *self.good) if d]
        if self.highest_served is not None:
            versions.append(self.highest_served)
        return max(versions) if versions else None

    def serving(self, item: Deployed) -> AgentState:
        """``item`` is the server's default now (the floor rises, never falls)."""
        floor = self.served_floor
        highest = item.version if floor is None else max(floor, item.version)
        return replace(self, deployed=item, highest_served=highest)

    def rejection(self, version: int, sha256: str, now: float | None = None) -> Rejection | None:
        for item in self.rejected:
            if item.version == version and item.sha256 == sha256 and item.active(now):
                return item
        return None

    def reject(self, rejection: Rejection, keep: int = 50) -> AgentState:
        others = [r for r in self.rejected if r.key != rejection.key]
        return replace(self, rejected=(*others[-(keep - 1) :], rejection))

    def with_good(self, item: Deployed, keep: int = 50) -> AgentState:
        others = [d for d in self.good if d.version != item.version]
        return replace(self, last_good=item, good=(*others[-(keep - 1) :], item))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "model": self.model,
            "deployed": None if self.deployed is None else self.deployed.to_json(),
            "last_good": None if self.last_good is None else self.last_good.to_json(),
            "good": [d.to_json() for d in self.good],
            "rejected": [r.to_json() for r in self.rejected],
            "watch": None if self.watch is None else self.watch.to_json(),
            "updated_at": self.updated_at,
            "highest_served": self.highest_served,
            "rollout": None if self.rollout is None else self.rollout.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AgentState:
        if data.get("format") != STATE_FORMAT:
            raise PackageError(f"agent state: unknown format {data.get('format')!r}")
        try:
            deployed, last_good, watch, rollout = (
                data.get("deployed"),
                data.get("last_good"),
                data.get("watch"),
                data.get("rollout"),
            )
            return cls(
                model=validate_model_name(str(data["model"])),
                deployed=None if deployed is None else Deployed.from_json(deployed),
                last_good=None if last_good is None else Deployed.from_json(last_good),
                good=tuple(Deployed.from_json(d) for d in data.get("good", ())),
                rejected=tuple(Rejection.from_json(r) for r in data.get("rejected", ())),
                watch=None if watch is None else Watch.from_json(watch),
                updated_at=str(data.get("updated_at", "")),
                highest_served=_optional_version(data.get("highest_served")),
                rollout=None if rollout is None else Rollout.from_json(rollout),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PackageError(f"agent state: malformed: {type(exc).__name__}: {exc}") from None


def _optional_version(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"highest_served must be a version >= 1, got {value!r}")
    return value


@dataclass
class StateFile:
    """The state file of one model, with its locks."""

    folder: Path
    model: str
    _agent_lock: int | None = field(default=None, repr=False)

    @classmethod
    def for_repo(cls, repo: Path, model: str, folder: Path | None = None) -> StateFile:
        validate_model_name(model)
        return cls(folder if folder is not None else repo / DEFAULT_STATE_DIR, model)

    @property
    def path(self) -> Path:
        return self.folder / f"{self.model}.json"

    def read(self) -> AgentState:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return AgentState(model=self.model)
        except OSError as exc:
            raise PackageError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"{self.path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PackageError(f"{self.path}: expected a JSON object")
        state = AgentState.from_json(data)
        if state.model != self.model:
            raise PackageError(f"{self.path}: state of model {state.model!r}, not {self.model!r}")
        return state

    def write(self, state: AgentState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(state.to_json(), indent=2) + "\n")

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Hold ``<model>.lock`` (waiting up to ``timeout`` seconds for it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / f"{self.model}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        try:
            deadline = time.monotonic() + timeout
            delay = 0.01
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"{self.folder / self.model}.lock is held by another process "
                            f"(waited {timeout:g} s)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.25)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def claim_agent(self) -> None:
        """Take ``<model>.agent.lock`` for this process's lifetime; fail if another agent has it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.model}.agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EdgewiseError(
                f"another agent already runs for model {self.model!r} ({path} is locked)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._agent_lock = fd

    def release_agent(self) -> None:
        if self._agent_lock is not None:
            os.close(self._agent_lock)
            self._agent_lock = None
