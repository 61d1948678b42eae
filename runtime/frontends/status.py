"""The one table from edgewise error codes to the status each front end answers with.

gRPC's codes are the protocol's own. The HTTP statuses follow the mapping of gRPC's HTTP
transcoding (google/rpc/code.proto), with one exception: RESOURCE_EXHAUSTED is 503 with
``Retry-After``, not 429. edgewise raises it when the *server* is out of room (the in-flight
limit, memory admission, a full batch queue), not when one client went over a quota: 503 is
HTTP's status for a temporary overload (RFC 9110, 15.6.4), the one proxies retry on or route to
another replica (Envoy's ``retry_on: 5xx``), and the one Triton's HTTP endpoint, the reference
Open Inference Protocol server, answers its UNAVAILABLE errors with; 429 says "this client is
sending too fast", which is not what happened. Either front end's client gets the same retry
hint (``retry-after-ms``).
"""

from __future__ import annotations

from typing import Final

import grpc

from edgewise.runtime.errors import ErrorCode

__all__ = ["GRPC_STATUS", "HTTP_STATUS", "STATUS", "error_code_for", "grpc_status", "http_status"]

#: ErrorCode -> (gRPC status, HTTP status).
STATUS: Final[dict[ErrorCode, tuple[grpc.StatusCode, int]]] = {
    ErrorCode.INVALID_ARGUMENT: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    ErrorCode.NOT_FOUND: (grpc.StatusCode.NOT_FOUND, 404),
    ErrorCode.UNAVAILABLE: (grpc.StatusCode.UNAVAILABLE, 503),
    ErrorCode.RESOURCE_EXHAUSTED: (grpc.StatusCode.RESOURCE_EXHAUSTED, 503),
    ErrorCode.DEADLINE_EXCEEDED: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ErrorCode.FAILED_PRECONDITION: (grpc.StatusCode.FAILED_PRECONDITION, 400),
    ErrorCode.INTERNAL: (grpc.StatusCode.INTERNAL, 500),
}

GRPC_STATUS: Final = {code: statuses[0] for code, statuses in STATUS.items()}
HTTP_STATUS: Final = {code: statuses[1] for code, statuses in STATUS.items()}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return GRPC_STATUS[code]


def http_status(code: ErrorCode) -> int:
    return HTTP_STATUS[code]


_ERROR_FOR_STATUS: Final = {status: code for code, status in GRPC_STATUS.items()}


def error_code_for(status: grpc.StatusCode) -> ErrorCode:
    """The reverse direction, for clients: unknown statuses count as INTERNAL."""
    return _ERROR_FOR_STATUS.get(status, ErrorCode.INTERNAL)
