"""Per-stream reassembly of chunked batches: every batch answered exactly once, memory held only as data arrives.

A stream is a sequence of messages; a batch is one or more consecutive messages with the same
``batch_id``. Clients (and attackers) may break that in every way: interleave two batches,
send chunk 1 before chunk 0, reuse an id, stop half way. :class:`StreamAssembler` turns any
sequence into outcomes so that each batch the client started gets exactly one: a
:class:`Failed` (answered with its error) or an :class:`Assembled` (to be checked and computed).

The rules that make "exactly once" hold:

- Only one batch is pending at a time. A message of any other id fails it (INVALID_ARGUMENT,
  "chunk sequence broken") before that message is looked at.
- A batch that failed before all its chunks arrived is remembered with its ``chunk_count`` and
  the number of its messages seen; its remaining chunks are dropped silently (it was answered).
  This is what keeps "chunk 1, then chunk 0" at one answer.
- An id that finished (all its chunks seen, or answered complete) and comes again is a second
  batch with a duplicate id: answered INVALID_ARGUMENT, once.
- ids are remembered for the last ``recent_ids`` batches of the stream (a bounded memory).

Memory: the buffer of a pending batch is ``np.empty`` (virtual until written; no zero-filling
on the event loop) and :attr:`StreamAssembler.held_bytes` counts only bytes received, which the
servicer reserves in the memory budget as they arrive. Nothing is reserved on a header's promise.
No I/O, clocks or asyncio here: the servicer decides when a pending batch has waited too long
(:meth:`StreamAssembler.expire`), so the fuzz tests can drive this class directly.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from advface.v1 import plugin_pb2 as pb

from advface.codec import (
    Batch,
    BatchError,
    BatchLimits,
    Header,
    check_values,
    parse_header,
    shown_id,
)

RECENT_IDS = 100_000
Refusal = Callable[[str], BatchError]  # batch id -> the error to answer it with


@dataclass
class Failed:
    error: BatchError


@dataclass
class Assembled:
    """All chunks of a batch arrived with the right total length; values not yet checked."""

    header: Header
    data: np.ndarray  # uint8, exactly header.nbytes
    wire_bytes: int

    @property
    def batch_id(self) -> str:
        return self.header.batch_id

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def check(self, limits: BatchLimits) -> Batch:
        """NaN/Inf and range checks (may take a while for big batches: run off the event loop)."""
        h = self.header
        features = self.data.view(h.dtype).reshape(h.shape)
        check_values(h.batch_id, features, limits.value_range)
        return Batch(h.batch_id, features.astype(h.dtype.newbyteorder("="), copy=False), h.options, self.wire_bytes)


Outcome = Failed | Assembled


class Slots:
    """A shared count of batches being reassembled, across all streams (``--max-reassembling``)."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None) -> None:
        self.capacity, self.used = capacity, 0
        self._on_change = on_change

    def take(self) -> bool:
        if self.used >= self.capacity:
            return False
        self.used += 1
        if self._on_change:
            self._on_change(self.used)
        return True

    def give(self) -> None:
        self.used -= 1
        if self._on_change:
            self._on_change(self.used)


@dataclass
class _Pending:
    header: Header
    key: bytes
    data: np.ndarray
    filled: int = 0
    next_index: int = 0
    seen: int = 0  # messages of this batch received
    wire: int = 0


@dataclass
class _Dead:
    """A batch answered before all its chunks came: ``seen`` of ``count`` messages arrived so far."""

    count: int
    seen: int


_CLOSED = object()  # an id whose batch is over: another batch with it is a duplicate


def _key(batch_id: str) -> bytes:
    return hashlib.blake2b(batch_id.encode(), digest_size=16).digest()


class StreamAssembler:
    """Reassembles one stream's batches; see the module docstring for the rules."""

    def __init__(self, limits: BatchLimits, slots: Slots | None = None, recent_ids: int = RECENT_IDS) -> None:
        self.limits = limits
        self._slots = slots or Slots(1 << 30)
        self._recent = recent_ids
        self._ids: OrderedDict[bytes, object] = OrderedDict()
        self._pending: _Pending | None = None

    @property
    def pending(self) -> str | None:
        """The id of the batch whose chunks are still arriving, if any."""
        return self._pending.header.batch_id if self._pending else None

    @property
    def held_bytes(self) -> int:
        """Bytes received for the pending batch (what the stream must hold in the memory budget)."""
        return self._pending.filled if self._pending else 0

    def feed(self, msg: pb.ProtectRequest, refuse: Refusal | None = None,
             refuse_new: Refusal | None = None) -> list[Outcome]:
        """Takes one message; returns the answers it settles, in order (0, 1 or 2 of them).

        ``refuse`` fails the batch the message belongs to (pending or new) with that error;
        ``refuse_new`` does so only when the message starts a new batch (e.g. while draining).
        """
        out: list[Outcome] = []
        key = _key(msg.batch_id)
        count = max(1, msg.chunk_count)
        p = self._pending
        if p is not None and p.key != key:
            out.append(self._fail(BatchError(
                p.header.batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk sequence broken: a message of batch {shown_id(msg.batch_id)!r} came after chunk "
                f"{p.next_index - 1} of {p.header.chunk_count}; send each batch's chunks consecutively")))
            p = None
        if p is not None:
            out.extend(self._continue(p, msg, count, refuse))
            return out
        seen = self._ids.get(key)
        if isinstance(seen, _Dead) and seen.count == count and seen.seen < seen.count:
            seen.seen += 1  # a leftover chunk of a batch already answered: dropped
            if seen.seen == seen.count:
                self._remember(key, _CLOSED)
            return out
        try:
            if seen is not None:
                raise BatchError(msg.batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                                 "batch_id already used in this stream; ids must be unique within a stream")
            for refusal in (refuse, refuse_new):
                if refusal is not None:
                    raise refusal(msg.batch_id)
            header = parse_header(msg, self.limits)
            if count > 1 and not self._slots.take():
                raise BatchError(msg.batch_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"the server is already reassembling {self._slots.capacity} chunked batches "
                                 "(--max-reassembling); resend later", retry_after=1.0)
        except BatchError as e:
            self._remember(key, _CLOSED if count == 1 else _Dead(count, 1))
            out.append(Failed(e))
            return out
        self._pending = _Pending(header, key, np.empty(header.nbytes, np.uint8))
        self._remember(key, _CLOSED)  # while pending it is matched by self._pending; closed once settled
        out.extend(self._continue(self._pending, msg, count, None))
        return out

    def expire(self, seconds: float) -> Outcome | None:
        """The pending batch's next chunk did not come within ``seconds``: fails it, freeing its memory."""
        p = self._pending
        if p is None:
            return None
        return self._fail(BatchError(
            p.header.batch_id, grpc.StatusCode.DEADLINE_EXCEEDED,
            f"chunk {p.next_index} of {p.header.chunk_count} did not arrive within {seconds:g}s; "
            "the partial batch was dropped"))

    def finish(self) -> Outcome | None:
        """The client closed the stream: fails a batch still missing chunks."""
        p = self._pending
        if p is None:
            return None
        return self._fail(BatchError(p.header.batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                                     f"stream ended after chunk {p.next_index - 1} of {p.header.chunk_count}, "
                                     "before the batch's last chunk arrived"))

    def close(self) -> None:
        """The stream is gone: forgets a pending batch (no answer can be sent) and frees its slot."""
        p = self._pending
        if p is not None:
            self._pending = None
            if p.header.chunk_count > 1:
                self._slots.give()

    # --- internals -----------------------------------------------------------------------------

    def _continue(self, p: _Pending, msg: pb.ProtectRequest, count: int, refuse: Refusal | None) -> list[Outcome]:
        p.seen += 1
        bid = p.header.batch_id
        if refuse is not None:
            return [self._fail(refuse(bid))]
        if msg.chunk_index != p.next_index or count != p.header.chunk_count:
            return [self._fail(BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                          f"chunk sequence broken: got chunk {msg.chunk_index} of {count}, "
                                          f"expected chunk {p.next_index} of {p.header.chunk_count}"))]
        raw = msg.raw_data
        end = p.filled + len(raw)
        if end > p.header.nbytes:
            return [self._fail(BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                          f"raw_data is longer than shape {list(p.header.shape)} x "
                                          f"{p.header.dtype.itemsize} bytes = {p.header.nbytes} bytes"))]
        p.data[p.filled : end] = np.frombuffer(raw, np.uint8)
        p.filled, p.next_index, p.wire = end, p.next_index + 1, p.wire + msg.ByteSize()
        if p.next_index < p.header.chunk_count:
            return []
        if p.filled != p.header.nbytes:
            return [self._fail(BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                          f"raw_data holds {p.filled} bytes, shape {list(p.header.shape)} "
                                          f"needs {p.header.nbytes}"))]
        self._settle(p)
        return [Assembled(p.header, p.data, p.wire)]

    def _fail(self, error: BatchError) -> Failed:
        p = self._pending
        assert p is not None
        self._settle(p)
        if p.seen < p.header.chunk_count:
            self._remember(p.key, _Dead(p.header.chunk_count, p.seen))
        return Failed(error)

    def _settle(self, p: _Pending) -> None:
        self._pending = None
        self._remember(p.key, _CLOSED)
        if p.header.chunk_count > 1:
            self._slots.give()

    def _remember(self, key: bytes, state: object) -> None:
        self._ids[key] = state
        self._ids.move_to_end(key)
        while len(self._ids) > self._recent:
            self._ids.popitem(last=False)
