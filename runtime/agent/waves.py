"""Fleet waves: many nodes follow one alias in waves (one node, a share, all), each wave starting
only once every node of the waves before it reports the new version healthy through the store
(docs/rollout.md#fleet-waves).

The fleet is the set of nodes that reported for the model (plus the asking node), less the nodes
that left (a report older than ``fresh_seconds``) and the nodes that follow another alias (a
report made after the asking node first saw this version, ``since``, whose target is another
version): neither can hold a wave forever. Its order for
a version is a hash of (version, node): the same on every node, different for each version, so
the first wave is not always the same node. No coordinator: each agent reads the node reports
and decides for itself.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from edgewise.runtime.store.base import NodeReport

__all__ = ["Wave", "fleet_order", "wave_counts", "wave_wait"]


@dataclass(frozen=True)
class Wave:
    """``nodes`` nodes, or a ``share`` of the fleet (rounded up); exactly one of them."""

    nodes: int = 0
    share: float = 0.0

    def size(self, fleet: int) -> int:
        wanted = self.nodes if self.nodes else math.ceil(self.share * fleet - 1e-9)
        return max(1, min(fleet, wanted))

    def describe(self) -> str:
        return f"{self.nodes} node(s)" if self.nodes else f"{self.share:.0%}"


def fleet_order(nodes: Sequence[str], version: int) -> list[str]:
    def rank(node: str) -> bytes:
        return hashlib.blake2b(f"{version}:{node}".encode(), digest_size=8).digest()

    return sorted(set(nodes), key=lambda node: (rank(node), node))


def wave_counts(waves: Sequence[Wave], fleet: int) -> list[int]:
    """How many nodes (cumulative) have begun after each wave."""
    counts: list[int] = []
    for wave in waves:
        counts.append(max(wave.size(fleet), counts[-1] if counts else 0))
    return counts


def _healthy(report: NodeReport | None, version: int, sha256: str) -> bool:
    return (
        report is not None
        and report.version == version
        and report.sha256 == sha256
        and report.health == "ok"
        and report.state != "watching"
    )


def _reported_at(report: NodeReport) -> float:
    """When ``report`` was made (seconds since the epoch; -inf when unreadable)."""
    try:
        when = datetime.strptime(report.updated_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return -math.inf
    return when.timestamp()


def _in_fleet(
    report: NodeReport, version: int, now: float, since: float | None, fresh_seconds: float
) -> bool:
    """Whether ``report``'s node counts for ``version``'s waves (see the module's docstring)."""
    if not math.isinf(fresh_seconds) and now - _reported_at(report) > fresh_seconds:
        return False  # it left (or stopped reporting): it cannot hold a wave
    if report.target_version == version or since is None:
        return True
    # Another target: a node that has not polled since the alias moved (wait for it), or, once
    # it reported after this node saw the version, one that follows another alias (left out).
    return not _reported_at(report) > since


def wave_wait(
    node: str,
    reports: Sequence[NodeReport],
    version: int,
    sha256: str,
    waves: Sequence[Wave],
    now: float = 0.0,
    since: float | None = None,
    fresh_seconds: float = math.inf,
) -> str:
    """Why ``node`` must wait before deploying ``version`` ("" when its wave has begun). ``now``
    and ``since`` (when ``node`` first saw ``version``) are seconds since the epoch."""
    if not waves:
        return ""
    by_node = {r.node: r for r in reports if _in_fleet(r, version, now, since, fresh_seconds)}
    order = fleet_order([*by_node, node], version)
    counts = wave_counts(waves, len(order))
    position = order.index(node)
    wave = next(i for i, count in enumerate(counts) if position < count or i == len(counts) - 1)
    if wave == 0:
        return ""
    earlier = order[: counts[wave - 1]]
    behind = [n for n in earlier if not _healthy(by_node.get(n), version, sha256)]
    if not behind:
        return ""
    return (
        f"wave {wave + 1} of {len(waves)}: waiting for {len(behind)} of the {len(earlier)} "
        f"node(s) before it to serve version {version} healthy ({', '.join(behind[:3])}"
        f"{', ...' if len(behind) > 3 else ''})"
    )
