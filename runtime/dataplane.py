"""The transport-neutral data plane: live, ready, metadata and infer.

The gRPC servicer (and any future transport) calls these methods and maps the
:class:`~edgewise.runtime.errors.EdgewiseError` they raise to its own status codes. Nothing here
knows about gRPC beyond the V2 protocol messages themselves.
"""

from __future__ import annotations

import time
from typing import Any, Final

import numpy.typing as npt

from edgewise.runtime.codecs import decode_inputs, encode_outputs
from edgewise.runtime.errors import DeadlineExceeded, InvalidInput
from edgewise.runtime.grpc_api.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.model import LoadedModel
from edgewise.runtime.repository import ModelRepository

__all__ = ["SERVER_NAME", "DataPlane"]

SERVER_NAME: Final = "edgewise"
PLATFORM: Final = "onnxruntime_onnx"


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgewise")
    except PackageNotFoundError:
        return "0+unknown"


class DataPlane:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository
        self.version = _package_version()
        self._ready = False

    # ---- health --------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        """Ready once start-up loading is done and at least one model version is served."""
        return self._ready and bool(self.repository.served_models())

    def set_ready(self, ready: bool) -> None:
        self._ready = ready

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.repository.is_ready(name, version)

    # ---- metadata ------------------------------------------------------------------------------

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=[])

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        model = self.repository.get(name, version)
        response = pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.repository.served_versions(name)],
            platform=PLATFORM,
        )
        for spec in model.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in model.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    # ---- inference -----------------------------------------------------------------------------

    def infer(
        self, request: pb.ModelInferRequest, deadline: float | None = None
    ) -> tuple[pb.ModelInferResponse, LoadedModel]:
        """Run one request. ``deadline`` is a ``time.monotonic()`` instant, or None."""
        model = self.repository.get(request.model_name, request.model_version)
        feeds = self._feeds(model, request)
        outputs = self._requested_outputs(model, request)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("the request's deadline passed before inference started")
        results = model.run(feeds, outputs)
        monitor = model.monitor
        if monitor is not None:
            monitor.observe(feeds)
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=model.version_str, id=request.id
        )
        encode_outputs(response, results, raw=len(request.raw_input_contents) > 0)
        return response, model

    @staticmethod
    def _feeds(model: LoadedModel, request: pb.ModelInferRequest) -> dict[str, npt.NDArray[Any]]:
        feeds: dict[str, npt.NDArray[Any]] = {}
        batch: int | None = None
        batch_from = ""
        for tensor in decode_inputs(request):
            try:
                model.check_input(tensor.name, tensor.datatype, tensor.shape)
            except InvalidInput:
                if model.monitor is not None and tensor.name in model.input_specs:
                    model.monitor.count_wrong_type(tensor.name)
                raise
            if tensor.shape:
                if batch is None:
                    batch, batch_from = tensor.shape[0], tensor.name
                elif tensor.shape[0] != batch:
                    raise InvalidInput(
                        f"input {tensor.name!r}: batch size {tensor.shape[0]} differs from "
                        f"input {batch_from!r}'s {batch}"
                    )
            feeds[tensor.name] = tensor.array
        missing = [name for name in model.input_specs if name not in feeds]
        if missing:
            raise InvalidInput(
                f"missing input(s) {', '.join(map(repr, missing))} for model {model.name!r}"
            )
        return feeds

    @staticmethod
    def _requested_outputs(model: LoadedModel, request: pb.ModelInferRequest) -> list[str] | None:
        if not request.outputs:
            return None
        names = []
        for output in request.outputs:
            if output.name not in model.output_names:
                raise InvalidInput(
                    f"requested output {output.name!r} is not an output of model "
                    f"{model.name!r} (outputs: {', '.join(model.output_names)})"
                )
            names.append(output.name)
        return names
