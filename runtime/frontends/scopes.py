"""The scope each call needs: one table for every RPC and every HTTP route.

A credential (a bearer token, see :class:`~edgewise.runtime.config.channels.TokenEntry`) holds a
set of scopes from :data:`~edgewise.runtime.config.channels.SCOPES`; a call is let through when
the credential holds the scope of its method here. An HTTP route declares the RPC it answers
(``POST /v2/models/{name}/infer`` is ModelInfer), so both wires read this one table. A method
that is not in the table needs ``admin``: a new RPC is closed until it is given a scope here.
"""

from __future__ import annotations

from typing import Final

from edgewise.runtime.config.channels import SCOPES

__all__ = ["HTTP_ROUTES", "METHOD_SCOPES", "METRICS_SCRAPE", "UNLISTED_SCOPE", "scope_of"]

_V2: Final = "/inference.GRPCInferenceService/"
_REPOSITORY: Final = "/edgewise.v1.ModelRepositoryService/"
_MONITORING: Final = "/edgewise.v1.MonitoringService/"
_QUALITY: Final = "/edgewise.v1.QualityService/"
_ROLLOUT: Final = "/edgewise.v1.RolloutService/"

#: Not an RPC: ``GET /metrics`` on the metrics port with ``--metrics-auth`` (metrics_http.py),
#: named like one so that this table holds its scope too.
METRICS_SCRAPE: Final = "/edgewise.metrics/Scrape"

#: Full gRPC method name -> the scope a call of it needs.
METHOD_SCOPES: Final[dict[str, str]] = {
    f"{_V2}ServerLive": "read",
    f"{_V2}ServerReady": "read",
    f"{_V2}ModelReady": "read",
    f"{_V2}ServerMetadata": "read",
    f"{_V2}ModelMetadata": "read",
    f"{_V2}ModelInfer": "infer",
    f"{_REPOSITORY}RepositoryIndex": "read",
    f"{_REPOSITORY}LoadModel": "admin",
    f"{_REPOSITORY}UnloadModel": "admin",
    f"{_MONITORING}GetDriftReport": "read",
    f"{_MONITORING}GetFeatureStatistics": "read",
    f"{_MONITORING}ResetWindow": "admin",
    # Ground truth comes from the applications that asked for the predictions.
    f"{_QUALITY}SubmitFeedback": "infer",
    f"{_QUALITY}GetQuality": "read",
    f"{_QUALITY}ResetQuality": "admin",
    f"{_ROLLOUT}GetRollout": "read",
    f"{_ROLLOUT}SetTrafficSplit": "admin",
    f"{_ROLLOUT}SetShadow": "admin",
    f"{_ROLLOUT}SetVersionLabel": "admin",
    # A sibling process's share of a drift window or of a shadow's figures, asked for with the
    # caller's credential on behalf of a GetDriftReport or GetRollout (frontends/peer_windows.py).
    "/edgewise.internal.PeerMonitoring/WindowShare": "read",
    "/edgewise.internal.PeerMonitoring/ShadowShare": "read",
    "/grpc.health.v1.Health/Check": "read",
    "/grpc.health.v1.Health/Watch": "read",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "read",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "read",
    METRICS_SCRAPE: "read",
}

#: The scope of a method the table does not list.
UNLISTED_SCOPE: Final = "admin"

#: HTTP route (method and path pattern) -> the RPC it answers (its scope is that RPC's).
HTTP_ROUTES: Final[dict[tuple[str, str], str]] = {
    ("GET", "/v2/health/live"): f"{_V2}ServerLive",
    ("GET", "/v2/health/ready"): f"{_V2}ServerReady",
    ("GET", "/v2"): f"{_V2}ServerMetadata",
    **{
        route: method
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
        for route, method in (
            (("GET", model), f"{_V2}ModelMetadata"),
            (("GET", f"{model}/ready"), f"{_V2}ModelReady"),
            (("POST", f"{model}/infer"), f"{_V2}ModelInfer"),
        )
    },
}

assert set(METHOD_SCOPES.values()) <= set(SCOPES)


def scope_of(method: str) -> str:
    """The scope a call of ``method`` (a full gRPC method name) needs."""
    return METHOD_SCOPES.get(method, UNLISTED_SCOPE)
