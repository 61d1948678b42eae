"""Server settings: the one place that reads environment variables.

Precedence: command-line flags, then ``EDGEWISE_*`` environment variables, then the defaults
here. Each field documents its environment variable. In :meth:`ServerSettings.from_sources`, the
fields of :data:`BUDGET_FIELDS` that are not set explicitly come from the runtime budget derived
from the process's CPU and memory limits (:mod:`edgewise.runtime.config.limits`); the defaults below
are only those of a directly constructed ``ServerSettings``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgewise.runtime.config.limits import (
    ResourceLimits,
    RuntimeBudget,
    auto_processes,
    derive_budget,
    detect_limits,
    numba_override,
)
from edgewise.runtime.errors import InvalidInput

__all__ = [
    "BUDGET_FIELDS",
    "ClientSecurity",
    "ServerSettings",
    "add_client_security_arguments",
    "client_security_from_args",
    "parse_switch",
    "server_metrics_port",
    "switch",
]

ENV_PREFIX = "EDGEWISE_"

#: Settings whose default is derived from the CPU and memory limits (see ``limits.py``).
BUDGET_FIELDS = (
    "worker_threads",
    "intra_op_threads",
    "inter_op_threads",
    "max_message_bytes",
    "max_inflight",
    "memory_budget_bytes",
    "memory_arena",
)


@dataclass(frozen=True)
class ServerSettings:
    repo: Path = Path("model-repo")  # EDGEWISE_REPO
    host: str = "0.0.0.0"  # EDGEWISE_HOST
    port: int = 8001  # EDGEWISE_PORT (0 picks a free port)
    metrics_host: str = "127.0.0.1"  # EDGEWISE_METRICS_HOST (loopback: widen on purpose)
    metrics_port: int = 8002  # EDGEWISE_METRICS_PORT (0 picks a free port, -1 disables)
    # EDGEWISE_HTTP_PORT: the HTTP/REST front end's port on ``host`` (0 picks a free port; -1,
    # the default: off; see http_front.py)
    http_port: int = -1
    max_message_bytes: int = 64 << 20  # EDGEWISE_MAX_MESSAGE_BYTES
    worker_threads: int = 4  # EDGEWISE_WORKER_THREADS: large requests and control work
    inline_max_bytes: int = 64 * 1024  # EDGEWISE_INLINE_MAX_BYTES: run on the event loop below
    intra_op_threads: int = 1  # EDGEWISE_INTRA_OP_THREADS
    inter_op_threads: int = 1  # EDGEWISE_INTER_OP_THREADS
    version_policy: str = "latest:1"  # EDGEWISE_VERSION_POLICY: latest:N | all | specific:1,2
    grace_seconds: float = 10.0  # EDGEWISE_GRACE_SECONDS: finish in-flight work on SIGTERM
    # EDGEWISE_PORT_FILE: write "grpc_port metrics_port[ http_port]" when ready
    port_file: Path | None = None
    # EDGEWISE_PROCESSES: server processes sharing the port (SO_REUSEPORT); "auto": one per core
    # of the CPU budget, as many as the memory budget holds (see limits.auto_processes)
    processes: int = 1
    # Set by the multi-process supervisor for its server processes (not for users):
    reuse_port: bool = False  # EDGEWISE_REUSE_PORT: bind the port with SO_REUSEPORT
    peers_dir: Path | None = None  # EDGEWISE_PEERS_DIR: where sibling processes publish themselves
    monitoring: bool = True  # EDGEWISE_MONITORING: on | off (per-request statistics and drift)
    # EDGEWISE_FRONT_END: auto | native | grpcio: what serves the gRPC port (native: gRPC's C++
    # server, see frontends/native/binding.py; auto: native wherever it is built, TLS or not)
    front_end: str = "auto"
    # EDGEWISE_NATIVE_FAST_PATH: on | off: the native front end answers the common ModelInfer call
    # in C++ without the GIL (frontends/native/fast_path.py); anything else takes the Python path
    native_fast_path: bool = True
    gc_tuning: bool = True  # EDGEWISE_GC_TUNING: freeze start-up objects, rarer collections
    quality: bool = True  # EDGEWISE_QUALITY: on | off (keep predictions by request id for labels)
    alert_command: str | None = None  # EDGEWISE_ALERT_COMMAND: run with the alert JSON on stdin
    alert_webhook: str | None = None  # EDGEWISE_ALERT_WEBHOOK: POST the alert JSON here
    drift_interval_seconds: float = 10.0  # EDGEWISE_DRIFT_INTERVAL_SECONDS: timer (0: on demand)
    max_inflight: int = 0  # EDGEWISE_MAX_INFLIGHT: calls at once (0: no cap)
    memory_budget_bytes: int = 0  # EDGEWISE_MEMORY_BUDGET_BYTES: admission's budget (0: none)
    admission: bool = True  # EDGEWISE_ADMISSION: on | off (memory admission)
    memory_arena: bool = True  # EDGEWISE_MEMORY_ARENA: onnxruntime CPU arena and memory patterns
    # Security (see runtime/frontends/security.py and runtime/package/signing.py):
    tls_cert: Path | None = None  # EDGEWISE_TLS_CERT: PEM certificate chain of the gRPC port
    tls_key: Path | None = None  # EDGEWISE_TLS_KEY: its PEM private key
    tls_client_ca: Path | None = None  # EDGEWISE_TLS_CLIENT_CA: require client certs (mutual TLS)
    tokens_file: Path | None = None  # EDGEWISE_TOKENS_FILE: bearer tokens, one per line
    # EDGEWISE_TOKENS: bearer tokens, comma- or space-separated (never on the command line)
    tokens: str = field(default="", repr=False)
    health_open: bool = True  # EDGEWISE_HEALTH_OPEN: the health service needs no token
    reflection_open: bool = False  # EDGEWISE_REFLECTION_OPEN: server reflection needs no token
    trusted_keys: Path | None = None  # EDGEWISE_TRUSTED_KEYS: refuse packages not signed by these
    retry_after_ms: int = 50  # EDGEWISE_RETRY_AFTER_MS: retry hint of a shed/refused request
    audit_log: Path | None = None  # EDGEWISE_AUDIT_LOG: JSON lines of control calls (None: off)
    audit_log_max_bytes: int = 10 << 20  # EDGEWISE_AUDIT_LOG_MAX_BYTES: rotate past this size
    # EDGEWISE_CREDENTIAL_LIMITS: every credential's default limits of inference calls,
    # "rate=50/s burst=100 share=0.5" (a tokens-file line's own override them; "": none)
    credential_limits: str = ""
    metrics_auth: bool = False  # EDGEWISE_METRICS_AUTH: /metrics needs a token with scope read
    metrics_tls: bool = False  # EDGEWISE_METRICS_TLS: the metrics port serves the port's TLS
    # Data capture (runtime/serving/capture.py; needs pyarrow, the edgewise[data] extra):
    capture_dir: Path | None = None  # EDGEWISE_CAPTURE_DIR: capture requests here (None: off)
    capture_rate: float = 1.0  # EDGEWISE_CAPTURE_RATE: fraction captured (config.json overrides)
    capture_max_bytes: int = 1 << 30  # EDGEWISE_CAPTURE_MAX_BYTES: the folder's size cap
    capture_queue: int = 10_000  # EDGEWISE_CAPTURE_QUEUE: records waiting; beyond: dropped
    capture_queue_bytes: int = 64 << 20  # EDGEWISE_CAPTURE_QUEUE_BYTES: ... and their bytes
    capture_flush_seconds: float = 5.0  # EDGEWISE_CAPTURE_FLUSH_SECONDS: write at least this often
    # Tracing (runtime/serving/tracing.py; needs the edgewise[otel] extra):
    otel_endpoint: str | None = None  # EDGEWISE_OTEL_ENDPOINT: OTLP/gRPC collector (None: off)
    otel_sample_ratio: float = 1.0  # EDGEWISE_OTEL_SAMPLE_RATIO: fraction of new traces sampled
    # The budget the derived defaults came from (set by from_sources; not an environment variable).
    budget: RuntimeBudget | None = field(default=None, compare=False, metadata={"env": False})

    @property
    def auth_enabled(self) -> bool:
        return self.tokens_file is not None or bool(self.tokens.strip())

    @classmethod
    def from_sources(
        cls,
        overrides: Mapping[str, Any],
        environ: Mapping[str, str] | None = None,
        limits: ResourceLimits | None = None,
    ) -> ServerSettings:
        """Defaults, then ``EDGEWISE_*`` variables, then the non-None ``overrides``; the
        :data:`BUDGET_FIELDS` none of them set come from the budget derived from ``limits``
        (default: the limits this process runs under)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            if not item.metadata.get("env", True):
                continue
            raw = env.get(ENV_PREFIX + item.name.upper())
            if raw is not None and raw != "":
                if item.name == "processes" and raw.strip().lower() == AUTO:
                    values[item.name] = AUTO
                    continue
                values[item.name] = _convert(item.name, item.type, raw)
        for key, value in overrides.items():
            if value is not None:
                values[key] = parse_switch(key, value) if key in SWITCHES else value
        explicit = {name: values[name] for name in BUDGET_FIELDS if name in values}
        budget = derive_budget(
            limits if limits is not None else detect_limits(), {**numba_override(env), **explicit}
        )
        for name in BUDGET_FIELDS:
            values.setdefault(name, getattr(budget, name))
        if values.get("processes") == AUTO:
            values["processes"] = auto_processes(budget)
        values["budget"] = budget
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidInput(f"port {self.port} is not a TCP port")
        _checked_metrics_port(self.metrics_port)
        if not -1 <= self.http_port <= 65535:
            raise InvalidInput(f"http-port {self.http_port} is not a TCP port (or -1: off)")
        if self.http_port == 0 and self.processes > 1:
            raise InvalidInput("http-port 0 cannot be shared by several processes: give a port")
        for name in ("worker_threads", "intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name.replace('_', '-')} must be at least 1")
        if self.max_message_bytes < 1024:
            raise InvalidInput("max-message-bytes must be at least 1024")
        if self.max_inflight < 0 or self.memory_budget_bytes < 0:
            raise InvalidInput("max-inflight and memory-budget-bytes must not be negative")
        for name in SWITCHES:  # typed at the edge (parse_switch): a string here is a mistake
            if not isinstance(getattr(self, name), bool):
                raise InvalidInput(f"{name} must be on or off, not {getattr(self, name)!r}")
        if self.processes < 1:
            raise InvalidInput("processes must be at least 1")
        if self.front_end not in ("auto", "native", "grpcio"):
            raise InvalidInput(
                f"front-end must be 'auto', 'native' or 'grpcio', not {self.front_end!r}"
            )
        if self.drift_interval_seconds < 0:
            raise InvalidInput("drift-interval-seconds must not be negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidInput("tls-cert and tls-key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise InvalidInput("tls-client-ca (mutual TLS) needs tls-cert and tls-key")
        if self.retry_after_ms < 0:
            raise InvalidInput("retry-after-ms must not be negative")
        if self.credential_limits.strip() and not self.auth_enabled:
            raise InvalidInput(
                "credential-limits needs tokens (tokens-file or EDGEWISE_TOKENS): limits are "
                "per credential"
            )
        if self.metrics_auth and not self.auth_enabled:
            raise InvalidInput("metrics-auth needs tokens (tokens-file or EDGEWISE_TOKENS)")
        if self.metrics_tls and self.tls_cert is None:
            raise InvalidInput("metrics-tls needs tls-cert and tls-key")
        if not 0.0 <= self.otel_sample_ratio <= 1.0:
            raise InvalidInput(
                f"otel-sample-ratio must be a fraction from 0 to 1, not {self.otel_sample_ratio!r}"
            )
        if not 0.0 <= self.capture_rate <= 1.0:
            raise InvalidInput(
                f"capture-rate must be a fraction from 0 to 1, not {self.capture_rate!r}"
            )
        if self.capture_max_bytes < 1:
            raise InvalidInput(f"capture-max-bytes must be positive, not {self.capture_max_bytes}")
        if self.capture_queue < 1:
            raise InvalidInput(f"capture-queue must be at least 1, not {self.capture_queue}")
        if self.capture_queue_bytes < 1:
            raise InvalidInput(
                f"capture-queue-bytes must be at least 1, not {self.capture_queue_bytes}"
            )
        if not self.capture_flush_seconds > 0:
            raise InvalidInput(
                f"capture-flush-seconds must be positive, not {self.capture_flush_seconds}"
            )


#: The value of ``processes`` that sizes it from the budget.
AUTO = "auto"

#: The on/off settings: booleans inside the program, ``on``/``off`` (or true/false, 1/0, yes/no)
#: on the command line and in ``EDGEWISE_*`` variables, read by :func:`parse_switch`.
SWITCHES = (
    "monitoring", "quality", "admission", "metrics_auth", "metrics_tls", "native_fast_path",
)  # fmt: skip

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


def parse_switch(name: str, value: object) -> bool:
    """``value`` (a bool, or text as a flag or an environment variable gives it) as a bool:
    the one place an on/off word becomes a boolean."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidInput(f"{name.replace('_', '-')} must be on or off, not {value!r}")


def switch(text: str) -> bool:
    """An argparse ``type`` for an on/off flag (see :func:`parse_switch`)."""
    try:
        return parse_switch("value", text)
    except InvalidInput:
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off") from None


def server_metrics_port(environ: Mapping[str, str] | None = None) -> int:
    """The metrics port a server on this node listens on by the same rule it uses itself:
    ``EDGEWISE_METRICS_PORT``, else the default of :attr:`ServerSettings.metrics_port` (0 picks
    a free port and -1 disables it: then a client cannot know it)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PREFIX + "METRICS_PORT")
    if raw is None or raw == "":
        return ServerSettings.metrics_port
    port: int = _convert("metrics_port", "int", raw)
    return _checked_metrics_port(port)


def _checked_metrics_port(port: int) -> int:
    """A metrics port the server can take: -1 (none), 0 (a free one) or a TCP port; the one
    check of the server's setting and of what a client derives from it."""
    if not -1 <= port <= 65535:
        raise InvalidInput(f"metrics port {port} is not a TCP port")
    return port


def _convert(name: str, type_name: object, raw: str) -> Any:
    text = str(type_name)
    try:
        if "Path" in text:
            return Path(raw)
        if text == "int":
            return int(raw)
        if text == "float":
            return float(raw)
        if text == "bool":
            return parse_switch(name.lower(), raw)
    except InvalidInput as exc:
        raise InvalidInput(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc.message}") from None
    except ValueError:
        raise InvalidInput(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {text}") from None
    return raw


@dataclass(frozen=True)
class ClientSecurity:
    """How a client of edgewise's gRPC port (the CLI, the agent) connects: TLS with a CA bundle
    to trust (and a client certificate for mutual TLS), and a bearer token. Each field also reads
    ``EDGEWISE_CLIENT_<FIELD>``; a token goes in the environment or a file, never on a command
    line."""

    tls_ca: Path | None = None  # EDGEWISE_CLIENT_TLS_CA: PEM CA bundle; turns TLS on
    tls_cert: Path | None = None  # EDGEWISE_CLIENT_TLS_CERT: client certificate (mutual TLS)
    tls_key: Path | None = None  # EDGEWISE_CLIENT_TLS_KEY: its private key
    tls_server_name: str | None = None  # EDGEWISE_CLIENT_TLS_SERVER_NAME: name the cert must hold
    tls: bool = False  # EDGEWISE_CLIENT_TLS: TLS with the system's CA bundle
    token_file: Path | None = None  # EDGEWISE_CLIENT_TOKEN_FILE: first token of the file
    token: str | None = field(default=None, repr=False)  # EDGEWISE_CLIENT_TOKEN

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    @classmethod
    def from_sources(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ClientSecurity:
        """``EDGEWISE_CLIENT_*`` variables, then the non-None ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields(cls):
            raw = env.get(f"{ENV_PREFIX}CLIENT_{item.name.upper()}")
            if raw:
                values[item.name] = _convert(f"CLIENT_{item.name}", item.type, raw)
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        security = cls(**values)
        if (security.tls_cert is None) != (security.tls_key is None):
            raise InvalidInput("the client certificate and key go together: give both or neither")
        return security


def add_client_security_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that talks to a server: TLS and a bearer token (each also reads
    its ``EDGEWISE_CLIENT_*`` variable)."""
    group = parser.add_argument_group("connection security")
    group.add_argument(
        "--tls-ca", type=Path, help="PEM CA bundle to trust; turns TLS on [EDGEWISE_CLIENT_TLS_CA]"
    )
    group.add_argument("--tls-cert", type=Path, help="client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, help="client certificate's private key")
    group.add_argument("--tls-server-name", help="name the server's certificate must hold")
    group.add_argument(
        "--token-file", type=Path, help="bearer token file [EDGEWISE_CLIENT_TOKEN(_FILE)]"
    )


def client_security_from_args(args: argparse.Namespace) -> ClientSecurity:
    keys = ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file")
    return ClientSecurity.from_sources({k: getattr(args, k, None) for k in keys})
