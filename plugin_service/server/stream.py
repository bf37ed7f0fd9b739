"""One ProtectStream call's bookkeeping: the batches it owes answers for, in order, and their memory.

Every batch the stream starts becomes one :class:`Item` the moment the reassembler settles it,
before anything awaits, so no path can lose it: the writer sends and counts each item once
(:meth:`StreamLedger.delivered`), and when the call ends first (client gone or cancelled, a
write failed) :meth:`StreamLedger.abandon` counts every unsent item once with the call's code,
drops computations that have not started, and returns every byte to the budget (for a batch
already on the device, when it finishes).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from plugin_service.server.batcher import Job
from advface.codec import BatchError, Result, shown_id
from plugin_service.server.reassembly import Assembled, Outcome, StreamAssembler
from plugin_service.server.state import ServingState

log = logging.getLogger(__name__)


class Item:
    """A batch owed an answer: ``held`` bytes in the budget, ``done`` resolves to its result."""

    def __init__(self, batch_id: str, held: int) -> None:
        self.batch_id, self.held = batch_id, held
        self.done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self.job: Job | None = None
        self.job_future: asyncio.Future | None = None
        self.task: asyncio.Task | None = None

    def answer(self, result: Result) -> None:
        if not self.done.done():
            self.done.set_result(result)

    def follow(self, task: asyncio.Task) -> None:
        """Answers with ``task``'s result once it is done."""
        self.task = task

        def copy(t: asyncio.Task) -> None:
            if t.cancelled() or t.exception() is not None:
                self.answer(Result(self.batch_id, None, error=BatchError(
                    self.batch_id, grpc.StatusCode.INTERNAL, "the batch's computation was lost; see server logs")))
            else:
                self.answer(t.result())

        task.add_done_callback(copy)


class StreamLedger:
    """Per-stream state shared by the reader task and the writer (the handler's generator)."""

    def __init__(self, state: ServingState) -> None:
        self.s = state
        self.assembler = StreamAssembler(state.limits, state.slots)
        self.items: deque[Item] = deque()  # owed answers, oldest first
        self.answers: asyncio.Queue[Item | None] = asyncio.Queue()  # the writer's feed; None ends it
        self.reserved = 0  # budget bytes held for the pending batch's data (and a message being handled)
        self._progress = asyncio.Event()

    async def room(self) -> None:
        """Waits until fewer than ``stream_window`` answers are owed (a client that does not read stops being read)."""
        while len(self.items) >= self.s.stream_window:
            self._progress.clear()
            await self._progress.wait()

    def settle(self, outcomes: list[Outcome | None]) -> list[tuple[Item, Outcome]]:
        """Turns the reassembler's outcomes into owed items, in order; moves memory to them. Never awaits."""
        made = []
        for o in outcomes:
            if o is None:
                continue
            item = Item(o.batch_id if isinstance(o, Assembled) else o.error.batch_id,
                        o.nbytes if isinstance(o, Assembled) else 0)
            self.items.append(item)
            self.answers.put_nowait(item)
            made.append((item, o))
        keep = self.assembler.held_bytes
        give_back = self.reserved - keep - sum(item.held for item, _ in made)
        assert give_back >= 0, "a batch holds bytes the stream never reserved"
        self.reserved = keep
        self.s.budget.release(give_back)
        return made

    def release(self, item: Item) -> None:
        self.s.budget.release(item.held)
        item.held = 0

    def delivered(self, item: Item, result: Result) -> None:
        assert self.items and self.items[0] is item
        self.items.popleft()
        self.release(item)
        self._progress.set()

    def abandon(self, code: grpc.StatusCode) -> None:
        """The call ended with answers still owed: count each once with ``code``, free everything."""
        s = self.s
        owed = [item.batch_id for item in self.items]
        if self.assembler.pending is not None:
            owed.append(self.assembler.pending)
        for batch_id in owed:
            s.metrics.batches.labels("ProtectStream", code.name).inc()
            log.info("batch %r not answered: the stream ended with %s", shown_id(batch_id), code.name)
        for item in self.items:
            if item.job is not None and not item.job.started and item.job_future is not None:
                item.job_future.cancel()  # the engine skips it
            if item.task is not None and not item.task.done():
                item.task.add_done_callback(lambda _, n=item.held: s.budget.release(n))
                item.held = 0
            else:
                self.release(item)
        self.items.clear()
        self.assembler.close()
        s.budget.release(self.reserved)
        self.reserved = 0
