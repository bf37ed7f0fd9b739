"""Server interceptors: per-RPC request counting by method and final status code.

Only the service's own methods are counted: health checks (probes every few seconds) and
reflection would otherwise swamp ``advface_requests_total`` and its error ratios. A call whose
client went away, or whose messages gRPC refused, ends in the handler as a cancellation and is
counted CANCELLED.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from plugin_service.server.metrics import ServiceMetrics


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AbortError) or error is None:
        code = context.code()
        return (code or grpc.StatusCode.OK).name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every finished RPC of ``service`` in ``advface_requests_total{method, code}``."""

    def __init__(self, metrics: ServiceMetrics, service: str) -> None:
        self._metrics = metrics
        self._prefix = f"/{service}/"

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefix):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        count = self._metrics.requests

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                error: BaseException | None = None
                try:
                    return await inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    count.labels(method, _final_code(context, error)).inc()

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                error: BaseException | None = None
                try:
                    # aclosing: when gRPC closes this generator, the handler's own cleanup runs now, not at GC
                    async with contextlib.aclosing(inner_stream(requests, context)) as responses:
                        async for response in responses:
                            yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    count.labels(method, _final_code(context, error)).inc()

            return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
        return handler
