"""Bounded fuzzing (hypothesis) of everything edgewise parses from outside: manifests, reference
profiles, golden requests, model configs, signatures, token headers and inference requests (see
tests/fuzz/targets.py). Each input must be accepted or refused with a documented error, within
the deadline; tests/fuzz/run.py runs the same targets for longer, with atheris when installed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.targets import Targets, make_targets

# Bounded: about 2,000 inputs in all, a few seconds each target.
EXAMPLES = 250
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per input: a slow input is a hang, and fails
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs on every run (CI never flakes on a new one)
)


@pytest.fixture(scope="module")
def targets(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Targets:
    return make_targets(model_repo, tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize(
    "name",
    ["manifest", "profile", "golden", "config", "signature", "token_header",
     "request_bytes", "request_mutated", "request_structured"],
)  # fmt: skip
def test_fuzz_target(targets: Targets, name: str) -> None:
    target = targets.all()[name]

    @FUZZ
    @given(st.binary(min_size=0, max_size=256))
    def run(data: bytes) -> None:
        target(data)

    run()


def test_the_mutator_reaches_past_the_json_parser(targets: Targets) -> None:
    """Most mutated manifests are JSON the loader has to judge (not refused as non-JSON)."""
    from edgewise.runtime.errors import PackageError
    from edgewise.runtime.package.manifest import parse_manifest
    from tests.fuzz.targets import Mutator, _dumps

    judged = 0
    for seed in range(200):
        data = bytes((seed * 7 + i * 13) % 256 for i in range(32))
        try:
            parse_manifest(_dumps(Mutator(data).mutate(targets.manifest_seed)), "x")
            judged += 1
        except PackageError as exc:
            judged += "not valid JSON" not in exc.message
    assert judged >= 190
