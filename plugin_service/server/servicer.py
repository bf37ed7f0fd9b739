"""RPC handlers: wire messages in, reassembly, policy, device queue, wire messages out.

No PyTorch here: batches are NumPy arrays, the engine is reached only through the
:class:`DeviceQueue`. A bad batch is answered with its own error and the stream goes on.

Each ProtectStream call runs a reader task (messages -> reassembly -> checks -> device queue)
and the handler's generator as writer (answers, in order). Every batch is answered once, and
counted once in ``advface_batches_total`` with the code the client saw, when its answer has been
written; faces are counted only then (see ``stream.py`` for calls that end first). Temporary
refusals (queue or memory full, too many streams or chunked batches) carry a RetryInfo;
permanent ones (bad input, batch too large for the policy or for Protect) never do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from grpc_status import rpc_status

from plugin_service.server.batcher import Job, OverBudget, QueueFull
from advface.codec import (
    UNARY_MAX_BYTES,
    Batch,
    BatchError,
    FaceStat,
    Result,
    encode_result,
    parse_header,
    shown_id,
    status_with_retry,
)
from plugin_service.server.reassembly import Assembled, Failed, StreamAssembler
from plugin_service.server.state import RETRY_AFTER_SECONDS, ServingState
from plugin_service.server.stream import Item, StreamLedger

log = logging.getLogger(__name__)
INLINE_CHECK_BYTES = 1 << 20  # larger batches are checked for NaN/range off the event loop

__all__ = ["RETRY_AFTER_SECONDS", "GuardServicer", "ServingState"]


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

    # --- unary ---------------------------------------------------------------------------------

    async def Protect(self, request: pb.ProtectRequest, context: grpc.aio.ServicerContext) -> pb.ProtectResponse:
        await self._check_ready(context)
        s = self.s
        s.metrics.wire_in.inc(request.ByteSize())
        hold = _UnaryHold()
        try:
            try:
                result = await self._serve_unary(request, hold)
            except BatchError as e:
                result = Result(e.batch_id, None, error=e)
            self._count_batch("Protect", result)
            if result.error is not None:
                await context.abort_with_status(rpc_status.to_status(result.error.status()))
            (response,) = encode_result(result, chunk_bytes=2**31)
            s.metrics.wire_out.inc(response.ByteSize())
            assert result.features is not None
            s.metrics.faces.labels(result.protector).inc(len(result.features))
            return response
        finally:
            hold.release(s)

    async def _serve_unary(self, request: pb.ProtectRequest, hold: _UnaryHold) -> Result:
        s, bid = self.s, request.batch_id
        size = request.ByteSize()
        if size > s.max_message_bytes:
            raise self._oversize(bid, size)
        if max(1, request.chunk_count) != 1:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             "Protect takes a single-message batch; use ProtectStream for chunked batches")
        if s.draining:
            raise BatchError(bid, grpc.StatusCode.UNAVAILABLE, "server is draining for shutdown")
        header = parse_header(request, s.limits)
        if header.nbytes > UNARY_MAX_BYTES:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             f"a batch of {header.nbytes} bytes is over Protect's limit of {UNARY_MAX_BYTES} bytes "
                             "(max_unary_bytes in GetModelInfo), kept so that the response fits a default 4 MiB "
                             "client; send it with ProtectStream")
        (outcome,) = StreamAssembler(s.limits).feed(request)
        if isinstance(outcome, Failed):
            raise outcome.error
        if not s.budget.try_acquire(outcome.nbytes):
            raise BatchError(bid, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"the server's memory budget is full; retry in {RETRY_AFTER_SECONDS:g}s",
                             retry_after=RETRY_AFTER_SECONDS)
        hold.held = outcome.nbytes
        batch = outcome.check(s.limits)
        name, params = s.policy.resolve(bid, batch.options)
        hold.job, hold.future = await self._enqueue(batch, name, params, wait=False)
        return await self._finish(batch, name, hold.future, time.perf_counter())

    # --- streams -------------------------------------------------------------------------------

    async def ProtectStream(self, request_iterator: AsyncIterator[pb.ProtectRequest],
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ProtectResponse]:
        await self._check_ready(context)
        s = self.s
        if s.streams >= s.max_streams:
            await context.abort_with_status(rpc_status.to_status(status_with_retry(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server has {s.streams} streams open, its limit "
                f"(--max-streams); retry in {RETRY_AFTER_SECONDS:g}s", RETRY_AFTER_SECONDS)))
        s.add_stream(1)
        ledger = StreamLedger(s)
        reader = asyncio.create_task(self._read(ledger, request_iterator))
        code = grpc.StatusCode.CANCELLED
        try:
            while (item := await ledger.answers.get()) is not None:
                result = await asyncio.shield(item.done)
                for msg in encode_result(result, s.chunk_bytes):
                    s.metrics.wire_out.inc(msg.ByteSize())
                    yield msg
                # written: the client has this answer
                self._count_batch("ProtectStream", result)
                if result.error is None and result.features is not None:
                    s.metrics.faces.labels(result.protector).inc(len(result.features))
                ledger.delivered(item, result)
            await reader  # re-raises what broke the reader
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError | GeneratorExit):
                code = grpc.StatusCode.UNKNOWN
                log.exception("stream failed")
            raise
        finally:
            reader.cancel()
            ledger.abandon(code)  # no-op when every answer was sent
            s.add_stream(-1)

    async def _read(self, ledger: StreamLedger, requests: AsyncIterator[pb.ProtectRequest]) -> None:
        """Reads messages until the client half-closes; a chunked batch may wait ``chunk_timeout`` per chunk."""
        s = self.s
        it = requests.__aiter__()
        read: asyncio.Future[pb.ProtectRequest] | None = None
        try:
            while True:
                await ledger.room()
                if read is None:
                    read = asyncio.ensure_future(it.__anext__())
                # The clock runs only while the server waits on the client, never while it is busy.
                timeout = s.chunk_timeout if ledger.assembler.pending is not None else None
                done, _ = await asyncio.wait({read}, timeout=timeout)
                if not done:
                    await self._settle(ledger, [ledger.assembler.expire(s.chunk_timeout)])
                    continue
                finished, read = read, None
                try:
                    msg = finished.result()
                except StopAsyncIteration:
                    break
                await self._on_message(ledger, msg)
            await self._settle(ledger, [ledger.assembler.finish()])
        finally:
            if read is not None:
                read.cancel()
            ledger.answers.put_nowait(None)

    async def _on_message(self, ledger: StreamLedger, msg: pb.ProtectRequest) -> None:
        s = self.s
        size = msg.ByteSize()
        s.metrics.wire_in.inc(size)
        refuse = None
        if size > s.max_message_bytes:
            refuse = lambda bid: self._oversize(bid, size)  # noqa: E731
        else:
            room = await self._reserve(ledger, msg)
            if room:
                ledger.reserved += len(msg.raw_data)
            else:
                refuse = lambda bid: BatchError(  # noqa: E731
                    bid, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the server's memory budget stayed full for {s.chunk_timeout:g}s; resend later",
                    retry_after=RETRY_AFTER_SECONDS)
        draining = (lambda bid: BatchError(bid, grpc.StatusCode.UNAVAILABLE,  # noqa: E731
                                           "server is draining for shutdown; send this batch to another replica")
                    ) if s.draining else None
        await self._settle(ledger, ledger.assembler.feed(msg, refuse=refuse, refuse_new=draining))

    async def _reserve(self, ledger: StreamLedger, msg: pb.ProtectRequest) -> bool:
        """Reserves a message's bytes before the next one is read; False if the budget stayed full.

        Between batches the stream holds no partial data, so it may wait as long as it takes (plain
        back-pressure), and waits until the whole declared batch would fit, so that batches rarely
        stall half way. In the middle of a batch it holds data other streams may be waiting for:
        there it waits at most ``chunk_timeout``, which also breaks any cycle of streams each
        holding part of a batch.
        """
        s, n = self.s, len(msg.raw_data)
        try:
            if ledger.assembler.pending is None:
                try:
                    declared = parse_header(msg, s.limits).nbytes
                except BatchError:
                    declared = 0
                if await s.budget.acquire(max(declared, n)):
                    s.budget.release(max(declared, n) - n)
                    return True
                return False
            return await s.budget.acquire(n, timeout=s.chunk_timeout)
        except OverBudget:
            return False

    async def _settle(self, ledger: StreamLedger, outcomes: list) -> None:
        for item, outcome in ledger.settle(outcomes):
            if isinstance(outcome, Failed):
                item.answer(Result(item.batch_id, None, error=outcome.error))
            else:
                await self._start(ledger, item, outcome)

    async def _start(self, ledger: StreamLedger, item: Item, assembled: Assembled) -> None:
        """Checks a reassembled batch's values and options, then queues it (waiting for room)."""
        s = self.s
        try:
            if assembled.nbytes > INLINE_CHECK_BYTES:
                batch = await asyncio.to_thread(assembled.check, s.limits)
            else:
                batch = assembled.check(s.limits)
            name, params = s.policy.resolve(batch.batch_id, batch.options)
        except BatchError as e:
            ledger.release(item)
            item.answer(Result(item.batch_id, None, error=e))
            return
        received = time.perf_counter()
        item.job, item.job_future = await self._enqueue(batch, name, params, wait=True)
        item.follow(asyncio.ensure_future(self._finish(batch, name, item.job_future, received)))

    # --- shared --------------------------------------------------------------------------------

    async def _enqueue(self, batch: Batch, protector: str, params: Any, wait: bool) -> tuple[Job, asyncio.Future]:
        """Queues a batch for the device; in flight from now until :meth:`_finish` ends, whatever happens."""
        s = self.s
        job = Job(batch.batch_id, batch.features, protector, params)
        s.add_in_flight(1)
        try:
            future = await s.queue.submit(job, wait=wait)
        except QueueFull:
            s.add_in_flight(-1)
            raise BatchError(batch.batch_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"device queue is full; retry in {RETRY_AFTER_SECONDS:g}s",
                             retry_after=RETRY_AFTER_SECONDS) from None
        except BaseException:  # cancelled while waiting for room: the stream is gone
            s.add_in_flight(-1)
            raise
        return job, future

    async def _finish(self, batch: Batch, protector: str, future: asyncio.Future, received: float) -> Result:
        m = self.s.metrics
        try:
            out = await future
        except Exception:  # noqa: BLE001 - one batch's failure must not end the stream
            log.exception("batch %r failed in the engine", shown_id(batch.batch_id))
            return Result(batch.batch_id, None, error=BatchError(batch.batch_id, grpc.StatusCode.INTERNAL,
                                                                 "the engine failed on this batch; see server logs"))
        finally:
            self.s.add_in_flight(-1)
        n = len(batch.features)
        m.batch_size.observe(n)
        m.compute.observe(out.compute_seconds)
        stats = []
        for before, after, norm in zip(out.shadow_loss_before, out.shadow_loss_after, out.perturbation_norm, strict=True):
            stats.append(FaceStat(float(before), float(after), float(norm)))
            if before > 0:
                m.gain.observe(float(after / before))
            m.perturbation.observe(float(norm))
        for cosine, steps in zip(out.cosine, out.steps, strict=True):
            if cosine == cosine:  # NaN for protectors other than resynth
                m.resynth_cosine.observe(float(cosine))
                m.resynth_steps.observe(float(steps))
        elapsed = time.perf_counter() - received
        m.latency.observe(elapsed)
        log.debug("batch %r: %d faces, %s, %.0f ms", shown_id(batch.batch_id), n, protector, elapsed * 1e3)
        return Result(batch.batch_id, out.features, stats, self.s.model_info.model_version, protector=protector)

    def _oversize(self, batch_id: str, size: int) -> BatchError:
        return BatchError(batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                          f"a message of {size} bytes is over the server's limit of {self.s.max_message_bytes} bytes "
                          "(max_message_bytes in GetModelInfo); send the batch in smaller chunks")

    def _count_batch(self, method: str, result: Result) -> None:
        code = result.error.code.name if result.error else "OK"
        self.s.metrics.batches.labels(method, code).inc()
        if result.error is not None:
            log.info("batch %r rejected: %s %s", shown_id(result.batch_id), code, result.error.detail)


class _UnaryHold:
    """What a unary call holds: budget bytes and its queued job, freed whichever way the call ends."""

    held: int = 0
    job: Job | None = None
    future: asyncio.Future | None = None

    def release(self, s: ServingState) -> None:
        if self.future is not None and not self.future.done():
            if self.job is not None and not self.job.started:
                self.future.cancel()  # the client went away before the device took it
            else:  # still computing on this memory: free it when the engine is done
                self.future.add_done_callback(lambda _, n=self.held: s.budget.release(n))
                return
        s.budget.release(self.held)
