"""A small client of edgewise's own over the generated stubs (used by the CLI, the demo, tests and
the agent). tritonclient and any other Open Inference Protocol client work too; this one adds the
repository service and needs nothing beyond grpcio.

Note: this module registers the ``inference`` protobuf package in the process's default descriptor
pool, as tritonclient's generated code also does, so the two cannot be imported into one process.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgewise.runtime.config.channels import client_channel, retry_after_ms
from edgewise.runtime.config.settings import ClientSecurity
from edgewise.runtime.errors import EdgewiseError, Unavailable
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2_grpc as epb_grpc
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from edgewise.runtime.serving.codecs import decode_outputs, encode_inputs

__all__ = ["EdgewiseClient", "InferResult", "ServerError"]


class ServerError(EdgewiseError):
    """The server answered with a non-OK gRPC status (``retry_after_ms``: the server's retry
    hint of a RESOURCE_EXHAUSTED, when it gave one)."""

    def __init__(
        self, status: grpc.StatusCode, details: str, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(f"{status.name}: {details}")
        self.status = status
        self.details = details
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    id: str
    outputs: dict[str, npt.NDArray[Any]]


#: What gRPC's core says when no connection to the server could be made; an UNAVAILABLE the
#: server itself answered (a model loading, a feature store down) says none of these, and a
#: connection lost mid-call (the server died: "Socket closed") stays the call's UNAVAILABLE.
_TRANSPORT_FAILURES = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "dns resolution failed",
    "ssl handshake failed",
)


def _unreachable(details: str) -> bool:
    """Whether an UNAVAILABLE with ``details`` means the server could not be reached at all."""
    lowered = details.lower()
    return any(phrase in lowered for phrase in _TRANSPORT_FAILURES)


class EdgewiseClient:
    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        security: ClientSecurity | None = None,
    ) -> None:
        """``security`` (TLS and a bearer token) defaults to the ``EDGEWISE_CLIENT_*``
        variables; without any, the channel is plaintext and sends no token."""
        self.target = target
        self.timeout = timeout
        security = security if security is not None else ClientSecurity.from_sources()
        self.channel, self._metadata = client_channel(
            target,
            security,
            [
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.inference = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.repository = epb_grpc.ModelRepositoryServiceStub(self.channel)
        self.monitoring = epb_grpc.MonitoringServiceStub(self.channel)
        self.quality = epb_grpc.QualityServiceStub(self.channel)
        self.rollout = epb_grpc.RolloutServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> EdgewiseClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            code = exc.code()
            details = exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and _unreachable(details):
                raise Unavailable(f"cannot reach the server at {self.target}: {details}") from None
            hint = None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                trailing = getattr(exc, "trailing_metadata", None)
                hint = retry_after_ms(trailing() if callable(trailing) else None)
            raise ServerError(code, details, hint) from None

    # ---- health and metadata -------------------------------------------------------------------

    def server_live(self) -> bool:
        return bool(self._call(self.inference.ServerLive, pb.ServerLiveRequest()).live)

    def server_ready(self) -> bool:
        return bool(self._call(self.inference.ServerReady, pb.ServerReadyRequest()).ready)

    def model_ready(self, name: str, version: str = "") -> bool:
        request = pb.ModelReadyRequest(name=name, version=version)
        return bool(self._call(self.inference.ModelReady, request).ready)

    def health_status(self, service: str = "") -> str:
        response = self._call(self.health.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, timeout: float = 30.0) -> None:
        """Poll the health service (with short backoff) until it reports SERVING."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health_status()
                if last == "SERVING":
                    return
            except EdgewiseError as exc:
                last = exc.message
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise Unavailable(f"server at {self.target} not SERVING after {timeout:.0f} s: {last}")

    def server_metadata(self) -> pb.ServerMetadataResponse:
        result: pb.ServerMetadataResponse = self._call(
            self.inference.ServerMetadata, pb.ServerMetadataRequest()
        )
        return result

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        request = pb.ModelMetadataRequest(name=name, version=version)
        result: pb.ModelMetadataResponse = self._call(self.inference.ModelMetadata, request)
        return result

    # ---- inference -----------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.NDArray[Any]],
        *,
        version: str = "",
        outputs: Sequence[str] = (),
        request_id: str = "",
        raw: bool = True,
        timeout: float | None = None,
    ) -> InferResult:
        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        encode_inputs(request, inputs, raw=raw)
        for name in outputs:
            request.outputs.add(name=name)
        response: pb.ModelInferResponse = self._call(self.inference.ModelInfer, request, timeout)
        return InferResult(
            model_name=response.model_name,
            model_version=response.model_version,
            id=response.id,
            outputs=decode_outputs(response),
        )

    # ---- repository ----------------------------------------------------------------------------

    def repository_index(self, ready_only: bool = False) -> list[epb.ModelVersionState]:
        request = epb.RepositoryIndexRequest(ready_only=ready_only)
        return list(self._call(self.repository.RepositoryIndex, request).models)

    def load_model(
        self,
        name: str,
        version: str = "",
        make_default: bool = False,
        timeout: float = 120.0,
        *,
        transient_default: bool = False,
    ) -> list[epb.ModelVersionState]:
        """LoadModel; ``transient_default`` (with ``make_default``): the default of the running
        server only, ``config.json`` left as it is."""
        request = epb.LoadModelRequest(
            name=name,
            version=version,
            make_default=make_default,
            transient_default=transient_default,
        )
        return list(self._call(self.repository.LoadModel, request, timeout).models)

    # ---- monitoring ----------------------------------------------------------------------------

    def drift_report(
        self, model: str, version: str = "", window: str = "current", exact: bool = False
    ) -> epb.DriftReport:
        request = epb.DriftReportRequest(model=model, version=version, window=window, exact=exact)
        report: epb.DriftReport = self._call(self.monitoring.GetDriftReport, request)
        return report

    def feature_statistics(
        self, model: str, version: str = "", window: str = "current"
    ) -> epb.DriftReport:
        request = epb.DriftReportRequest(model=model, version=version, window=window)
        report: epb.DriftReport = self._call(self.monitoring.GetFeatureStatistics, request)
        return report

    def reset_window(self, model: str, version: str = "") -> None:
        self._call(
            self.monitoring.ResetWindow, epb.ResetWindowRequest(model=model, version=version)
        )

    # ---- quality ----------------------------------------------------------------------------

    def submit_feedback(
        self,
        model: str,
        labels: Sequence[tuple[str, int, int | float | str]],
        version: str = "",
    ) -> epb.FeedbackResponse:
        """Ground truth for earlier requests: ``(request_id, row, label)`` triples; without a
        ``version`` each label goes to the served version that kept its request id."""
        request = epb.FeedbackRequest(model=model, version=version)
        for request_id, row, truth in labels:
            label = request.labels.add(request_id=request_id, row=row)
            if isinstance(truth, str):
                label.class_name = truth
            elif isinstance(truth, int | np.integer):
                label.class_index = int(truth)
            else:
                label.value = float(truth)
        response: epb.FeedbackResponse = self._call(self.quality.SubmitFeedback, request)
        return response

    def quality_report(self, model: str, version: str = "") -> epb.QualityReport:
        """The online quality of a model version (a read: changes nothing)."""
        request = epb.QualityRequest(model=model, version=version)
        report: epb.QualityReport = self._call(self.quality.GetQuality, request)
        return report

    def reset_quality(self, model: str, version: str = "") -> None:
        """Acknowledge the change detections: ``drifting`` starts over."""
        request = epb.ResetQualityRequest(model=model, version=version)
        self._call(self.quality.ResetQuality, request)

    def unload_model(self, name: str, version: str = "") -> list[epb.ModelVersionState]:
        request = epb.UnloadModelRequest(name=name, version=version)
        return list(self._call(self.repository.UnloadModel, request).models)

    # ---- rollout (docs/rollout.md) -------------------------------------------------------------

    def get_rollout(self, model: str) -> epb.Rollout:
        result: epb.Rollout = self._call(
            self.rollout.GetRollout, epb.GetRolloutRequest(model=model)
        )
        return result

    def set_traffic_split(
        self, model: str, weights: Sequence[tuple[str, int]], sticky_key: str = ""
    ) -> epb.Rollout:
        """Share ``model``'s requests that name no version by ``weights`` ((version or label,
        percent) pairs summing to 100); none: no split."""
        request = epb.SetTrafficSplitRequest(model=model, sticky_key=sticky_key)
        for version, weight in weights:
            request.weights.add(version=version, weight=weight)
        result: epb.Rollout = self._call(self.rollout.SetTrafficSplit, request)
        return result

    def set_shadow(self, model: str, version: str, rate: float = 1.0) -> epb.Rollout:
        """Copy a share ``rate`` of ``model``'s answered requests to ``version``; "" stops."""
        request = epb.SetShadowRequest(model=model, version=version, rate=rate)
        result: epb.Rollout = self._call(self.rollout.SetShadow, request)
        return result

    def set_version_label(self, model: str, label: str, version: str) -> epb.Rollout:
        """Point ``label`` at ``version`` (a number or label); "" removes it."""
        request = epb.SetVersionLabelRequest(model=model, label=label, version=version)
        result: epb.Rollout = self._call(self.rollout.SetVersionLabel, request)
        return result
