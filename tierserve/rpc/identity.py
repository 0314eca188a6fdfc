"""Who is at the other end of a mutual-TLS call: the names in the certificate gRPC verified, and the
rule that only the router may call a worker.

Names are read with `cryptography` from the peer certificate in the call's auth context, as TLS
hostname verification reads them (RFC 6125): the DNS and URI subject alternative names, and the
common name only when the certificate has no subject alternative names.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

# The auth-context property holding the verified peer's certificate (PEM), when it sent one.
PEER_CERT_PROPERTY = "x509_pem_cert"
WORKER_METHODS = "/tierserve.v1.Worker/"
NAME_PLACEHOLDER = "{name}"

# A refusal: the status and its message; None lets the call through.
Refusal = tuple[grpc.StatusCode, str] | None


@functools.lru_cache(maxsize=256)
def certificate_names(pem: bytes) -> frozenset[str]:
    """The names a certificate (PEM) identifies its holder by."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return frozenset(str(attribute.value) for attribute in common)
    return frozenset(
        [*alt.get_values_for_type(x509.DNSName), *alt.get_values_for_type(x509.UniformResourceIdentifier)]
    )


def peer_names(context: grpc.aio.ServicerContext) -> frozenset[str] | None:
    """The names of the caller's verified client certificate; None when it presented none."""
    pems = context.auth_context().get(PEER_CERT_PROPERTY)
    return certificate_names(pems[0]) if pems else None


def worker_name(template: str, name: str) -> str:
    """The name worker `name`'s certificates carry ([security] worker_server_name)."""
    return template.replace(NAME_PLACEHOLDER, name)


def named_workers(template: str, names: frozenset[str]) -> list[str]:
    """The worker names (`fp32-0`, or patterns such as `fp32-*`) that certificate `names` carry as
    `template` spells them; none when the template has no `{name}`."""
    prefix, placeholder, suffix = template.partition(NAME_PLACEHOLDER)
    if not placeholder:
        return []
    return sorted(
        name[len(prefix) : len(name) - len(suffix)]
        for name in names
        if len(name) > len(prefix) + len(suffix) and name.startswith(prefix) and name.endswith(suffix)
    )


def checked(
    handler: grpc.RpcMethodHandler, check: Callable[[grpc.aio.ServicerContext], Refusal]
) -> grpc.RpcMethodHandler:
    """`handler`, with `check` run first on every call: a refusal ends the call with its status."""
    kwargs: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            refusal = check(context)
            if refusal is not None:
                await context.abort(*refusal)
            async for response in stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(checked_stream, **kwargs)
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def checked_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            refusal = check(context)
            if refusal is not None:
                await context.abort(*refusal)
            return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(checked_unary, **kwargs)
    raise TypeError("only unary-unary and unary-stream calls can be checked")


class CallerNameInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Calls to methods under `prefix` only from a client certificate that names `name`; any other
    caller that passed the TLS handshake (a certificate of the same CA) gets PERMISSION_DENIED.
    Health and reflection stay open to every such caller, for probes."""

    def __init__(self, prefix: str, name: str, role: str) -> None:
        self._prefix = prefix
        self._name = name
        self._role = role

    def check(self, context: grpc.aio.ServicerContext) -> Refusal:
        names = peer_names(context)
        if names is not None and self._name in names:
            return None
        shown = ", ".join(sorted(names)) if names else "no certificate"
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"only the {self._role} may call this server: the caller's certificate names {shown}, "
            f"not {self._name}",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        return checked(handler, self.check)
