"""The Python client of the gRPC port."""

from edgewise.runtime.client.client import EdgewiseClient, InferResult, ServerError

__all__ = [
    "EdgewiseClient",
    "InferResult",
    "ServerError",
]
