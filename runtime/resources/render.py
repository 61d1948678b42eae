"""``edgewise containers``: render a profile as ``docker run`` flags, a compose service or a
Kubernetes Deployment, list the profiles, and the image's health check.

Every format carries the same things: the profile's CPU quota and memory limit (swap off), its
overrides as environment variables, the image's non-root user, a read-only root filesystem with a
small tmpfs at /tmp (the only writable path; HOME points there), the model repository mounted
read-only at /models, and the gRPC and metrics ports. Kubernetes gets requests equal to limits
(Guaranteed QoS, so the CPU quota is what the runtime sizes itself to), native gRPC probes on
the standard health service (startup and liveness on the server's overall status (""),
readiness on the inference service), a restricted security context (non-root, no capabilities,
no privilege escalation, RuntimeDefault seccomp, read-only root with an emptyDir at /tmp) and a
PodDisruptionBudget; compose gets the same health check as the image and memory reserved equal
to its limit.

The health check (``edgewise containers healthcheck``) imports only grpcio and the health stubs,
so it stays cheap under a small CPU quota.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edgewise.runtime.config.settings import (
    ClientSecurity,
    add_client_security_arguments,
    client_security_from_args,
)
from edgewise.runtime.errors import EdgewiseError, InvalidInput, Unavailable
from edgewise.runtime.resources.container_profiles import Profile, list_profiles, load_profile

__all__ = [
    "CONTAINER_GID",
    "CONTAINER_UID",
    "FORMATS",
    "INFERENCE_SERVICE",
    "RenderOptions",
    "add_containers",
    "docker_args",
    "healthcheck",
    "render",
    "to_yaml",
]

#: The image's user and group (numeric, so Kubernetes can verify runAsNonRoot).
CONTAINER_UID: Final = 10001
CONTAINER_GID: Final = 10001
MODELS_PATH: Final = "/models"
#: Size of the /tmp tmpfs (HOME; a JIT fallback of the kernels would keep its numba cache there).
TMPFS_MIB: Final = 64
INFERENCE_SERVICE: Final = "inference.GRPCInferenceService"
DEFAULT_MODELS_FOLDER: Final = "./model-repo"
DEFAULT_MODELS_CLAIM: Final = "edgewise-models"
FORMATS: Final = ("docker", "compose", "k8s")


@dataclass(frozen=True)
class RenderOptions:
    image: str = "edgewise:latest"
    name: str = "edgewise"
    # The model repository: a host folder (docker, compose; default ./model-repo) or the name of a
    # PersistentVolumeClaim (k8s; default edgewise-models).
    models: str | None = None
    port: int = 8001
    metrics_port: int = 8002
    network: str | None = None  # docker: --network (ports are published unless it is "host")
    grace_seconds: int = 15
    replicas: int = 1  # k8s: the Deployment's replicas (the PodDisruptionBudget follows)


def _environment(profile: Profile, options: RenderOptions) -> dict[str, str]:
    env = {
        "EDGEWISE_REPO": MODELS_PATH,
        "EDGEWISE_PORT": str(options.port),
        "EDGEWISE_METRICS_PORT": str(options.metrics_port),
    }
    env.update(profile.environment())
    return env


def _memory_flag(profile: Profile) -> str:
    mib = profile.memory_bytes >> 20
    if mib << 20 == profile.memory_bytes:
        return f"{mib}m"
    return str(profile.memory_bytes)


def _k8s_memory(profile: Profile) -> str:
    mib = profile.memory_bytes >> 20
    if mib << 20 != profile.memory_bytes:
        return str(profile.memory_bytes)
    return f"{mib >> 10}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _k8s_cpu(profile: Profile) -> str:
    millis = round(profile.cpus * 1000)
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def docker_args(profile: Profile, options: RenderOptions = RenderOptions()) -> list[str]:
    """``docker run`` / ``podman run`` arguments after ``run``, ending with the image and the
    ``serve`` command."""
    args = [
        "--detach",
        "--name",
        options.name,
        "--cpus",
        f"{profile.cpus:g}",
        "--memory",
        _memory_flag(profile),
        "--memory-swap",
        _memory_flag(profile),
        "--read-only",
        "--tmpfs",
        f"/tmp:rw,size={TMPFS_MIB}m,mode=1777",
        "--user",
        f"{CONTAINER_UID}:{CONTAINER_GID}",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--stop-timeout",
        str(options.grace_seconds),
    ]
    if options.port != RenderOptions.port:
        # The image's HEALTHCHECK asks 127.0.0.1:8001. Exec form (a JSON array, as podman takes
        # it): the runtime base has no shell for docker's string form.
        args += ["--health-cmd", json.dumps(_health_command(options.port))]
    if options.network:
        args += ["--network", options.network]
    if options.network != "host":
        args += ["--publish", f"{options.port}:{options.port}"]
        args += ["--publish", f"{options.metrics_port}:{options.metrics_port}"]
    args += ["--volume", f"{options.models or DEFAULT_MODELS_FOLDER}:{MODELS_PATH}:ro"]
    for key, value in _environment(profile, options).items():
        args += ["--env", f"{key}={value}"]
    args += [options.image, "serve"]
    return args


def _health_command(port: int) -> list[str]:
    return ["edgewise", "containers", "healthcheck", "--server", f"127.0.0.1:{port}"]


def _render_docker(profile: Profile, options: RenderOptions) -> str:
    args = docker_args(profile, options)
    lines = [f"# {profile.name}: {profile.description}", "docker run \\"]
    index = 0
    while index < len(args) - 2:
        arg = args[index]
        if (
            arg.startswith("--")
            and index + 1 < len(args) - 2
            and not args[index + 1].startswith("--")
        ):
            lines.append(f"  {arg} {shlex.quote(args[index + 1])} \\")
            index += 2
        else:
            lines.append(f"  {arg} \\")
            index += 1
    lines.append(f"  {shlex.quote(args[-2])} {args[-1]}")
    return "\n".join(lines) + "\n"


def _compose(profile: Profile, options: RenderOptions) -> dict[str, Any]:
    service: dict[str, Any] = {
        "image": options.image,
        "command": ["serve"],
        "cpus": profile.cpus,
        "mem_limit": _memory_flag(profile),
        "memswap_limit": _memory_flag(profile),
        "read_only": True,
        "tmpfs": [f"/tmp:size={TMPFS_MIB}m,mode=1777"],
        "user": f"{CONTAINER_UID}:{CONTAINER_GID}",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "mem_reservation": _memory_flag(profile),
        "healthcheck": {
            "test": ["CMD", *_health_command(options.port)],
            "interval": "10s",
            "timeout": "5s",
            "retries": 3,
            "start_period": "60s",
        },
        "ports": [
            f"{options.port}:{options.port}",
            f"{options.metrics_port}:{options.metrics_port}",
        ],
        "volumes": [f"{options.models or DEFAULT_MODELS_FOLDER}:{MODELS_PATH}:ro"],
        "environment": _environment(profile, options),
        "stop_grace_period": f"{options.grace_seconds}s",
        "restart": "unless-stopped",
    }
    return {"services": {options.name: service}}


def _k8s(profile: Profile, options: RenderOptions) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": options.name, "edgewise/profile": profile.name}
    claim = options.models or DEFAULT_MODELS_CLAIM
    resources = {"cpu": _k8s_cpu(profile), "memory": _k8s_memory(profile)}
    container: dict[str, Any] = {
        "name": "edgewise",
        "image": options.image,
        "args": ["serve"],
        "ports": [
            {"name": "grpc", "containerPort": options.port},
            {"name": "metrics", "containerPort": options.metrics_port},
        ],
        "env": [{"name": k, "value": v} for k, v in _environment(profile, options).items()],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "startupProbe": {
            "grpc": {"port": options.port},
            "periodSeconds": 2,
            "failureThreshold": 60,
        },
        "livenessProbe": {
            "grpc": {"port": options.port},
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "grpc": {"port": options.port, "service": INFERENCE_SERVICE},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "securityContext": {
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "models", "mountPath": MODELS_PATH, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": options.name, "labels": labels},
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(options.metrics_port),
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": options.grace_seconds,
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": CONTAINER_UID,
                        "runAsGroup": CONTAINER_GID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "models", "persistentVolumeClaim": {"claimName": claim}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": f"{TMPFS_MIB}Mi"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": options.name, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "grpc", "port": options.port, "targetPort": "grpc"},
                {"name": "metrics", "port": options.metrics_port, "targetPort": "metrics"},
            ],
        },
    }
    # At most one pod evicted at a time by a drain or an upgrade; with one replica that one may
    # go (a budget of zero would block every node drain). A pod that is not ready may always be
    # evicted: it serves nobody.
    budget = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": options.name, "labels": labels},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": labels},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    return [deployment, service, budget]


# ---- a small YAML emitter (block style; strings quoted unless plainly safe) ---------------------

_PLAIN: Final = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")
_RESERVED: Final = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    if value is None:
        return "null"
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def _emit(value: object, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, Mapping):
        for key, item in value.items():
            if (isinstance(item, Mapping) and item) or (isinstance(item, list) and item):
                lines.append(f"{pad}{_scalar(key)}:")
                _emit(item, indent + 2, lines)
            else:
                lines.append(f"{pad}{_scalar(key)}: {_inline(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Mapping) and item:
                nested: list[str] = []
                _emit(item, indent + 2, nested)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")


def _inline(value: object) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(document: Mapping[str, Any]) -> str:
    lines: list[str] = []
    _emit(document, 0, lines)
    return "\n".join(lines) + "\n"


def render(profile: Profile, fmt: str, options: RenderOptions = RenderOptions()) -> str:
    """``profile`` in ``fmt`` (docker, compose or k8s), as text ready to save or run."""
    header = f"# edgewise profile {profile.name}: {profile.description}\n"
    if fmt == "docker":
        return _render_docker(profile, options)
    if fmt == "compose":
        return header + to_yaml(_compose(profile, options))
    if fmt == "k8s":
        return header + "---\n".join(to_yaml(doc) for doc in _k8s(profile, options))
    raise InvalidInput(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


# ---- health check ---------------------------------------------------------------------------


def healthcheck(
    target: str, service: str = "", timeout: float = 3.0, security: ClientSecurity | None = None
) -> str:
    """The serving status of ``service`` at ``target`` (``SERVING``, ``NOT_SERVING``, ...), over
    TLS and with a token as ``security`` says (default: the ``EDGEWISE_CLIENT_*`` variables)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from edgewise.runtime.config.channels import client_channel

    security = security if security is not None else ClientSecurity.from_sources()
    channel, metadata = client_channel(target, security)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            response = stub.Check(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            detail = f"{exc.code().name}: {exc.details()}"
            raise Unavailable(f"health check of {target}: {detail}") from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


# ---- command line ---------------------------------------------------------------------------


def add_containers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "containers",
        help="render profiles for docker, compose and Kubernetes; the image's health check",
        description="Container profiles (containers/profiles/*.toml) as deployment files, and "
        "the health check the image runs.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    render_p = actions.add_parser(
        "render",
        help="a profile as docker run flags, a compose service or a Kubernetes Deployment",
    )
    render_p.add_argument("--profile", required=True, help="profile name or .toml path")
    render_p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    render_p.add_argument("--profiles-dir", type=Path, help="folder of profiles")
    render_p.add_argument("--image", default=RenderOptions.image, help="image reference")
    render_p.add_argument("--name", default=RenderOptions.name, help="container/app name")
    render_p.add_argument(
        "--models",
        help=f"model repository: host folder for docker and compose (default "
        f"{DEFAULT_MODELS_FOLDER}), PersistentVolumeClaim for k8s (default {DEFAULT_MODELS_CLAIM})",
    )
    render_p.add_argument("--port", type=int, default=RenderOptions.port)
    render_p.add_argument("--metrics-port", type=int, default=RenderOptions.metrics_port)
    render_p.add_argument(
        "--replicas",
        type=_replicas,
        default=RenderOptions.replicas,
        help="k8s: pods of the Deployment (default 1); the PodDisruptionBudget lets one go at "
        "a time",
    )
    render_p.set_defaults(handler=_cmd_render)
    list_p = actions.add_parser("profiles", help="list the profiles and their split")
    list_p.add_argument("--profiles-dir", type=Path, help="folder of profiles")
    list_p.set_defaults(handler=_cmd_profiles)
    health = actions.add_parser(
        "healthcheck",
        help="exit 0 when the server's gRPC health service reports SERVING",
    )
    health.add_argument(
        "--server",
        default=f"127.0.0.1:{os.environ.get('EDGEWISE_PORT') or 8001}",
        help="HOST:PORT (default 127.0.0.1 and EDGEWISE_PORT, else 8001: the server's own port "
        "in a container that sets it)",
    )
    health.add_argument("--service", default="", help="health service name (default: overall)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    add_client_security_arguments(health)
    health.set_defaults(handler=_cmd_healthcheck)


def _replicas(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--replicas: a whole number of at least 1, not {text!r}")
    return value


def _dirs(args: argparse.Namespace) -> Sequence[Path] | None:
    return [args.profiles_dir] if args.profiles_dir else None


def _cmd_render(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile, _dirs(args))
    options = RenderOptions(
        image=args.image,
        name=args.name,
        models=args.models,
        port=args.port,
        metrics_port=args.metrics_port,
        replicas=args.replicas,
    )
    print(render(profile, args.fmt, options), end="")
    return 0


def _cmd_profiles(args: argparse.Namespace) -> int:
    profiles = list_profiles(_dirs(args))
    if not profiles:
        raise EdgewiseError(
            "no profiles found in the folders given (--profiles-dir) nor in the package"
        )
    print(f"{'PROFILE':<14} {'CPU':>5} {'MEMORY':>10}  WORKERS  INTRA  INFLIGHT  DESCRIPTION")
    for profile in profiles:
        budget = profile.budget()
        print(
            f"{profile.name:<14} {profile.cpus:>5g} {profile.summary().split(', ')[1]:>10}  "
            f"{budget.worker_threads:>7}  {budget.intra_op_threads:>5}  "
            f"{budget.max_inflight:>8}  {profile.description}"
        )
    return 0


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    status = healthcheck(args.server, args.service, args.timeout, client_security_from_args(args))
    print(status)
    return 0 if status == "SERVING" else 1
