"""What the RPC handlers share: queue, budget, policy, limits, and the counts that must return to 0.

The counts (open streams, batches in flight, reserved bytes, batches being reassembled) are kept
here as plain numbers next to their gauges, and every change sets :attr:`ServingState.changed`,
so tests and shutdown code can wait for the service to become idle on an event instead of
polling or sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from advface.v1 import plugin_pb2 as pb

from plugin_service.server.batcher import ByteBudget, DeviceQueue
from advface.codec import BatchLimits
from plugin_service.server.metrics import ServiceMetrics
from plugin_service.server.reassembly import Slots

if TYPE_CHECKING:
    from plugin_service.server.policy import Policy

RETRY_AFTER_SECONDS = 1.0


@dataclass
class ServingState:
    """``draining`` turns new batches away during shutdown."""

    queue: DeviceQueue
    budget: ByteBudget
    policy: Policy
    limits: BatchLimits
    metrics: ServiceMetrics
    model_info: pb.ModelInfo
    chunk_bytes: int
    stream_window: int  # batches of one stream received but not yet answered; reading pauses beyond it
    max_message_bytes: int = 8 * 2**20
    chunk_timeout: float = 30.0  # seconds a chunked batch may wait for its next chunk
    max_streams: int = 256
    max_reassembling: int = 64
    draining: bool = False
    streams: int = 0
    in_flight: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    slots: Slots = field(init=False)

    def __post_init__(self) -> None:
        def reassembling(n: int) -> None:
            self.metrics.reassembling.set(n)
            self.changed.set()

        self.slots = Slots(self.max_reassembling, reassembling)
        self.budget.on_change = self.notify

    def notify(self) -> None:
        self.changed.set()

    def add_stream(self, n: int) -> None:
        self.streams += n
        self.metrics.streams.set(self.streams)
        self.changed.set()

    def add_in_flight(self, n: int) -> None:
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)
        self.changed.set()

    def idle(self) -> bool:
        return self.streams == 0 and self.in_flight == 0 and self.budget.reserved == 0 and self.slots.used == 0

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Returns once ``predicate()`` holds, re-checking on every change; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
