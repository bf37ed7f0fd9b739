"""Feeding the device: a bounded queue of batches, engine threads off the event loop, a memory budget.

Batches are never merged: a batch's faces share BatchNorm statistics inside the engine, so
the batch a client sends is the batch that runs. Back-pressure comes from two bounds: the
queue (streams wait, so HTTP/2 flow control slows the client; unary calls get
RESOURCE_EXHAUSTED) and the byte budget for batches held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from plugin_service.server.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The device queue is full and the caller asked not to wait."""


class OverBudget(Exception):
    """A single batch is larger than the whole memory budget."""


class ByteBudget:
    """Bounds the host memory held by batches: reassembly buffers and results waiting to be sent.

    ``release`` is synchronous so that cleanup paths (cancelled streams, done-callbacks) can
    always return memory without awaiting.
    """

    def __init__(self, capacity: int, metrics: ServiceMetrics) -> None:
        self.capacity, self.reserved = capacity, 0
        self._waiters: list[asyncio.Future[None]] = []
        self._metrics = metrics

    async def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise OverBudget(f"batch needs {n / 2**20:.0f} MiB, over the server's memory budget of "
                             f"{self.capacity / 2**20:.0f} MiB")
        while self.reserved + n > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.reserved += n
        self._metrics.reserved.set(self.reserved)

    def release(self, n: int) -> None:
        if n == 0:
            return
        self.reserved -= n
        self._metrics.reserved.set(self.reserved)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


@dataclass
class Job:
    batch_id: str
    features: np.ndarray
    protector: str
    params: Any  # ProtectorParams, opaque here
    enqueued: float = 0.0


class DeviceQueue:
    """A bounded queue drained by ``workers`` engine threads; ``run`` is the engine call."""

    def __init__(self, run: Callable[[Job], Any], queue_size: int, workers: int, metrics: ServiceMetrics) -> None:
        self._run = run
        self._queue: asyncio.Queue[tuple[Job, asyncio.Future[Any]]] = asyncio.Queue(maxsize=queue_size)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advface-engine")
        self._workers: list[asyncio.Task[None]] = []
        self._n_workers = workers
        self._metrics = metrics

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"engine-{i}") for i in range(self._n_workers)]

    async def submit(self, job: Job, wait: bool = True) -> asyncio.Future[Any]:
        """Queues a job; returns a future for its result. Waits for room unless ``wait`` is False."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        job.enqueued = time.perf_counter()
        if wait:
            await self._queue.put((job, future))
        else:
            try:
                self._queue.put_nowait((job, future))
            except asyncio.QueueFull:
                raise QueueFull from None
        self._metrics.queue_depth.set(self._queue.qsize())
        return future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job, future = await self._queue.get()
            self._metrics.queue_depth.set(self._queue.qsize())
            self._metrics.queue_wait.observe(time.perf_counter() - job.enqueued)
            try:
                result = await loop.run_in_executor(self._pool, self._run, job)
            except Exception as e:  # noqa: BLE001 - handed to the batch's caller
                if not future.done():
                    future.set_exception(e)
            else:
                if not future.done():
                    future.set_result(result)
            finally:
                self._queue.task_done()

    async def join(self) -> None:
        """Waits until every queued job has run (used when draining)."""
        await self._queue.join()

    async def close(self) -> None:
        for w in self._workers:
            w.cancel()
        for w in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await w
        self._pool.shutdown(wait=True)
