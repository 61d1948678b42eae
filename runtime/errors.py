"""One small exception tree with transport-neutral codes.

Every error that crosses a module boundary is an :class:`EdgewiseError`. Its ``code`` says what
kind of failure it is without naming a transport; the gRPC layer maps codes to status codes in one
table (``edgewise.runtime.frontends.status``) and the CLI turns any of them into one readable line
and a non-zero exit.
"""

from __future__ import annotations

import enum
from typing import ClassVar

__all__ = [
    "ConversionError",
    "DeadlineExceeded",
    "EdgewiseError",
    "ErrorCode",
    "InvalidInput",
    "ModelLoadError",
    "ModelNotFound",
    "ModelNotReady",
    "PackageError",
    "ResourceExhausted",
    "Unavailable",
]


class ErrorCode(enum.Enum):
    """What went wrong, independent of how it is reported."""

    INVALID_ARGUMENT = "invalid_argument"  # the caller sent something malformed
    NOT_FOUND = "not_found"  # the named model, version or file does not exist
    UNAVAILABLE = "unavailable"  # exists but cannot serve right now (loading, unloading)
    RESOURCE_EXHAUSTED = "resource_exhausted"  # a size, queue or memory limit was hit
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the caller's deadline passed before the work ran
    FAILED_PRECONDITION = "failed_precondition"  # on-disk state is not usable (bad package)
    INTERNAL = "internal"  # a bug or an unexpected failure in a dependency


class EdgewiseError(Exception):
    """Base of every error edgewise raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(EdgewiseError):
    """A request, a file or an argument is malformed; the message names the field."""

    code = ErrorCode.INVALID_ARGUMENT


class ConversionError(EdgewiseError):
    """A model could not be converted or failed its parity check."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(EdgewiseError):
    """No such model or version in the repository."""

    code = ErrorCode.NOT_FOUND


class ModelNotReady(EdgewiseError):
    """The model exists but is not ready to serve."""

    code = ErrorCode.UNAVAILABLE


class Unavailable(EdgewiseError):
    """A service this operation needs cannot be reached right now."""

    code = ErrorCode.UNAVAILABLE


class ResourceExhausted(EdgewiseError):
    """A size, queue or memory limit refused the work."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(EdgewiseError):
    """The caller's deadline passed before the work started."""

    code = ErrorCode.DEADLINE_EXCEEDED


class PackageError(EdgewiseError):
    """A model package on disk is incomplete, corrupt or of an unknown format."""

    code = ErrorCode.FAILED_PRECONDITION


class ModelLoadError(EdgewiseError):
    """A model package is well-formed but its model could not be loaded."""

    code = ErrorCode.FAILED_PRECONDITION
