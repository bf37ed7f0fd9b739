"""The device queue overlaps: while one batch computes, the event loop stays free to take the next one."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from plugin_service.server.batcher import DeviceQueue, Job
from plugin_service.server.metrics import ServiceMetrics


def _job(batch_id: str) -> Job:
    return Job(batch_id, np.zeros((1, 2), dtype=np.float32), "advface", None)


def test_the_next_batch_is_queued_and_the_loop_answers_while_a_batch_computes() -> None:
    computing, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def run(job: Job) -> str:
        ran.append(job.batch_id)
        if job.batch_id == "first":
            computing.set()
            assert release.wait(30), "the test never released the first batch"
        return job.batch_id

    async def main() -> None:
        queue = DeviceQueue(run, queue_size=1, workers=1, metrics=ServiceMetrics())
        queue.start()
        first = await queue.submit(_job("first"))
        assert await asyncio.to_thread(computing.wait, 30)
        # The engine thread is busy: the loop must still take the next batch and run other tasks.
        second = await asyncio.wait_for(queue.submit(_job("second")), timeout=5)
        await asyncio.wait_for(asyncio.sleep(0.01), timeout=5)
        assert not first.done() and ran == ["first"]
        release.set()
        assert await asyncio.wait_for(first, 30) == "first"
        assert await asyncio.wait_for(second, 30) == "second"
        await queue.close()

    asyncio.run(main())
