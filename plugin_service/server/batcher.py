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

    Streams reserve the bytes of each message as it arrives (never a header's promise), so a
    client can only hold memory it has actually sent. ``release`` is synchronous so that cleanup
    paths (cancelled streams, done-callbacks) can always return memory without awaiting.
    ``on_change`` lets the server wake whoever waits for the service to become idle.
    """

    def __init__(self, capacity: int, metrics: ServiceMetrics, on_change: Callable[[], None] | None = None) -> None:
        self.capacity, self.reserved = capacity, 0
        self._waiters: list[asyncio.Future[None]] = []
        self._metrics = metrics
        self.on_change = on_change

    def try_acquire(self, n: int) -> bool:
        if self.reserved + n > self.capacity:
            return False
        self._add(n)
        return True

    async def acquire(self, n: int, timeout: float | None = None) -> bool:
        """Waits for room for ``n`` bytes; False if there was none within ``timeout`` seconds."""
        if n > self.capacity:
            raise OverBudget(f"{n / 2**20:.0f} MiB is over the server's memory budget of "
                             f"{self.capacity / 2**20:.0f} MiB")
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while self.reserved + n > self.capacity:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    return False
                await asyncio.wait_for(waiter, left)
            except TimeoutError:
                return False
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self._add(n)
        return True

    def _add(self, n: int) -> None:
        if n:
            self.reserved += n
            self._metrics.reserved.set(self.reserved)
            if self.on_change:
                self.on_change()

    def release(self, n: int) -> None:
        if n == 0:
            return
        self.reserved -= n
        self._metrics.reserved.set(self.reserved)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)
        if self.on_change:
            self.on_change()


@dataclass
class Job:
    batch_id: str
    features: np.ndarray
    protector: str
    params: Any  # ProtectorParams, opaque here
    enqueued: float = 0.0
    started: bool = False  # taken by a worker; a job not yet started is skipped if its future is cancelled


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
            if future.cancelled():  # its stream went away while it waited: nobody wants the result
                self._queue.task_done()
                continue
            job.started = True
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
