"""The composition root: every part of a server made from its settings, in the order the parts
depend on each other, each given what it needs when it is made.

    settings -> security (trusted keys, tokens, TLS) -> repository -> core -> front ends

Nothing is set on a part after it exists (a repository used to get its trusted keys as an
attribute, set after construction and before the first load: an ordering nobody could see).
One count crosses the order: the native front end's calls in flight, which C++ counts once the
front end runs; the shedder and the core are given a function that reads it (0 before then).
:class:`~edgewise.runtime.app.server.InferenceServer` calls these in that order and runs what
they make: binds, starts, drains. Its own module, not ``app/__init__``: the supervisor of
``serve --processes N`` lives in app/ too and must not load the server's graph to start.

This is also where the settings meet the layers above config/: the flags' version policy and
onnxruntime session settings become the package's and the serving core's own types here (see
:func:`version_policy`, and :meth:`SessionSettings.of
<edgewise.runtime.serving.model.SessionSettings.of>`, which batch and gate use too).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from edgewise.runtime.config.channels import parse_call_limits
from edgewise.runtime.config.limits import describe_split, detect_limits, publish_budget
from edgewise.runtime.config.settings import BUDGET_FIELDS, ServerSettings
from edgewise.runtime.errors import InvalidInput
from edgewise.runtime.frontends.audit import AuditInterceptor
from edgewise.runtime.frontends.audit_log import AuditLog
from edgewise.runtime.frontends.grpcio import (
    InferenceServicer,
    MonitoringServicer,
    QualityServicer,
    RepositoryServicer,
)
from edgewise.runtime.frontends.http_tls import server_ssl_context
from edgewise.runtime.frontends.peer_windows import window_share_handler
from edgewise.runtime.frontends.ports import start_metrics_http
from edgewise.runtime.frontends.rollout_grpc import RolloutServicer
from edgewise.runtime.frontends.security import (
    HEALTH_PREFIX,
    REFLECTION_PREFIXES,
    AuthInterceptor,
    TokenSet,
    server_credentials,
)
from edgewise.runtime.frontends.wire import parsing_inside
from edgewise.runtime.package.model_config import VersionPolicy, read_model_config
from edgewise.runtime.package.signing import TrustedKeys
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.admission import CallQuotas, MemoryAdmission
from edgewise.runtime.serving.alerts import AlertHook
from edgewise.runtime.serving.capture import Capture, CaptureSettings, rate_from_config
from edgewise.runtime.serving.dataplane import DataPlane
from edgewise.runtime.serving.drift_history import RecordingPublisher, history_from_environment
from edgewise.runtime.serving.metrics import ServerMetrics
from edgewise.runtime.serving.model import SessionSettings
from edgewise.runtime.serving.monitor_config import MonitorConfig
from edgewise.runtime.serving.pipeline import InferenceCore
from edgewise.runtime.serving.repository import ModelRepository
from edgewise.runtime.serving.rollout import Rollouts
from edgewise.runtime.serving.shadow import Shadow
from edgewise.runtime.serving.shedding import (
    LoadShedder,
    backstop_limit,
    pending_limits,
    service_handlers,
)

__all__ = [
    "INFERENCE_SERVICE",
    "REPOSITORY_SERVICE",
    "Security",
    "check_settings",
    "data_capture",
    "grpc_server",
    "load_shedder",
    "memory_admission",
    "model_repository",
    "publish_split",
    "rollouts",
    "security",
    "start_metrics_port",
    "token_check",
    "version_policy",
]

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
REPOSITORY_SERVICE = epb.DESCRIPTOR.services_by_name["ModelRepositoryService"].full_name
MONITORING_SERVICE = epb.DESCRIPTOR.services_by_name["MonitoringService"].full_name
QUALITY_SERVICE = epb.DESCRIPTOR.services_by_name["QualityService"].full_name
ROLLOUT_SERVICE = epb.DESCRIPTOR.services_by_name["RolloutService"].full_name

_LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


def version_policy(settings: ServerSettings) -> VersionPolicy:
    """The versions a model without a config.json policy serves (``--version-policy``)."""
    return VersionPolicy.parse(settings.version_policy)


def check_settings(settings: ServerSettings) -> None:
    """The checks of ``settings`` that need the layers above config/ (the version policy's
    grammar is the package's): before anything is made or any process started."""
    version_policy(settings)
    if settings.capture_dir is not None:
        _check_capture(settings)


def _check_capture(settings: ServerSettings) -> None:
    """Data capture can run: pyarrow is installed, the folder can be written, and every
    model's ``config.json`` capture section is valid (one line naming what is wrong)."""
    from edgewise.runtime._fs import write_bytes_atomic
    from edgewise.runtime.serving.capture import require_pyarrow

    require_pyarrow()
    folder = settings.capture_dir
    assert folder is not None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".edgewise-write-check"
        write_bytes_atomic(probe, b"")
        probe.unlink()
    except OSError as exc:
        raise InvalidInput(
            f"capture-dir {folder}: cannot write there ({exc.strerror or exc})"
        ) from None
    if settings.repo.is_dir():
        policy = version_policy(settings)
        for model_dir in sorted(p for p in settings.repo.iterdir() if p.is_dir()):
            if model_dir.name.startswith("."):
                continue
            config = read_model_config(model_dir, policy)
            rate_from_config(config.capture, settings.capture_rate, str(model_dir / "config.json"))


def data_capture(
    settings: ServerSettings, metrics: ServerMetrics, repository: ModelRepository
) -> Capture | None:
    """The data capture of ``serve --capture-dir`` (None: off): each model's rate is its
    ``config.json``'s ``capture.rate``, else ``--capture-rate``, read when a version first
    answers."""
    if settings.capture_dir is None:
        return None
    default = settings.capture_rate

    def rate_of(name: str) -> float:
        config = repository.config_for(name)
        return rate_from_config(config.capture, default, f"{name}/config.json")

    capture = Capture(
        CaptureSettings(
            settings.capture_dir,
            rate=default,
            max_bytes=settings.capture_max_bytes,
            queue_records=settings.capture_queue,
            queue_bytes=settings.capture_queue_bytes,
            flush_seconds=settings.capture_flush_seconds,
        ),
        metrics.registry,
        rate_of,
    )
    log.info(
        "data capture on: %s, rate %g (config.json capture.rate overrides), cap %d bytes",
        settings.capture_dir,
        default,
        settings.capture_max_bytes,
    )
    return capture


def rollouts(repository: ModelRepository, dataplane: DataPlane, metrics: ServerMetrics) -> Rollouts:
    """Splits, shadows and labels (docs/rollout.md), wired into the repository (labels resolve
    wherever a version is given) and the data plane (splits pick a version)."""
    result = Rollouts(repository, metrics.registry, lambda: Shadow(repository, metrics.registry))
    repository.labels = result.label
    dataplane.rollouts = result
    return result


def publish_split(settings: ServerSettings, metrics: ServerMetrics) -> None:
    """The runtime budget's split in use (derived, or as set explicitly): a metric and a log."""
    split: dict[str, int | bool] = settings.budget.split() if settings.budget else {}
    split.update({name: getattr(settings, name) for name in BUDGET_FIELDS})
    limits = detect_limits()
    publish_budget(metrics.registry, limits, split)
    log.info("%s", describe_split(limits, split))


@dataclass(frozen=True)
class Security:
    """What the settings ask of packages and callers, loaded and checked before anything
    serves: every problem is one readable error at start-up."""

    #: Packages must be signed by one of these (None: signatures not required).
    trusted_keys: TrustedKeys | None
    #: The bearer-token check of every front end (None: no tokens).
    auth: AuthInterceptor | None
    #: The gRPC port's TLS (None: plaintext); the native and HTTP front ends read the same files.
    credentials: grpc.ServerCredentials | None


def security(settings: ServerSettings, metrics: ServerMetrics) -> Security:
    return Security(
        trusted_keys=_trusted_keys(settings),
        auth=_auth(settings, metrics),
        credentials=_credentials(settings),
    )


def _trusted_keys(settings: ServerSettings) -> TrustedKeys | None:
    if settings.trusted_keys is None:
        return None
    trusted = TrustedKeys.load(settings.trusted_keys)
    log.info(
        "model packages must be signed by one of %d trusted key(s) from %s: %s",
        len(trusted),
        settings.trusted_keys,
        ", ".join(trusted),
    )
    return trusted


def _auth(settings: ServerSettings, metrics: ServerMetrics) -> AuthInterceptor | None:
    auth = token_check(settings, metrics.registry)
    if auth is None:
        return None
    default = parse_call_limits(settings.credential_limits.split(), "credential-limits")
    if default.share is not None and settings.max_inflight <= 0:
        raise InvalidInput("credential-limits: share needs an in-flight limit (max-inflight)")
    # Always there: a tokens-file line may give a credential limits at any reload.
    auth.quotas = CallQuotas(
        default, settings.max_inflight, settings.retry_after_ms, metrics.registry
    )
    if default.any:
        log.info("every credential's limits of inference calls: %s", settings.credential_limits)
    return auth


def token_check(settings: ServerSettings, registry: CollectorRegistry) -> AuthInterceptor | None:
    """The bearer-token (and scope) check the settings ask for, counting in ``registry``;
    None without tokens."""
    if not settings.auth_enabled:
        return None
    tokens = TokenSet(settings.tokens_file, settings.tokens)
    open_prefixes = [HEALTH_PREFIX] if settings.health_open else []
    if settings.reflection_open:
        open_prefixes.extend(REFLECTION_PREFIXES)
    auth = AuthInterceptor(tokens, open_prefixes, registry)
    log.info(
        "bearer-token authentication on (%d token(s)); open without a token: %s",
        len(tokens),
        ", ".join(p.strip("/").split("/")[0] for p in open_prefixes) or "nothing",
    )
    if settings.tls_cert is None and settings.host not in _LOCAL_HOSTS:
        log.warning("tokens travel in clear text without TLS (--tls-cert/--tls-key)")
    return auth


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    log.info(
        "TLS on the gRPC port%s",
        " with client certificates required (mutual TLS)" if settings.tls_client_ca else "",
    )
    return credentials


def start_metrics_port(
    settings: ServerSettings, registry: CollectorRegistry, auth: AuthInterceptor | None
) -> WSGIServer:
    """The metrics port serving ``registry``: behind the token check with ``--metrics-auth``
    (``auth``, the gRPC port's, when there is one; else one of its own counting in
    ``registry``), over the port's TLS files with ``--metrics-tls``."""
    guard = None
    if settings.metrics_auth:
        guard = auth if auth is not None else token_check(settings, registry)
    context = None
    if settings.metrics_tls and settings.tls_cert is not None and settings.tls_key is not None:
        context = server_ssl_context(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca, port="metrics port"
        )
    server = start_metrics_http(
        settings.metrics_port, settings.metrics_host, registry, auth=guard, ssl_context=context
    )
    if guard is not None or context is not None:
        log.info(
            "metrics port: %s",
            ", ".join(
                part
                for part, on in (("TLS", context is not None), ("token with scope read", guard))
                if on
            ),
        )
    return server


def load_shedder(
    settings: ServerSettings, metrics: ServerMetrics, elsewhere: Callable[[], int]
) -> LoadShedder | None:
    """The in-flight limit of every front end's inference calls (None: ``--max-inflight 0``).
    ``elsewhere``: the calls it does not count itself (the native front end's, counted in C++)."""
    if settings.max_inflight <= 0:
        return None
    return LoadShedder(
        settings.max_inflight,
        settings.retry_after_ms,
        frozenset({f"/{INFERENCE_SERVICE}/ModelInfer"}),
        metrics.registry,
        elsewhere=elsewhere,
    )


def memory_admission(settings: ServerSettings, metrics: ServerMetrics) -> MemoryAdmission:
    return MemoryAdmission(
        settings.memory_budget_bytes, enabled=settings.admission, registry=metrics.registry
    )


def model_repository(
    settings: ServerSettings,
    metrics: ServerMetrics,
    trusted_keys: TrustedKeys | None,
    alerts: AlertHook,
) -> ModelRepository:
    """The served model set (nothing loaded yet), publishing its events and judgements to
    ``metrics``; each closed drift window also goes to the drift history (docs/monitoring.md)."""
    history = history_from_environment(settings.repo)
    drift_publisher = metrics if history is None else RecordingPublisher(metrics, history)

    def on_event(name: str, version: int, event: str) -> None:
        metrics.model_event(name, version, event)
        metrics.models_ready.set(len(repository.served_models()))

    repository = ModelRepository(
        settings.repo,
        SessionSettings.of(settings),
        version_policy(settings),
        on_event=on_event,
        monitor_defaults=MonitorConfig(enabled=settings.monitoring),
        quality_enabled=settings.quality,
        on_alert=alerts.fire,
        drift_publisher=drift_publisher,
        quality_publisher=metrics,
        performance_publisher=metrics,
        trusted_keys=trusted_keys,
    )
    repository.metrics_registry = metrics.registry  # feature lookups count there
    return repository


def grpc_server(
    settings: ServerSettings,
    auth: AuthInterceptor | None,
    shedder: LoadShedder | None,
    core: InferenceCore,
    repository: ModelRepository,
    executor: ThreadPoolExecutor,
    health: HealthServicer,
    on_repository_change: Callable[[], Awaitable[None]],
    peers: Callable[[], list[str]] | None,
    capture: Capture | None = None,
    rollouts: Rollouts | None = None,
) -> grpc.aio.Server:
    """The grpc.aio server with every service (not bound, not started): inference (behind the
    shedder, which refuses past the limit), repository, monitoring, quality, health and
    reflection, each parsing its own requests (see wire.py). ``peers``: the sibling processes'
    control addresses (multi-process mode), which ask this one for its share of a window."""
    limit = settings.max_message_bytes
    interceptors: list[grpc.aio.ServerInterceptor] = [] if auth is None else [auth]
    if auth is not None:  # the credential, then the shedder, then the credential's quota
        auth.shedder = shedder
    if settings.audit_log is not None:  # outside the token check: refusals are recorded too
        audit_log = AuditLog(
            settings.audit_log, settings.audit_log_max_bytes, registry=core.metrics.registry
        )
        interceptors.insert(0, AuditInterceptor(audit_log, auth))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
            *pending_limits(settings.max_inflight),
        ],
        # Our shedder answers past max_inflight (with a retry hint, counted); gRPC's own cap
        # is only a backstop for every kind of call.
        maximum_concurrent_rpcs=backstop_limit(settings.max_inflight),
    )
    service, handlers = _inference_handlers(InferenceServicer(core))
    if shedder is None:
        _register(server, service, handlers)
    else:  # the shedder serves the inference service and refuses past its limit
        shedder.add_service(service, handlers)
        server.add_generic_rpc_handlers((shedder,))
    control = (repository, executor)
    repository_servicer = RepositoryServicer(repository, executor, on_repository_change, peers)
    monitoring = MonitoringServicer(*control, peers=peers)
    if peers is not None:  # siblings ask for this process's share of a drift window
        server.add_generic_rpc_handlers((window_share_handler(*control, rollouts),))
    for add_to_server, servicer in (
        (epb_grpc.add_ModelRepositoryServiceServicer_to_server, repository_servicer),
        (epb_grpc.add_MonitoringServiceServicer_to_server, monitoring),
        (epb_grpc.add_QualityServiceServicer_to_server, QualityServicer(*control, capture)),
        (health_pb2_grpc.add_HealthServicer_to_server, health),
        *(
            (
                (
                    epb_grpc.add_RolloutServiceServicer_to_server,
                    RolloutServicer(rollouts, executor, peers),
                ),
            )
            if rollouts is not None
            else ()
        ),
    ):
        service, handlers = service_handlers(add_to_server, servicer)
        _register(server, service, parsing_inside(handlers))
    reflection.enable_server_reflection(
        (
            INFERENCE_SERVICE,
            REPOSITORY_SERVICE,
            MONITORING_SERVICE,
            QUALITY_SERVICE,
            ROLLOUT_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return server


def _inference_handlers(
    inference: InferenceServicer,
) -> tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]]:
    """The inference service's name and handlers, every one parsing its own request (see
    wire.py); ModelInfer takes its request as bytes (see InferenceServicer.infer_bytes)."""
    add_to_server = pb_grpc.add_GRPCInferenceServiceServicer_to_server
    service, handlers = service_handlers(add_to_server, inference)
    handlers = parsing_inside(handlers)
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        inference.infer_bytes, response_serializer=pb.ModelInferResponse.SerializeToString
    )
    return service, handlers


def _register(
    server: grpc.aio.Server, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    """Serve ``handlers`` of ``service``, as generated ``add_..._to_server`` functions do."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
