"""``serve --otel-endpoint``: a real server exports its spans over OTLP/gRPC to a collector (the
OTLP trace service, from opentelemetry-proto, in this process), the caller's trace kept."""

from __future__ import annotations

import json
import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc

from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2 as pb
from edgewise.runtime.proto.generated.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.servers import start_server

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


class Collector(otlp_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[otlp.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(
        self, request: otlp.ExportTraceServiceRequest, context: object
    ) -> otlp.ExportTraceServiceResponse:
        with self.lock:
            self.requests.append(request)
        return otlp.ExportTraceServiceResponse()


def test_serve_exports_spans_to_an_otlp_collector(model_repo: Path, tmp_path: Path) -> None:
    collector = Collector()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(collector, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        flags = [
            "--front-end", "grpcio", "--otel-endpoint", f"http://127.0.0.1:{port}",
            "--otel-sample-ratio", "0",
        ]  # fmt: skip
        server = start_server(model_repo, tmp_path, flags)
        try:
            manifest = json.loads((model_repo / "logreg" / "1" / "manifest.json").read_text())
            rows = np.ones((2, int(manifest["inputs"][0]["shape"][1])), np.float32)
            request = pb.ModelInferRequest(model_name="logreg", id="otlp-1")
            request.inputs.add(name="features", datatype="FP32", shape=list(rows.shape))
            request.raw_input_contents.append(rows.tobytes())
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(3):  # ratio 0: no parent, no trace
                    stub.ModelInfer(request, timeout=10)
                traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"  # sampled by the caller
                stub.ModelInfer(request, metadata=(("traceparent", traceparent),), timeout=10)
        finally:
            assert server.stop() == 0, server.log()  # a stop flushes the queued spans
    finally:
        grpc_server.stop(None)
    spans = []
    for export in collector.requests:
        for resource_spans in export.resource_spans:
            service = {
                item.key: item.value.string_value for item in resource_spans.resource.attributes
            }
            assert service["service.name"] == "edgewise"
            for scope in resource_spans.scope_spans:
                spans.extend(scope.spans)
    assert {span.trace_id.hex() for span in spans} == {TRACE_ID}, server.log()
    named = {span.name: span for span in spans}
    assert set(named) == {"edgewise.infer", "parse", "admit", "decode", "run", "monitor"}
    root = named["edgewise.infer"]
    assert root.parent_span_id.hex() == PARENT_ID
    attributes = {item.key: item.value.string_value for item in root.attributes}
    assert attributes["edgewise.model"] == "logreg"
    assert attributes["edgewise.version"] == "1"
    assert attributes["edgewise.request_id"] == "otlp-1"
    for name in ("parse", "admit", "decode", "run", "monitor"):
        assert named[name].parent_span_id == root.span_id, name
