"""Fuzz targets over everything edgewise parses from outside: the model package's manifest,
reference profile and golden requests, a model's config.json (with its batching and monitoring
sections), a package signature, a bearer-token header, and inference requests (protobuf bytes;
real requests with bytes overwritten; structurally valid requests with bad contents, built by
tests/fuzz/requests.py), then the full decode-and-check of the data plane against real models.
Preparing a request must stay under a memory ceiling set by its size on the wire, and under what
admission estimated when it is accepted (:class:`MemoryCeilingExceeded` otherwise).

Each target takes bytes, so the same targets serve hypothesis
(tests/runtime/package/test_fuzz_loaders.py, a bounded number of inputs) and atheris
(tests/fuzz/run.py, as long as you like). A target passes when the input is accepted or refused with
one of the documented errors (:class:`~edgewise.runtime.errors.EdgewiseError` subclasses, which the
gRPC layer maps to a status); anything else escaping is a finding.

Structured targets mutate a real seed document: the input bytes choose which node of the JSON
tree to replace and with what (wrong types, huge and non-finite numbers, deep nesting, long
strings, unsafe paths), so most inputs get past the JSON parser and reach the loader's logic.
"""

from __future__ import annotations

import contextlib
import json
import math
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import DecodeError

from edgewise.runtime.errors import EdgewiseError, PackageError
from edgewise.runtime.frontends.security import AuthInterceptor, TokenSet
from edgewise.runtime.package.golden import GoldenSet
from edgewise.runtime.package.manifest import parse_manifest
from edgewise.runtime.package.reference_profile import ReferenceProfile
from edgewise.runtime.package.signing import Signature
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.serving.admission import estimate_request_bytes
from edgewise.runtime.serving.batching import BatchingConfig
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.monitor import MonitorConfig
from edgewise.runtime.serving.repository import ModelRepository, VersionPolicy, read_model_config
from tests.fuzz.choices import ByteReader
from tests.fuzz.requests import InputSpec, RequestBuilder

T = TypeVar("T")

__all__ = ["MemoryCeilingExceeded", "Mutator", "Targets", "make_targets"]

#: The memory ceiling of the request targets: preparing (decoding and checking) a request may
#: hold at most this much plus DECODE_BYTES_PER_WIRE_BYTE per byte on the wire at once, as
#: tracemalloc sees it (numpy's buffers included). The most a byte of wire legitimately turns
#: into is a typed BYTES element: 2 bytes of wire, a ``bytes`` object (33 bytes and up), its
#: pointer in a list and in an object array (8 + 8). A shape the payload does not back (a
#: 28-byte request declaring 2**26 BYTES elements allocated 512 MiB) goes far past it.
DECODE_SLACK_BYTES = 64 * 1024
DECODE_BYTES_PER_WIRE_BYTE = 64


class MemoryCeilingExceeded(AssertionError):
    """Decoding held more memory than the request's bytes back, or than admission priced."""


def traced_peak(action: Callable[[], T]) -> tuple[T | None, int]:
    """``action()`` (None where it raised a documented error) and the most memory it held at
    once, as tracemalloc sees it; nests in a tracemalloc session already running."""
    running = tracemalloc.is_tracing()
    if running:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    else:
        base = 0
        tracemalloc.start()
    try:
        try:
            result: T | None = action()
        except EdgewiseError:
            result = None
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        if not running:
            tracemalloc.stop()


# Values a mutation puts in place of a node: each is a plausible mistake or an attack.
PALETTE: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**63, -(2**63) - 1, 10**400, 1e308, -1e308, 1e-320, math.nan,
    math.inf, -math.inf, 0.5, "", "x", "../../etc/passwd", "/abs", "a" * 5000, "\u0000", "\ud800",
    "FP32", "BYTES", "INT64", "numeric", "categorical", [], [None], [1, 2, 3], [[1], [2, 3]],
    [-1, -1], [2**31] * 4, {}, {"a": 1}, {"format": None}, list(range(300)),
)  # fmt: skip


class Mutator(ByteReader):
    """Replaces nodes of a JSON document, as directed by a byte string."""

    def value(self) -> Any:
        choice = self.byte()
        if choice == 255:  # deep nesting (json.dumps itself stops near 1,000 levels)
            depth = 1 + self.byte() * 3
            nested: Any = 0
            for _ in range(depth):
                nested = [nested]
            return nested
        return PALETTE[choice % len(PALETTE)]

    def mutate(self, document: Any, edits: int | None = None) -> Any:
        count = edits if edits is not None else 1 + self.byte() % 4
        for _ in range(count):
            document = self._replace(document, depth=0)
        return document

    def _replace(self, node: Any, depth: int) -> Any:
        step = self.byte()
        if depth > 12 or step % 4 == 0 or not isinstance(node, dict | list) or not node:
            if step % 16 == 1 and isinstance(node, dict):  # drop a key instead
                keys = sorted(node)
                if keys:
                    node = dict(node)
                    del node[keys[self.byte() % len(keys)]]
                    return node
            return self.value()
        if isinstance(node, dict):
            keys = sorted(node)
            key = keys[self.byte() % len(keys)]
            copy = dict(node)
            copy[key] = self._replace(node[key], depth + 1)
            return copy
        index = self.byte() % len(node)
        items = list(node)
        items[index] = self._replace(node[index], depth + 1)
        return items


CONFIG_SEED: dict[str, Any] = {
    "version_policy": {"specific": [1, 2]},
    "default_version": 1,
    "batching": {"max_batch_size": 8, "max_queue_delay_us": 100,
                 "preferred_batch_sizes": [4, 8], "max_queue_size": 16},
    "monitoring": {"window_rows": 100, "min_rows": 10, "thresholds": {"psi": 0.2}},
}  # fmt: skip


def _dumps(document: Any) -> bytes:
    return json.dumps(document, allow_nan=True).encode("utf-8", "surrogatepass")


@dataclass
class Targets:
    """The targets, bound to seed documents and loaded models; see :func:`make_targets`."""

    manifest_seed: dict[str, Any]
    profile_seed: dict[str, Any]
    golden_seed: dict[str, Any]
    config_seed: dict[str, Any]
    signature_seed: dict[str, Any]
    request_seeds: list[bytes]
    dataplane: DataPlane
    scratch: Path
    request_builder: RequestBuilder
    auth: AuthInterceptor = field(
        default_factory=lambda: AuthInterceptor(TokenSet(inline="fuzz-token-0123456789abcdef"))
    )

    # -- structured loaders --------------------------------------------------------------------

    def manifest(self, data: bytes) -> None:
        raw = _dumps(Mutator(data).mutate(self.manifest_seed))
        for candidate in (raw, data):
            with contextlib.suppress(PackageError):
                parse_manifest(candidate, "fuzz")

    def profile(self, data: bytes) -> None:
        document = Mutator(data).mutate(self.profile_seed)
        try:
            if not isinstance(document, dict):
                raise PackageError("not an object")  # read_profile's own check
            ReferenceProfile.from_json(document)
        except PackageError:
            pass

    def golden(self, data: bytes) -> None:
        document = Mutator(data).mutate(self.golden_seed)
        try:
            if not isinstance(document, dict):
                raise PackageError("not an object")  # read_golden's own check
            GoldenSet.from_json(document)
        except PackageError:
            pass

    def config(self, data: bytes) -> None:
        document = Mutator(data).mutate(self.config_seed)
        model_dir = self.scratch / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_bytes(_dumps(document))
        try:
            config = read_model_config(model_dir, VersionPolicy())
            config.version_policy.select([1, 2, 3])
            if config.batching is not None:
                BatchingConfig.from_json(config.batching)
            MonitorConfig.from_json(config.monitoring or {}, MonitorConfig())
        except EdgewiseError:
            pass

    def signature(self, data: bytes) -> None:
        document = Mutator(data).mutate(self.signature_seed)
        with contextlib.suppress(PackageError):
            Signature.from_json(document)

    def token_header(self, data: bytes) -> None:
        value = data.decode("latin-1")
        assert self.auth.check([("authorization", value)]) in (None, "malformed", "invalid")
        assert self.auth.check([("authorization", data)]) in (None, "malformed", "invalid")

    # -- requests ------------------------------------------------------------------------------

    def request_bytes(self, data: bytes) -> None:
        """Raw bytes as a ModelInferRequest, then through the data plane."""
        try:
            request = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            return  # gRPC refuses it before any handler runs
        self._prepare(request)

    def request_mutated(self, data: bytes) -> None:
        """A real request with some of its bytes overwritten (so it mostly still parses)."""
        mutator = Mutator(data)
        seed = bytearray(self.request_seeds[mutator.byte() % len(self.request_seeds)])
        for _ in range(1 + mutator.byte() % 8):
            if not seed:
                break
            position = (mutator.byte() << 8 | mutator.byte()) % len(seed)
            seed[position] = mutator.byte()
        self.request_bytes(bytes(seed))

    def request_structured(self, data: bytes) -> None:
        """A structurally valid request with bad contents (tests/fuzz/requests.py), through the
        wire and the data plane."""
        wire = self.request_builder.build(data).SerializeToString()
        self._prepare(pb.ModelInferRequest.FromString(wire), len(wire))

    def _prepare(self, request: pb.ModelInferRequest, wire_size: int | None = None) -> None:
        """Prepare (decode and check) under the memory ceiling, then run what was accepted."""
        wire_size = request.ByteSize() if wire_size is None else wire_size
        prepared, peak = traced_peak(lambda: self.dataplane.prepare(request))
        ceiling = DECODE_SLACK_BYTES + DECODE_BYTES_PER_WIRE_BYTE * wire_size
        if peak > ceiling:
            raise MemoryCeilingExceeded(
                f"preparing a {wire_size}-byte request held {peak} bytes at once (ceiling "
                f"{ceiling}): memory the payload does not back"
            )
        if prepared is None:
            return
        estimate = estimate_request_bytes(request)
        if peak > estimate + DECODE_SLACK_BYTES:
            raise MemoryCeilingExceeded(
                f"decoding held {peak} bytes, admission estimated {estimate}: admission "
                "prices less than decoding allocates"
            )
        with contextlib.suppress(EdgewiseError):
            self.dataplane.execute(prepared)

    def all(self) -> dict[str, Callable[[bytes], None]]:
        return {
            "manifest": self.manifest,
            "profile": self.profile,
            "golden": self.golden,
            "config": self.config,
            "signature": self.signature,
            "token_header": self.token_header,
            "request_bytes": self.request_bytes,
            "request_mutated": self.request_mutated,
            "request_structured": self.request_structured,
        }


def make_targets(repo: Path, scratch: Path) -> Targets:
    """Targets seeded from a model repository holding ``logreg`` and ``mixed`` (tests.models:
    one FP32 input; FP32, INT64 and BYTES inputs), both served by a real data plane."""
    from edgewise.runtime.package.golden import read_golden
    from edgewise.runtime.package.manifest import read_manifest
    from edgewise.runtime.serving.codecs import encode_inputs

    logreg = repo / "logreg" / "1"
    mixed = repo / "mixed" / "1"
    repository = ModelRepository(repo)
    for name in ("logreg", "mixed"):
        repository.load(name)
    seeds = []
    for folder in (logreg, mixed):
        golden = read_golden(folder)
        assert golden is not None
        for raw in (True, False):
            request = pb.ModelInferRequest(model_name=read_manifest(folder).name)
            encode_inputs(request, golden.requests[0].inputs, raw=raw)
            seeds.append(request.SerializeToString())
    return Targets(
        manifest_seed=json.loads((mixed / "manifest.json").read_text()),
        profile_seed=json.loads((mixed / "profile.json").read_text()),
        golden_seed=json.loads((mixed / "golden.json").read_text()),
        config_seed=CONFIG_SEED,
        signature_seed={
            "format": "edgewise.signature/1",
            "algorithm": "ed25519",
            "key_id": "0123456789abcdef",
            "manifest_sha256": "0" * 64,
            "signature": "A" * 86 + "==",
        },
        request_seeds=seeds,
        request_builder=RequestBuilder(
            {
                name: (
                    [InputSpec(s.name, s.datatype, tuple(s.shape)) for s in model.inputs],
                    list(model.output_names),
                )
                for name in ("logreg", "mixed")
                for model in [repository.get(name, "")]
            }
        ),
        dataplane=DataPlane(repository),
        scratch=scratch,
    )
