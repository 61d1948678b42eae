"""The one table from edgewise error codes to gRPC status codes."""

from __future__ import annotations

from typing import Final

import grpc

from edgewise.runtime.errors import ErrorCode

__all__ = ["GRPC_STATUS", "error_code_for", "grpc_status"]

GRPC_STATUS: Final[dict[ErrorCode, grpc.StatusCode]] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


def grpc_status(code: ErrorCode) -> grpc.StatusCode:
    return GRPC_STATUS[code]


_ERROR_FOR_STATUS: Final = {status: code for code, status in GRPC_STATUS.items()}


def error_code_for(status: grpc.StatusCode) -> ErrorCode:
    """The reverse direction, for clients: unknown statuses count as INTERNAL."""
    return _ERROR_FOR_STATUS.get(status, ErrorCode.INTERNAL)
