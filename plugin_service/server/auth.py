"""Bearer-token authentication: who may call the service, checked before any handler runs.

Tokens come from a file the operator mounts (``--auth-tokens``), one per line::

    # comments and blank lines are ignored
    TOKEN                             caller named "line-N" in logs
    NAME TOKEN                        caller named NAME
    NAME TOKEN GetModelInfo,Protect   NAME may call only these methods of the service

A call carries ``authorization: Bearer TOKEN`` in its metadata. Missing or unknown tokens are
``UNAUTHENTICATED``; a known token calling a method it is not allowed is ``PERMISSION_DENIED``.
Tokens are kept only as SHA-256 digests and compared with :func:`hmac.compare_digest` against
every known digest, so neither the timing of a refusal nor a log line reveals a token; logs name
the caller. Health checks (``grpc.health.v1``) need no token: Kubernetes' gRPC probes cannot send
metadata, and the answer (SERVING or not) tells nothing about faces.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)
MIN_TOKEN_CHARS = 16  # shorter tokens can be guessed; refused at start-up
HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenFileError(ValueError):
    """The token file is unusable; the message names the line, never the token."""


@dataclass(frozen=True)
class Caller:
    name: str
    digest: bytes
    methods: frozenset[str] | None  # None: every method


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_tokens(path: Path, known_methods: Iterable[str]) -> tuple[Caller, ...]:
    """Parses the token file; refuses short or repeated tokens, repeated names and unknown methods."""
    known = frozenset(known_methods)
    callers: list[Caller] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 3:
            raise TokenFileError(f"{path} line {number}: expected TOKEN, NAME TOKEN or NAME TOKEN METHODS, "
                                 f"got {len(fields)} fields")
        name, token = (f"line-{number}", fields[0]) if len(fields) == 1 else (fields[0], fields[1])
        methods = None
        if len(fields) == 3:
            methods = frozenset(m for m in fields[2].split(",") if m)
            if unknown := sorted(methods - known):
                raise TokenFileError(f"{path} line {number}: unknown method(s) {unknown}; known: {sorted(known)}")
        if len(token) < MIN_TOKEN_CHARS:
            raise TokenFileError(f"{path} line {number}: token of caller {name!r} is shorter than {MIN_TOKEN_CHARS} "
                                 "characters")
        caller = Caller(name, _digest(token), methods)
        if any(c.name == name for c in callers):
            raise TokenFileError(f"{path} line {number}: caller name {name!r} is used twice")
        if any(hmac.compare_digest(c.digest, caller.digest) for c in callers):
            raise TokenFileError(f"{path} line {number}: caller {name!r} repeats the token of another line")
        callers.append(caller)
    if not callers:
        raise TokenFileError(f"{path} holds no token; every call would be refused")
    return tuple(callers)


def _bearer(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``code``."""
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # never reached: abort raises; the yield makes this the async generator stream handlers are

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a known bearer token allowed for its method; health is open."""

    def __init__(self, callers: tuple[Caller, ...], service: str) -> None:
        self._callers = callers
        self._prefix = f"/{service}/"

    def identify(self, token: str | None) -> Caller | None:
        """The caller holding ``token``; every digest is compared, so timing does not depend on which matched."""
        if token is None:
            return None
        digest, found = _digest(token), None
        for caller in self._callers:
            if hmac.compare_digest(caller.digest, digest):
                found = caller
        return found

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        token = _bearer(handler_call_details.invocation_metadata)
        caller = self.identify(token)
        if caller is None:
            why = "no bearer token" if token is None else "an unknown bearer token"
            log.warning("refused %s: %s", method, why)
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED,
                             f"{why}: send the metadata 'authorization: Bearer <token>' with a token the operator issued")
        short = method.rsplit("/", 1)[-1]
        if caller.methods is not None and (not method.startswith(self._prefix) or short not in caller.methods):
            log.warning("refused %s to caller %s: not among its methods", method, caller.name)
            return _refusing(handler, grpc.StatusCode.PERMISSION_DENIED,
                             f"caller {caller.name!r} may not call {short}")
        log.debug("caller %s calls %s", caller.name, method)
        return handler
