"""The audit trail of control-plane calls: who, what, when and the outcome, one line per call.

:class:`AuditInterceptor` sits outside the token check, so a call refused UNAUTHENTICATED or
PERMISSION_DENIED is recorded like one that ran. Every call of a method in :data:`AUDITED`
writes exactly one record (see audit_log.py) once it is answered::

    {"time": "2026-12-07T21:45:27.123456Z", "method": "LoadModel",
     "service": "edgewise.v1.ModelRepositoryService", "outcome": "OK", "message": "",
     "who": {"credential": "ops", "certificate": "CN=agent-7,O=edge",
             "peer": "ipv4:10.0.0.5:51234"},
     "request": {"name": "churn", "version": "4", "make_default": true}, "forwarded": false}

``who.credential`` is the token's id (never the secret), or, for a call without a token, the
id of the ``cert:`` line that maps its client certificate (null when neither was accepted);
``who.certificate`` the client certificate's subject under mutual TLS (for a call the native
front end relayed, the certificate's first identity, ``CN=...``). ``request`` is the
request's fields as JSON (lists longer than 16 items as their count; null when the body was
not read or could not be parsed). ``forwarded``: the call came from a sibling process in
multi-process mode (the sibling wrote the client's record). The native front end relays these
methods to grpcio, so its calls are recorded here too; HTTP serves no control route.
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import grpc
from google.protobuf import message_factory
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message

from edgewise.runtime.frontends.audit_log import AuditLog
from edgewise.runtime.frontends.security import AuthInterceptor, context_identities
from edgewise.runtime.proto.generated.edgewise_v1 import edgewise_pb2 as epb

__all__ = ["AUDITED", "AuditInterceptor"]

Continuation = Callable[
    [grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]
]

_SERVICES: Final = {
    "ModelRepositoryService": ("LoadModel", "UnloadModel"),
    "MonitoringService": ("ResetWindow",),
    "QualityService": ("ResetQuality", "SubmitFeedback"),
    "RolloutService": ("SetTrafficSplit", "SetShadow", "SetVersionLabel"),
}

#: Full method name -> the request message class of every control-plane method.
AUDITED: Final[dict[str, type[Message]]] = {
    f"/{epb.DESCRIPTOR.package}.{service}/{method}": message_factory.GetMessageClass(
        epb.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type
    )
    for service, methods in _SERVICES.items()
    for method in methods
}

#: A method handler's behavior, as grpc.aio calls it (the stubs type the sync server's).
Behavior = Callable[[Any, "grpc.aio.ServicerContext[Any, Any]"], Awaitable[Any]]

_FORWARDED_HEADER: Final = "edgewise-forwarded"
_LONGEST_LIST: Final = 16


def _short(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) > _LONGEST_LIST:
            return {"count": len(value)}
        return [_short(item) for item in value]
    if isinstance(value, dict):
        return {key: _short(item) for key, item in value.items()}
    return value


def _fields(message_class: type[Message], body: Any) -> dict[str, Any] | None:
    if isinstance(body, Message):
        request = body
    elif isinstance(body, bytes):
        try:
            request = message_class.FromString(body)
        except DecodeError:
            return None
    else:
        return None
    fields = MessageToDict(request, preserving_proto_field_name=True)
    return {key: _short(value) for key, value in fields.items()}


def _certificate(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    try:
        subjects = list(context.auth_context().get("x509_subject", ()))
    except Exception:  # no TLS, or a context without one: no certificate to name
        return None
    return subjects[0].decode("utf-8", "replace") if subjects else None


def _now() -> str:
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """One audit record per control-plane call; every other call passes untouched."""

    def __init__(self, audit_log: AuditLog, auth: AuthInterceptor | None) -> None:
        self.audit_log = audit_log
        self.auth = auth

    def _credential(self, metadata: Any) -> str | None:
        if self.auth is None:
            return None
        try:
            credential, _ = self.auth.credential(metadata)
        except Exception:  # the token check refuses it; the record says no credential
            return None
        return None if credential is None else credential.id

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        message_class = AUDITED.get(method)
        if message_class is None:
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        service, _, name = method.strip("/").rpartition("/")
        record: dict[str, Any] = {
            "method": name,
            "service": service,
            "who": {"credential": self._credential(metadata)},
            "forwarded": any(key == _FORWARDED_HEADER for key, _ in metadata),
        }
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrapped(handler, record, message_class)

    def _write(
        self,
        record: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
        request: dict[str, Any] | None,
        failure: BaseException | None,
    ) -> None:
        code = context.code()
        if code is None:
            code = grpc.StatusCode.OK if failure is None else grpc.StatusCode.UNKNOWN
        if isinstance(code, int):  # grpcio hands the code back as it was set
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        details = context.details()
        message = details.decode("utf-8", "replace") if isinstance(details, bytes) else details
        who = {**record["who"], "certificate": _certificate(context), "peer": context.peer()}
        if who["credential"] is None and self.auth is not None:  # no token: the certificate's
            try:
                metadata = context.invocation_metadata()
                identities = context_identities(context, metadata)
                credential, _ = self.auth.credential(metadata, identities)
            except Exception:  # the check refused it; the record says no credential
                credential, identities = None, ()
            who["credential"] = None if credential is None else credential.id
            if who["certificate"] is None and identities:  # relayed by the native front end
                who["certificate"] = identities[0]
        self.audit_log.write(
            {
                **record,
                "time": _now(),
                "who": who,
                "request": request,
                "outcome": code.name,
                "message": message or "",
            }
        )

    def _wrapped(
        self,
        handler: grpc.RpcMethodHandler[Any, Any],
        record: dict[str, Any],
        message_class: type[Message],
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if handler.unary_unary is not None:
            unary = cast(Behavior, handler.unary_unary)

            async def audited_unary(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                failure: BaseException | None = None
                try:
                    return await unary(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    self._write(record, context, _fields(message_class, request), failure)

            return grpc.unary_unary_rpc_method_handler(
                audited_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        assert handler.stream_stream is not None, "control calls are unary; refusals stream"
        stream = cast(Behavior, handler.stream_stream)

        async def audited_refusal(
            requests: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            failure: BaseException | None = None
            try:
                return await stream(requests, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                self._write(record, context, None, failure)

        return grpc.stream_stream_rpc_method_handler(
            audited_refusal,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
