"""The agent tests' edge node and packages (tests/runtime/store/agent_rig.py), one per module."""

from __future__ import annotations

from tests.runtime.store.agent_rig import edge, sources

__all__ = ["edge", "sources"]
