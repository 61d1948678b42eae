"""Tests that need what a machine may lack: the native builds (``make native``: a C compiler and
libgrpc++-dev) or root (real cgroups, private mounts).

On a developer's machine such a test is skipped with the reason. Under CI (``CI`` set, as CI
runners set it for .ci/run) it fails instead: CI must run everything the suite claims to cover,
so a build that broke or a runner without root shows as a failure, never as a quiet skip.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

#: Whether this run is CI's: ``CI`` set to anything but empty, 0, false or no.
IN_CI = os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def unmet(reason: str) -> NoReturn:
    """Stop the current test for a missing prerequisite: skipped with ``reason``, or failed under
    CI."""
    if IN_CI:
        pytest.fail(f"CI must run this test, but {reason}", pytrace=False)
    pytest.skip(reason)


def requires(reason: str | None) -> pytest.MarkDecorator:
    """A mark for a test that runs only where ``reason`` (why it cannot run here) is None;
    otherwise see :func:`unmet` (applied by tests/conftest.py before the test's fixtures)."""
    return pytest.mark.requires(reason)


def native_kernels_missing() -> str | None:
    """Why the ahead-of-time compiled kernels (``make native``) do not serve here, or None."""
    from edgewise.kernels import _native

    return None if _native.NATIVE is not None else f"the native kernels are {_native.STATUS}"
