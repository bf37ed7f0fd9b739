"""The wire codec: chunking round trips, and each malformed batch named with its status code."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from advface.v1 import plugin_pb2 as pb

from advface.codec import (
    BatchError,
    BatchLimits,
    FaceStat,
    Options,
    Result,
    decode_response_chunks,
    encode_request,
    encode_result,
)
from plugin_service.server.reassembly import Failed, StreamAssembler
from tests.helpers import edited_request

LIMITS = BatchLimits((2, 3, 3), max_batch=8)


def _feed(messages: list[pb.ProtectRequest], limits: BatchLimits = LIMITS) -> list:
    """Every answer the messages settle, in order: a BatchError or a checked Batch."""
    r = StreamAssembler(limits)
    out = []
    for m in messages:
        for outcome in r.feed(m):
            if isinstance(outcome, Failed):
                out.append(outcome.error)
            else:
                try:
                    out.append(outcome.check(limits))
                except BatchError as e:
                    out.append(e)
    if (last := r.finish()) is not None:
        out.append(last.error)
    assert r.held_bytes == 0 and r.pending is None
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_chunked_round_trip(dtype: type) -> None:
    x = np.random.default_rng(0).random((5, 2, 3, 3)).astype(dtype)
    msgs = list(encode_request("b1", x, Options("advface", 7, 0.1), chunk_bytes=16))
    assert len(msgs) == int(np.ceil(x.nbytes / 16)) and msgs[1].shape == []
    (batch,) = _feed(msgs)
    assert batch.batch_id == "b1" and batch.features.dtype == dtype
    np.testing.assert_array_equal(batch.features, x)
    assert batch.options == Options("advface", 7, pytest.approx(0.1))


def test_result_round_trip() -> None:
    x = np.random.default_rng(1).random((2, 2, 3, 3)).astype(np.float32)
    stats = [FaceStat(0.1, 0.2, 0.05), FaceStat(0.3, 0.4, 0.06)]
    msgs = list(encode_result(Result("b", x, stats, "abc"), chunk_bytes=10))
    back = decode_response_chunks(msgs)
    np.testing.assert_array_equal(back.features, x)
    assert back.model_version == "abc" and back.stats[1].shadow_loss_after == pytest.approx(0.4)


def _one(x: np.ndarray, bid: str = "b", **fields: object) -> pb.ProtectRequest:
    return edited_request(bid, x, **fields)


GOOD = np.ones((2, 2, 3, 3), np.float32)


@pytest.mark.parametrize("msg, code, words", [
    (_one(GOOD, shape=[2, 2, 4, 4]), grpc.StatusCode.INVALID_ARGUMENT, "does not match"),
    (_one(GOOD, datatype=0), grpc.StatusCode.INVALID_ARGUMENT, "unsupported datatype"),
    (_one(GOOD, raw_data=GOOD.tobytes()[:-4]), grpc.StatusCode.INVALID_ARGUMENT, "needs 144"),
    (_one(GOOD, raw_data=GOOD.tobytes() + b"1234"), grpc.StatusCode.INVALID_ARGUMENT, "longer than"),
    (_one(np.full((2, 2, 3, 3), np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "36 NaN or Inf"),
    # permanent: more faces than the policy allows is INVALID_ARGUMENT, never a retryable RESOURCE_EXHAUSTED
    (_one(np.ones((9, 2, 3, 3), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "accepts 1 to 8"),
    (_one(GOOD, bid=""), grpc.StatusCode.INVALID_ARGUMENT, "batch_id"),
    (_one(GOOD, chunk_index=1, chunk_count=2), grpc.StatusCode.INVALID_ARGUMENT, "chunk sequence broken"),
])
def test_malformed_batches(msg: pb.ProtectRequest, code: grpc.StatusCode, words: str) -> None:
    (err,) = _feed([msg])
    assert isinstance(err, BatchError) and err.code == code and words in str(err)
    assert f"batch {msg.batch_id!r}" in str(err)


def test_broken_sequence_fails_one_batch_and_the_next_succeeds() -> None:
    x = np.random.default_rng(2).random((4, 2, 3, 3)).astype(np.float32)
    a = list(encode_request("a", x, chunk_bytes=32))
    b = list(encode_request("b", x, chunk_bytes=32))
    c = list(encode_request("c", x, chunk_bytes=32))
    # a: chunk 2 skipped; b: interrupted by c half way; c: intact
    out = _feed(a[:2] + a[3:] + b[:2] + c)
    assert [type(o).__name__ for o in out] == ["BatchError", "BatchError", "Batch"]
    assert out[0].batch_id == "a" and "expected chunk 2" in out[0].detail
    assert out[1].batch_id == "b" and "batch 'c' came after chunk 1" in out[1].detail
    np.testing.assert_array_equal(out[2].features, x)


def test_error_names_batch_but_not_values() -> None:
    bad = np.full((2, 2, 3, 3), 123.456, np.float32)
    bad[0, 0, 0, 0] = np.nan
    (err,) = _feed([_one(bad)])
    assert "123.45" not in str(err)
