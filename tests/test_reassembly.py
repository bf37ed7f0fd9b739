"""Stream reassembly: exactly one answer per batch however the chunks come, memory only for bytes received."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from advface.v1 import plugin_pb2 as pb

from advface.codec import (
    BatchError,
    BatchLimits,
    encode_request,
    error_response,
    retry_delay,
    shown_id,
)
from plugin_service.server.reassembly import Assembled, Failed, Slots, StreamAssembler
from tests.helpers import edited_request

LIMITS = BatchLimits((2, 3, 3), max_batch=8, max_batch_bytes=1 << 20, value_range=(0.0, 100.0))
X = np.random.default_rng(0).random((4, 2, 3, 3)).astype(np.float32)


def chunks(bid: str, x: np.ndarray = X, chunk_bytes: int = 64) -> list[pb.ProtectRequest]:
    return list(encode_request(bid, x, chunk_bytes=chunk_bytes))


def answers(messages: list[pb.ProtectRequest], assembler: StreamAssembler | None = None) -> list[tuple[str, str]]:
    """(batch_id, code name) of every answer, in order, the stream ending after ``messages``."""
    r = assembler or StreamAssembler(LIMITS)
    out = []
    for outcome in [o for m in messages for o in r.feed(m)] + [r.finish()]:
        if isinstance(outcome, Failed):
            out.append((outcome.error.batch_id, outcome.error.code.name))
        elif isinstance(outcome, Assembled):
            try:
                out.append((outcome.check(LIMITS).batch_id, "OK"))
            except BatchError as e:
                out.append((e.batch_id, e.code.name))
    assert r.held_bytes == 0
    return out


def test_interleaved_batches_are_answered_once_each() -> None:
    a, b = chunks("a"), chunks("b")
    interleaved = [m for pair in zip(a, b, strict=True) for m in pair]
    assert answers(interleaved + chunks("c")) == [("a", "INVALID_ARGUMENT"), ("b", "INVALID_ARGUMENT"), ("c", "OK")]


def test_chunk_one_before_chunk_zero_is_answered_once() -> None:
    a = chunks("a")
    assert answers([a[1], a[0], *a[2:]] + chunks("b")) == [("a", "INVALID_ARGUMENT"), ("b", "OK")]


def test_a_duplicate_batch_id_is_rejected_once() -> None:
    got = answers(chunks("a") + chunks("a") + chunks("b"))
    assert got == [("a", "OK"), ("a", "INVALID_ARGUMENT"), ("b", "OK")]
    r = StreamAssembler(LIMITS)
    for m in chunks("a"):
        r.feed(m)
    (dup, *rest) = [o for m in chunks("a") for o in r.feed(m)]
    assert rest == [] and "already used in this stream" in dup.error.detail


def test_a_failed_batch_resent_whole_is_a_duplicate_after_its_leftovers() -> None:
    a = chunks("a")
    broken = a[:1] + a[2:]  # chunk 1 missing: answered at chunk 2, the rest dropped
    assert answers(broken + [a[1]] + a) == [("a", "INVALID_ARGUMENT"), ("a", "INVALID_ARGUMENT")]


def test_memory_is_held_only_for_bytes_received_and_sizes_checked_first() -> None:
    r = StreamAssembler(BatchLimits((2, 3, 3), max_batch=8))
    # a header promising 8 faces in 100 chunks with 10 bytes of data holds 10 bytes, not 576
    msg = edited_request("big", np.zeros((8, 2, 3, 3), np.float32), raw_data=b"0123456789", chunk_count=100)
    assert r.feed(msg) == [] and r.held_bytes == 10
    # a header over the memory budget is refused before anything is allocated, permanently
    small = StreamAssembler(BatchLimits((2, 3, 3), max_batch=8, max_batch_bytes=100))
    (failed,) = small.feed(edited_request("huge", np.zeros((8, 2, 3, 3), np.float32)))
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT and "memory budget" in failed.error.detail
    assert failed.error.retry_after is None and small.held_bytes == 0


def test_a_silent_batch_expires_its_leftovers_are_dropped_and_the_stream_goes_on() -> None:
    r = StreamAssembler(LIMITS)
    a = chunks("a")
    assert r.feed(a[0]) == [] and r.held_bytes > 0
    expired = r.expire(30)
    assert expired.error.code == grpc.StatusCode.DEADLINE_EXCEEDED and "within 30s" in expired.error.detail
    assert r.held_bytes == 0 and r.pending is None
    assert answers(a[1:] + chunks("b"), r) == [("b", "OK")]


def test_chunked_batches_beyond_the_global_limit_are_refused_with_retry_info() -> None:
    slots = Slots(1)
    first, second = StreamAssembler(LIMITS, slots), StreamAssembler(LIMITS, slots)
    assert first.feed(chunks("a")[0]) == []
    (refused,) = second.feed(chunks("b")[0])
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.error.retry_after == 1.0
    assert "--max-reassembling" in refused.error.detail
    assert answers(chunks("b")[1:], second) == []  # its other chunks were dropped: answered once
    first.close()
    assert slots.used == 0 and answers(chunks("c"), second) == [("c", "OK")]


@pytest.mark.parametrize("values, count", [
    (lambda x: x.__setitem__((0, 0, 0, 0), 3e38), 1),
    (lambda x: x.__setitem__(slice(None), 1e30), X.size),
    (lambda x: x.__setitem__((1, 1), -1e30), 9),
])
def test_out_of_range_values_are_counted_never_shown(values, count: int) -> None:  # noqa: ANN001
    x = X.copy()
    values(x)
    ((bid, code),) = answers([edited_request("r", x)])
    r = StreamAssembler(LIMITS)
    (assembled,) = r.feed(edited_request("r", x))
    with pytest.raises(BatchError) as info:
        assembled.check(LIMITS)
    assert code == "INVALID_ARGUMENT" and f"{count} of {x.size} feature values" in info.value.detail
    assert "[0, 100]" in info.value.detail and "e+30" not in str(info.value) and "e+38" not in str(info.value)


def test_fp16_features_within_the_bound_pass() -> None:
    assert answers(chunks("h", X.astype(np.float16), chunk_bytes=50)) == [("h", "OK")]


def test_over_long_batch_ids_are_rejected_and_echoed_bounded() -> None:
    bid = "x" * 3_000_000
    (failed,) = StreamAssembler(LIMITS).feed(edited_request(bid, X))
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT and "1 to 128 bytes" in str(failed.error)
    assert len(str(failed.error)) < 300 and "…(3000000 bytes)" in str(failed.error)
    response = error_response(failed.error)
    assert response.ByteSize() < 500 and response.batch_id == shown_id(bid)
    assert shown_id("short") == "short" and shown_id("é" * 65).endswith("…(130 bytes)")


def test_only_temporary_errors_carry_retry_info() -> None:
    temporary = BatchError("t", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after=1.0)
    permanent = BatchError("p", grpc.StatusCode.INVALID_ARGUMENT, "too many faces")
    assert retry_delay(temporary.status()) == 1.0 and retry_delay(permanent.status()) is None
