"""The wire codec: ProtectRequest/ProtectResponse messages <-> NumPy arrays, with chunking.

This is the only place where bytes become arrays. Both the server and the client library use
it, so encoding and decoding cannot disagree. Every problem with a batch raises
:class:`BatchError` carrying a gRPC status code and a message that names the batch, never
the feature values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import status_pb2

from advface.v1 import plugin_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_BATCH_ID_BYTES = 128
WIRE_DTYPES: dict[int, np.dtype] = {pb.FP32: np.dtype("<f4"), pb.FP16: np.dtype("<f2")}
DTYPE_NAMES = {pb.FP32: "FP32", pb.FP16: "FP16"}


class BatchError(Exception):
    """A batch cannot be served; ``code`` is the gRPC status it is answered with."""

    def __init__(self, batch_id: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"batch {batch_id!r}: {message}")
        self.batch_id, self.code, self.detail = batch_id, code, message


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
    status = status_pb2.Status(code=error.code.value[0], message=str(error))
    return pb.ProtectResponse(batch_id=error.batch_id, chunk_index=0, chunk_count=1, error=status)


@dataclass(frozen=True)
class BatchLimits:
    """What the server accepts; checked on a batch's first chunk, before any memory is reserved."""

    feature_shape: tuple[int, ...]
    max_batch: int


class Reassembler:
    """Collects the chunks of one batch at a time and checks them against the limits.

    Per message: :meth:`interrupted_by` fails a pending batch that another batch cut into,
    :meth:`is_leftover` drops the rest of a batch that already failed, :meth:`expected_bytes`
    on a first chunk gives the memory to reserve, and :meth:`add` returns the finished
    :class:`Batch` on the last chunk. Any inconsistency raises :class:`BatchError`.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._id: str | None = None
        self._buffer: bytearray | None = None
        self._filled = 0
        self._next = 0
        self._count = 0
        self._shape: tuple[int, ...] = ()
        self._dtype = np.dtype("<f4")
        self._options = Options()
        self._wire = 0
        self._discard: str | None = None  # id of a failed batch whose remaining chunks are dropped

    @property
    def pending(self) -> str | None:
        """The id of a batch whose chunks are still arriving, if any."""
        return self._id

    def reset(self) -> None:
        self._id, self._buffer, self._filled, self._next, self._wire = None, None, 0, 0, 0

    def interrupted_by(self, msg: pb.ProtectRequest) -> BatchError | None:
        """If ``msg`` starts another batch while one is pending, fails and forgets the pending one."""
        if self._id is None or msg.batch_id == self._id:
            return None
        error = BatchError(self._id, grpc.StatusCode.INVALID_ARGUMENT,
                           f"chunk sequence broken: batch {msg.batch_id!r} started after chunk "
                           f"{self._next} of {self._count}")
        self.reset()
        return error

    def reject(self, batch_id: str) -> None:
        """Forgets a batch that failed outside :meth:`add`; its remaining chunks become leftovers."""
        self.reset()
        self._discard = batch_id

    def is_leftover(self, msg: pb.ProtectRequest) -> bool:
        """True for a later chunk of a batch that already failed: it was answered, drop it."""
        return self._id is None and msg.batch_id == self._discard and msg.chunk_index != 0

    def expected_bytes(self, msg: pb.ProtectRequest) -> int:
        """Validates a batch's header (chunk 0) and returns the size of its features in bytes."""
        bid = msg.batch_id
        if not bid or len(bid.encode()) > MAX_BATCH_ID_BYTES:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             f"batch_id must be 1 to {MAX_BATCH_ID_BYTES} bytes")
        if msg.chunk_index != 0:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             f"chunk sequence broken: first message of the batch has chunk_index {msg.chunk_index}, expected 0")
        if msg.datatype not in WIRE_DTYPES:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             f"unsupported datatype {pb.DataType.Name(msg.datatype) if msg.datatype in pb.DataType.values() else msg.datatype}; "
                             "send FP32 or FP16")
        shape = tuple(msg.shape)
        want = self.limits.feature_shape
        if len(shape) != 1 + len(want) or shape[1:] != want:
            raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                             f"shape {list(shape)} does not match [N, {', '.join(map(str, want))}] of the loaded bundle")
        if not 1 <= shape[0] <= self.limits.max_batch:
            code = grpc.StatusCode.INVALID_ARGUMENT if shape[0] < 1 else grpc.StatusCode.RESOURCE_EXHAUSTED
            raise BatchError(bid, code, f"batch of {shape[0]} faces; the server accepts 1 to {self.limits.max_batch}")
        return int(np.prod(shape)) * WIRE_DTYPES[msg.datatype].itemsize

    def add(self, msg: pb.ProtectRequest) -> Batch | None:
        bid = msg.batch_id
        count = max(1, msg.chunk_count)
        if self._id is None:
            try:
                size = self.expected_bytes(msg)
            except BatchError:
                self._discard = bid
                raise
            self._id, self._count, self._next = bid, count, 0
            self._shape, self._dtype = tuple(msg.shape), WIRE_DTYPES[msg.datatype]
            o = msg.options
            self._options = Options(o.protector, o.steps, o.eps if o.HasField("eps") else None)
            self._buffer, self._filled, self._wire = bytearray(size), 0, 0
        try:
            if msg.chunk_index != self._next or count != self._count:
                raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"chunk sequence broken: got chunk {msg.chunk_index} of {count}, "
                                 f"expected chunk {self._next} of {self._count}")
            assert self._buffer is not None
            end = self._filled + len(msg.raw_data)
            if end > len(self._buffer):
                raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"raw_data is longer than shape {list(self._shape)} x {self._dtype.itemsize} bytes "
                                 f"= {len(self._buffer)} bytes")
            self._buffer[self._filled : end] = msg.raw_data
            self._filled, self._next = end, self._next + 1
            self._wire += msg.ByteSize()
            if self._next < self._count:
                return None
            if self._filled != len(self._buffer):
                raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT,
                                 f"raw_data holds {self._filled} bytes, shape {list(self._shape)} needs {len(self._buffer)}")
            features = np.frombuffer(self._buffer, dtype=self._dtype).reshape(self._shape)
            if not np.isfinite(features).all():
                bad = int(features.size - np.isfinite(features).sum())
                raise BatchError(bid, grpc.StatusCode.INVALID_ARGUMENT, f"features hold {bad} NaN or Inf values")
            batch = Batch(bid, features.astype(self._dtype.newbyteorder("="), copy=False), self._options, self._wire)
        except BatchError:
            self.reject(bid)
            raise
        self.reset()
        return batch


def decode_response_chunks(messages: Sequence[pb.ProtectResponse]) -> Result:
    """Joins one batch's response messages into a :class:`Result` (client side)."""
    first = messages[0]
    if first.HasField("error") and first.error.code != 0:
        code = next((c for c in grpc.StatusCode if c.value[0] == first.error.code), grpc.StatusCode.UNKNOWN)
        detail = first.error.message.removeprefix(f"batch {first.batch_id!r}: ")
        return Result(first.batch_id, None, error=BatchError(first.batch_id, code, detail))
    dtype = WIRE_DTYPES[first.datatype]
    raw = b"".join(m.raw_data for m in messages)
    features = np.frombuffer(raw, dtype=dtype).reshape(tuple(first.shape)).astype(dtype.newbyteorder("="), copy=False)
    stats = [FaceStat(s.shadow_loss_before, s.shadow_loss_after, s.perturbation_norm) for s in first.face_stats]
    return Result(first.batch_id, features, stats, first.model_version)
