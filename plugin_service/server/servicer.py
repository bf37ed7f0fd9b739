"""RPC handlers: wire messages in, codec, policy, device queue, wire messages out.

No PyTorch here: batches are NumPy arrays, the engine is reached only through the
:class:`DeviceQueue`. A bad batch is answered with its own error and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from plugin_service.server.batcher import ByteBudget, DeviceQueue, Job, OverBudget, QueueFull
from plugin_service.server.codec import Batch, BatchError, BatchLimits, FaceStat, Reassembler, Result, encode_result
from plugin_service.server.metrics import ServiceMetrics
from plugin_service.server.policy import Policy

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1


@dataclass
class ServingState:
    """What the handlers share; ``draining`` turns new batches away during shutdown."""

    queue: DeviceQueue
    budget: ByteBudget
    policy: Policy
    limits: BatchLimits
    metrics: ServiceMetrics
    model_info: pb.ModelInfo
    chunk_bytes: int
    stream_window: int  # batches of one stream decoded but not yet answered
    draining: bool = False


class GuardServicer(pb_grpc.AdvFaceGuardServicer):
    """Registered before the server starts (gRPC requires it); answers UNAVAILABLE until :meth:`ready`."""

    def __init__(self) -> None:
        self._state: ServingState | None = None

    def ready(self, state: ServingState) -> None:
        self._state = state

    @property
    def s(self) -> ServingState:
        assert self._state is not None
        return self._state

    async def _check_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self._state is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await self._check_ready(context)
        return self.s.model_info

    async def Protect(self, request: pb.ProtectRequest, context: grpc.aio.ServicerContext) -> pb.ProtectResponse:
        await self._check_ready(context)
        if max(1, request.chunk_count) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"batch {request.batch_id!r}: Protect takes a single-message batch; "
                                "use ProtectStream for chunked batches")
        result = await self._serve_one(request, wait=False)
        self._count_batch("Protect", result)
        if result.error is not None:
            if result.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                await context.abort_with_status(_retryable(result.error))
            await context.abort(result.error.code, str(result.error))
        (response,) = encode_result(result, chunk_bytes=2**31)
        self.s.metrics.wire_out.inc(response.ByteSize())
        return response

    async def ProtectStream(self, request_iterator: AsyncIterator[pb.ProtectRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProtectResponse]:
        await self._check_ready(context)
        # Results are queued in arrival order, each with the bytes it holds in the budget; the
        # bound keeps a fast sender from piling up work.
        pending: asyncio.Queue[tuple[asyncio.Future[Result], int] | None] = asyncio.Queue(maxsize=self.s.stream_window)
        reader = asyncio.create_task(self._read_stream(request_iterator, pending))
        current: tuple[asyncio.Future[Result], int] | None = None
        try:
            while (current := await pending.get()) is not None:
                task, held = current
                result = await asyncio.shield(task)
                self._count_batch("ProtectStream", result)
                for msg in encode_result(result, self.s.chunk_bytes):
                    self.s.metrics.wire_out.inc(msg.ByteSize())
                    yield msg
                current = None
                self.s.budget.release(held)
            await reader
        finally:
            # A cancelled stream (client gone) leaves batches behind: they finish on their own
            # and give their memory back when done.
            reader.cancel()
            leftovers = [current] if current else []
            while not pending.empty():
                leftovers.append(pending.get_nowait())
            for item in leftovers:
                if item is not None:
                    item[0].add_done_callback(lambda _, n=item[1]: self.s.budget.release(n))

    async def _read_stream(self, requests: AsyncIterator[pb.ProtectRequest],
                           pending: asyncio.Queue[tuple[asyncio.Future[Result], int] | None]) -> None:
        reassembler = Reassembler(self.s.limits)
        reserved = 0

        async def fail(error: BatchError) -> None:
            nonlocal reserved
            reassembler.reject(error.batch_id)
            self.s.budget.release(reserved)
            reserved = 0
            await pending.put((_done(Result(error.batch_id, None, error=error)), 0))

        try:
            async for msg in requests:
                self.s.metrics.wire_in.inc(msg.ByteSize())
                if (error := reassembler.interrupted_by(msg)) is not None:
                    await fail(error)
                if reassembler.is_leftover(msg):
                    continue
                try:
                    if reassembler.pending is None:
                        if self.s.draining:
                            raise BatchError(msg.batch_id, grpc.StatusCode.UNAVAILABLE,
                                             "server is draining for shutdown; send this batch to another replica")
                        size = reassembler.expected_bytes(msg)
                        try:
                            await self.s.budget.acquire(size)
                        except OverBudget as e:
                            raise BatchError(msg.batch_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
                        reserved = size
                    batch = reassembler.add(msg)
                    if batch is not None:
                        result = await self._submit(batch, wait=True)
                        await pending.put((result, reserved))  # the writer releases it once sent
                        reserved = 0
                except BatchError as e:
                    await fail(e)
            if reassembler.pending is not None:
                await fail(BatchError(reassembler.pending, grpc.StatusCode.INVALID_ARGUMENT,
                                      "stream ended before the batch's last chunk arrived"))
        finally:
            self.s.budget.release(reserved)
            await pending.put(None)

    async def _serve_one(self, request: pb.ProtectRequest, wait: bool) -> Result:
        reassembler = Reassembler(self.s.limits)
        self.s.metrics.wire_in.inc(request.ByteSize())
        try:
            if self.s.draining:
                raise BatchError(request.batch_id, grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown")
            batch = reassembler.add(request)
            assert batch is not None
            return await (await self._submit(batch, wait=wait))
        except BatchError as e:
            return Result(e.batch_id, None, error=e)

    async def _submit(self, batch: Batch, wait: bool) -> asyncio.Future[Result]:
        """Queues a decoded batch; returns a task that yields its result (errors included)."""
        name, params = self.s.policy.resolve(batch.batch_id, batch.options)
        received = time.perf_counter()
        self.s.metrics.in_flight.inc()
        try:
            future = await self.s.queue.submit(Job(batch.batch_id, batch.features, name, params), wait=wait)
        except QueueFull:
            self.s.metrics.in_flight.dec()
            raise BatchError(batch.batch_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"device queue is full; retry in {RETRY_AFTER_SECONDS}s") from None
        return asyncio.ensure_future(self._finish(batch, name, future, received))

    async def _finish(self, batch: Batch, protector: str, future: Awaitable[Any], received: float) -> Result:
        m = self.s.metrics
        try:
            out = await future
        except Exception:  # noqa: BLE001 - one batch's failure must not end the stream
            log.exception("batch %r failed in the engine", batch.batch_id)
            return Result(batch.batch_id, None, error=BatchError(batch.batch_id, grpc.StatusCode.INTERNAL,
                                                                 "the engine failed on this batch; see server logs"))
        finally:
            m.in_flight.dec()
        n = len(batch.features)
        m.faces.labels(protector).inc(n)
        m.batch_size.observe(n)
        m.compute.observe(out.compute_seconds)
        stats = []
        for before, after, norm in zip(out.shadow_loss_before, out.shadow_loss_after, out.perturbation_norm, strict=True):
            stats.append(FaceStat(float(before), float(after), float(norm)))
            if before > 0:
                m.gain.observe(float(after / before))
            m.perturbation.observe(float(norm))
        elapsed = time.perf_counter() - received
        m.latency.observe(elapsed)
        log.debug("batch %s: %d faces, %s, %.0f ms", batch.batch_id, n, protector, elapsed * 1e3)
        return Result(batch.batch_id, out.features, stats, self.s.model_info.model_version)

    def _count_batch(self, method: str, result: Result) -> None:
        code = result.error.code.name if result.error else "OK"
        self.s.metrics.batches.labels(method, code).inc()
        if result.error is not None:
            log.info("batch %r rejected: %s %s", result.batch_id, code, result.error.detail)


def _done(result: Result) -> asyncio.Future[Result]:
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    future.set_result(result)
    return future


def _retryable(error: BatchError) -> grpc.Status:
    """RESOURCE_EXHAUSTED with a google.rpc.RetryInfo telling the client when to come back."""
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_SECONDS)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(error), details=[detail])
    return rpc_status.to_status(status)
