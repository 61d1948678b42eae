"""The agent tests' edge node, packages and rig (tests/runtime/store/agent_rig.py)."""

from __future__ import annotations

from tests.runtime.store.agent_rig import edge, rig, sources

__all__ = ["edge", "rig", "sources"]
