"""The wire codec: ProtectRequest/ProtectResponse messages <-> NumPy arrays, with chunking.

This is the only place where bytes become arrays. Both the server and the client library use
it, so encoding and decoding cannot disagree; it needs grpc, protobuf and NumPy, never PyTorch
or the server package, so the client installs without them. Every problem with a batch raises
:class:`BatchError` carrying a gRPC status code and a message that names the batch, never
the feature values. Batch ids come from clients and may be arbitrarily long, so they are shown
through :func:`shown_id` (bounded) in every message and log line; the server's per-stream
reassembly rules live in ``plugin_service/server/reassembly.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from advface.v1 import plugin_pb2 as pb
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_BATCH_ID_BYTES = 128
SHOWN_ID_CHARS = 64
# Largest raw_data a unary Protect accepts: its response (the same bytes plus per-face stats and
# ids) must fit the 4 MiB that default gRPC clients (Python, grpc-js, Go) accept.
UNARY_MAX_BYTES = 4 * 2**20 - 64 * 2**10
# Accepted feature values when the bundle does not record a bound (``--max-feature-value``).
DEFAULT_FEATURE_BOUND = 1e4
WIRE_DTYPES: dict[int, np.dtype] = {pb.FP32: np.dtype("<f4"), pb.FP16: np.dtype("<f2")}
DTYPE_NAMES = {pb.FP32: "FP32", pb.FP16: "FP16"}


def shown_id(batch_id: str) -> str:
    """A batch id bounded for messages and logs: long ids keep their first 64 characters and their size."""
    if len(batch_id) <= SHOWN_ID_CHARS and len(batch_id.encode()) <= MAX_BATCH_ID_BYTES:
        return batch_id
    return f"{batch_id[:SHOWN_ID_CHARS]}…({len(batch_id.encode())} bytes)"


def response_id(batch_id: str) -> str:
    """The id echoed in a response: the client's id when valid, else its bounded form (never megabytes)."""
    return batch_id if len(batch_id.encode()) <= MAX_BATCH_ID_BYTES else shown_id(batch_id)


def check_batch_id(batch_id: str) -> None:
    if not batch_id or len(batch_id.encode()) > MAX_BATCH_ID_BYTES:
        raise BatchError(batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                         f"batch_id must be 1 to {MAX_BATCH_ID_BYTES} bytes, got {len(batch_id.encode())}")


class BatchError(Exception):
    """A batch cannot be served; ``code`` is the gRPC status it is answered with.

    ``retry_after`` (seconds) is set only for temporary conditions (queue or memory full,
    too many streams): the answer then carries a ``google.rpc.RetryInfo`` and clients may
    resend. Without it the error is permanent and resending the same batch fails again.
    """

    def __init__(self, batch_id: str, code: grpc.StatusCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"batch {shown_id(batch_id)!r}: {message}")
        self.batch_id, self.code, self.detail, self.retry_after = batch_id, code, message, retry_after

    def status(self) -> status_pb2.Status:
        """As a google.rpc.Status, with RetryInfo when the condition is temporary."""
        return status_with_retry(self.code, str(self), self.retry_after)


def status_with_retry(code: grpc.StatusCode, message: str, retry_after: float | None) -> status_pb2.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    if retry_after is not None:
        detail = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        status.details.append(detail)
    return status


def retry_delay(status: status_pb2.Status) -> float | None:
    """The RetryInfo delay in a status, in seconds; None when the status carries none (permanent)."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


def strip_prefix(batch_id: str, message: str) -> str:
    """A server message without its "batch '...': " prefix (the client adds its own)."""
    for shown in (shown_id(batch_id), response_id(batch_id), batch_id):
        message = message.removeprefix(f"batch {shown!r}: ")
    return message


@dataclass(frozen=True)
class Options:
    """Per-batch protector options as sent; empty/zero/None means the server default."""

    protector: str = ""
    steps: int = 0
    eps: float | None = None


@dataclass
class Batch:
    batch_id: str
    features: np.ndarray
    options: Options = field(default_factory=Options)
    wire_bytes: int = 0


@dataclass(frozen=True)
class FaceStat:
    shadow_loss_before: float
    shadow_loss_after: float
    perturbation_norm: float


@dataclass
class Result:
    batch_id: str
    features: np.ndarray | None
    stats: list[FaceStat] = field(default_factory=list)
    model_version: str = ""
    error: BatchError | None = None
    protector: str = ""  # server side: which protector produced the features (for the metrics)


def wire_dtype(array: np.ndarray) -> int:
    for code, dtype in WIRE_DTYPES.items():
        if array.dtype == dtype or array.dtype == dtype.newbyteorder("="):
            return code
    raise ValueError(f"features must be float32 or float16, got {array.dtype}")


def _raw_chunks(array: np.ndarray, chunk_bytes: int) -> Iterator[bytes]:
    data = memoryview(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).reshape(-1).view(np.uint8))
    if len(data) == 0:
        yield b""
    for start in range(0, len(data), chunk_bytes):
        yield bytes(data[start : start + chunk_bytes])


def chunk_count(array: np.ndarray, chunk_bytes: int) -> int:
    return max(1, math.ceil(array.nbytes / chunk_bytes))


def encode_request(batch_id: str, features: np.ndarray, options: Options = Options(),
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.ProtectRequest]:
    """One batch as a sequence of request messages of at most ``chunk_bytes`` of data each."""
    count = chunk_count(features, chunk_bytes)
    opts = pb.ProtectorOptions(protector=options.protector, steps=options.steps)
    if options.eps is not None:
        opts.eps = options.eps
    for i, raw in enumerate(_raw_chunks(features, chunk_bytes)):
        msg = pb.ProtectRequest(batch_id=batch_id, chunk_index=i, chunk_count=count, raw_data=raw)
        if i == 0:
            msg.datatype = wire_dtype(features)
            msg.shape.extend(features.shape)
            msg.options.CopyFrom(opts)
        yield msg


def encode_result(result: Result, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[pb.ProtectResponse]:
    """A result (or its error) as response messages."""
    if result.error is not None or result.features is None:
        yield error_response(result.error or BatchError(result.batch_id, grpc.StatusCode.INTERNAL, "no result"))
        return
    arr = result.features
    count = chunk_count(arr, chunk_bytes)
    for i, raw in enumerate(_raw_chunks(arr, chunk_bytes)):
        msg = pb.ProtectResponse(batch_id=result.batch_id, chunk_index=i, chunk_count=count, raw_data=raw)
        if i == 0:
            msg.datatype = wire_dtype(arr)
            msg.shape.extend(arr.shape)
            msg.model_version = result.model_version
            msg.face_stats.extend(pb.FaceStats(shadow_loss_before=s.shadow_loss_before,
                                               shadow_loss_after=s.shadow_loss_after,
                                               perturbation_norm=s.perturbation_norm) for s in result.stats)
        yield msg


def error_response(error: BatchError) -> pb.ProtectResponse:
    return pb.ProtectResponse(batch_id=response_id(error.batch_id), chunk_index=0, chunk_count=1, error=error.status())


@dataclass(frozen=True)
class BatchLimits:
    """What the server accepts; a header is checked against it before any memory is reserved.

    ``max_batch_bytes`` is the memory budget (a larger batch could never be held);
    ``value_range`` bounds every feature value (the bundle's recorded bound, or
    ``--max-feature-value``), so absurd finite values cannot collapse a batch's BatchNorm.
    """

    feature_shape: tuple[int, ...]
    max_batch: int
    max_batch_bytes: int = 2**62
    value_range: tuple[float, float] = (-DEFAULT_FEATURE_BOUND, DEFAULT_FEATURE_BOUND)


@dataclass(frozen=True)
class Header:
    """A batch's first message, validated: what its data must add up to."""

    batch_id: str
    chunk_count: int
    shape: tuple[int, ...]
    dtype: np.dtype
    options: Options

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_header(msg: pb.ProtectRequest, limits: BatchLimits) -> Header:
    """Validates a batch's first message (id, position, datatype, shape, size); allocates nothing."""
    bid = msg.batch_id
    check_batch_id(bid)
    if msg.chunk_index != 0:
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk sequence broken: first message of the batch has chunk_index {msg.chunk_index}, expected 0")
    if msg.datatype not in WIRE_DTYPES:
        name = pb.DataType.Name(msg.datatype) if msg.datatype in pb.DataType.values() else msg.datatype
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT, f"unsupported datatype {name}; send FP32 or FP16")
    shape = tuple(msg.shape)
    want = limits.feature_shape
    if len(shape) != 1 + len(want) or shape[1:] != want:
        shown = list(shape[:8]) + (["..."] if len(shape) > 8 else [])
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                         f"shape {shown} does not match [N, {', '.join(map(str, want))}] of the loaded bundle")
    # Too many faces is permanent (resending cannot help): INVALID_ARGUMENT, never RetryInfo.
    if not 1 <= shape[0] <= limits.max_batch:
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                         f"batch of {shape[0]} faces; the server accepts 1 to {limits.max_batch}")
    o = msg.options
    header = Header(bid, max(1, msg.chunk_count), shape, WIRE_DTYPES[msg.datatype],
                    Options(o.protector, o.steps, o.eps if o.HasField("eps") else None))
    if header.nbytes > limits.max_batch_bytes:
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                         f"batch needs {header.nbytes / 2**20:.0f} MiB, over the server's memory budget of "
                         f"{limits.max_batch_bytes / 2**20:.0f} MiB; send fewer faces per batch")
    if header.chunk_count > max(1, header.nbytes):
        raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk_count {header.chunk_count} exceeds the batch's {header.nbytes} bytes")
    return header


VALUE_CHECK_BLOCK = 1 << 22  # elements per pass: bounds the temporaries of checking a 390 MB batch


def check_values(batch_id: str, features: np.ndarray, value_range: tuple[float, float]) -> None:
    """Counts NaN/Inf and out-of-range values; raises naming how many, never which values."""
    lo, hi = value_range
    flat = features.reshape(-1)
    non_finite = out_of_range = 0
    for start in range(0, flat.size, VALUE_CHECK_BLOCK):
        block = flat[start : start + VALUE_CHECK_BLOCK]
        finite = np.isfinite(block)
        non_finite += block.size - int(np.count_nonzero(finite))
        out_of_range += int(np.count_nonzero(finite & ((block < lo) | (block > hi))))
    if non_finite:
        raise BatchError(batch_id, grpc.StatusCode.INVALID_ARGUMENT, f"features hold {non_finite} NaN or Inf values")
    if out_of_range:
        raise BatchError(batch_id, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{out_of_range} of {flat.size} feature values lie outside the accepted range "
                         f"[{lo:g}, {hi:g}]; were they produced by this bundle's extractor?")


def decode_response_chunks(messages: Sequence[pb.ProtectResponse]) -> Result:
    """Joins one batch's response messages into a :class:`Result` (client side)."""
    first = messages[0]
    if first.HasField("error") and first.error.code != 0:
        code = next((c for c in grpc.StatusCode if c.value[0] == first.error.code), grpc.StatusCode.UNKNOWN)
        detail = strip_prefix(first.batch_id, first.error.message)
        return Result(first.batch_id, None,
                      error=BatchError(first.batch_id, code, detail, retry_after=retry_delay(first.error)))
    dtype = WIRE_DTYPES[first.datatype]
    raw = b"".join(m.raw_data for m in messages)
    features = np.frombuffer(raw, dtype=dtype).reshape(tuple(first.shape)).astype(dtype.newbyteorder("="), copy=False)
    stats = [FaceStat(s.shadow_loss_before, s.shadow_loss_after, s.perturbation_norm) for s in first.face_stats]
    return Result(first.batch_id, features, stats, first.model_version)
