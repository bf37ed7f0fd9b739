"""GuardClient: one-batch calls, and an ordered, bounded, retrying stream of batches.

The stream keeps at most ``window`` batches unanswered, so memory stays bounded however long
the input is. When the connection breaks (UNAVAILABLE), or a replica answers a batch with
UNAVAILABLE because it is draining, the client opens a new stream, after a backoff, and resends
every batch not yet answered, in order; each batch is yielded exactly once.

Only temporary errors are retried: UNAVAILABLE, and RESOURCE_EXHAUSTED when the server attached a
``google.rpc.RetryInfo`` (queue or memory full, too many streams). Everything else, including a
batch larger than the server allows, is permanent and raised (or yielded) at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from grpc_status import rpc_status

from advface_client.targets import channel_target
from advface.codec import (
    DEFAULT_CHUNK_BYTES,
    UNARY_MAX_BYTES,
    BatchError,
    Options,
    Result,
    check_batch_id,
    decode_response_chunks,
    encode_request,
    response_id,
    retry_delay,
    strip_prefix,
)

log = logging.getLogger(__name__)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)  # always temporary; RESOURCE_EXHAUSTED only with RetryInfo


def _temporary(code: grpc.StatusCode, retry_after: float | None) -> bool:
    return code in RETRYABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after is not None)


def _call_retry_after(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay a failed call carries, if any."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:
        return None
    return retry_delay(status) if status is not None else None


@dataclass(frozen=True)
class TLSConfig:
    """PEM files for a TLS channel; all optional (system roots, no client certificate).

    ``client_cert`` and ``client_key`` go together (mutual TLS). ``server_name`` is the name the
    server's certificate must carry when it is not the host dialled (an IP address, a tunnel).
    """

    ca_cert: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("a client certificate and its key go together (mutual TLS): give both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key), read(self.client_cert))


def _auth_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    if token is None:
        return None
    token = token.strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError("the bearer token is empty or contains whitespace")
    return (("authorization", f"Bearer {token}"),)


class _Abandon(Exception):
    """Internal: the current stream must be restarted from the first unanswered batch."""

    def __init__(self, error: BatchError | None = None) -> None:
        super().__init__(str(error) if error else "stream ended with batches unanswered")
        self.error = error
        self.code = error.code if error else grpc.StatusCode.UNAVAILABLE
        self.retry_after = error.retry_after if error else None


class _Pending:
    """The batches taken from the caller's iterator and not yet answered, shared across attempts.

    Batches are numbered in the order they were taken (``seq``); an attempt sends by number, so a
    batch that an abandoned attempt took from the source after the new attempt started is still
    sent by the new one. A slow source (reading images, running E) is advanced under its own
    lock, so it never holds up the thread reading answers.
    """

    def __init__(self, source: Iterator[tuple[str, np.ndarray]]) -> None:
        self.source, self.unanswered, self.exhausted = source, deque[tuple[str, np.ndarray]](), False
        self.answered_count = 0  # seq of unanswered[0]
        self.lock = threading.Lock()  # guards the fields above; never held while the source computes
        self.source_lock = threading.Lock()

    def finished(self) -> bool:
        with self.lock:
            return self.exhausted and not self.unanswered

    def first_id(self) -> str:
        with self.lock:
            return self.unanswered[0][0]

    def answered(self) -> None:
        with self.lock:
            self.unanswered.popleft()
            self.answered_count += 1

    def get(self, seq: int) -> tuple[str, np.ndarray] | None:
        """Batch number ``seq`` if it was taken and is unanswered."""
        with self.lock:
            i = seq - self.answered_count
            return self.unanswered[i] if 0 <= i < len(self.unanswered) else None

    def take(self, seq: int, stop: threading.Event) -> tuple[str, np.ndarray] | None:
        """Batch number ``seq``, from the source if not taken yet; None when exhausted or this attempt stopped."""
        with self.source_lock:
            if (item := self.get(seq)) is not None:
                return item
            if stop.is_set() or self.exhausted:
                return None
            item = next(self.source, None)
            with self.lock:
                if item is None:
                    self.exhausted = True
                    return None
                self.unanswered.append(item)
                return item


class _Attempt:
    """One ProtectStream call: resends what is unanswered, then takes new batches while it has credit."""

    def __init__(self, pending: _Pending, window: int) -> None:
        self.pending = pending
        with pending.lock:
            self.next_seq, backlog = pending.answered_count, len(pending.unanswered)
        self.credit = threading.Semaphore(max(window - backlog, 0))
        self.stop = threading.Event()

    def requests(self, options: Options, chunk_bytes: int) -> Iterator[pb.ProtectRequest]:
        while not self.stop.is_set():
            item = self.pending.get(self.next_seq)  # unanswered by an earlier attempt: resend
            if item is None:
                while not self.credit.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                item = self.pending.take(self.next_seq, self.stop)
                if item is None:
                    return
            self.next_seq += 1
            yield from encode_request(item[0], item[1], options, chunk_bytes)


class GuardClient:
    """A connection to one service address (or several, comma-separated, balanced round-robin).

    ``target`` is resolved as :func:`advface_client.targets.channel_target` describes (host names
    or IP literals). ``tls`` turns on TLS (mutual with a client certificate); ``token`` is sent as
    ``authorization: Bearer <token>`` with every call.

    Example::

        with GuardClient("localhost:50051") as client:
            stored = client.protect(features).features
            for result in client.protect_stream(("id-%d" % i, b) for i, b in enumerate(batches)):
                save(result.batch_id, result.features)
    """

    def __init__(self, target: str, tls: TLSConfig | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 max_retries: int = 5, backoff_seconds: float = 0.5, timeout: float | None = None,
                 token: str | None = None) -> None:
        resolved = channel_target(target)
        self._metadata = _auth_metadata(token)
        options: list[tuple[str, object]] = [("grpc.lb_policy_name", "round_robin")]
        self.target = target
        if tls is not None:
            if name := tls.server_name or resolved.authority:
                options.append(("grpc.ssl_target_name_override", name))
            self.channel = grpc.secure_channel(resolved.target, tls.credentials(), options)
        else:
            self.channel = grpc.insecure_channel(resolved.target, options)
        if token is not None and tls is None:
            log.warning("sending a bearer token to %s without TLS: anyone on the network path can read it", target)
        self.stub = pb_grpc.AdvFaceGuardStub(self.channel)
        self.chunk_bytes, self.max_retries, self.backoff, self.timeout = chunk_bytes, max_retries, backoff_seconds, timeout
        self._ids = itertools.count()

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout or 30, wait_for_ready=True,
                                      metadata=self._metadata)

    def health(self, service: str = "") -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} did not report SERVING within {timeout:.0f}s")
            time.sleep(0.2)

    def protect(self, features: np.ndarray, batch_id: str | None = None, options: Options = Options()) -> Result:
        """Protects one batch; raises :class:`BatchError` if the server rejects it."""
        batch_id = batch_id or f"batch-{next(self._ids)}"
        check_batch_id(batch_id)
        if features.nbytes <= UNARY_MAX_BYTES:
            (request,) = encode_request(batch_id, features, options, UNARY_MAX_BYTES)
            try:
                response = self._with_retries(lambda: self.stub.Protect(request, timeout=self.timeout, wait_for_ready=True,
                                                                        metadata=self._metadata))
            except grpc.RpcError as e:
                raise BatchError(batch_id, e.code(), strip_prefix(batch_id, e.details() or "")) from e
            result = decode_response_chunks([response])
        else:
            (result,) = self.protect_stream([(batch_id, features)], options)
        if result.error is not None:
            raise result.error
        return result

    def _with_retries(self, call):  # noqa: ANN001, ANN202
        for attempt in itertools.count():
            try:
                return call()
            except grpc.RpcError as e:
                retry_after = _call_retry_after(e)
                if not _temporary(e.code(), retry_after) or attempt >= self.max_retries:
                    raise
                self._sleep(attempt, e.code(), retry_after)

    def _sleep(self, attempt: int, why: grpc.StatusCode, retry_after: float | None = None) -> None:
        delay = max(min(self.backoff * 2**attempt, 30.0), min(retry_after or 0.0, 30.0))
        log.warning("%s from %s; retrying in %.1fs (attempt %d of %d)", why.name, self.target, delay,
                    attempt + 1, self.max_retries)
        time.sleep(delay)

    def protect_stream(self, batches: Iterable[tuple[str, np.ndarray]], options: Options = Options(),
                       window: int = 4) -> Iterator[Result]:
        """Streams ``(batch_id, features)`` pairs; yields one :class:`Result` per batch, in order.

        A batch the server rejects (bad shape, NaN, policy...) is yielded with ``error`` set
        and the stream goes on. Connection loss is retried up to ``max_retries`` times in a row.
        """
        pending = _Pending(iter(batches))
        failures = 0
        while not pending.finished():
            attempt = _Attempt(pending, window)
            call = self.stub.ProtectStream(attempt.requests(options, self.chunk_bytes), timeout=self.timeout,
                                           wait_for_ready=True, metadata=self._metadata)
            try:
                for result in self._results(call):
                    expected = pending.first_id()
                    if result.batch_id != response_id(expected):  # invalid (over-long) ids come back bounded
                        raise RuntimeError(f"server answered batch {result.batch_id!r} while {expected!r} was due")
                    result.batch_id = expected
                    if result.error is not None:
                        result.error.batch_id = expected
                    if result.error is not None and _temporary(result.error.code, result.error.retry_after):
                        raise _Abandon(result.error)
                    pending.answered()
                    attempt.credit.release()
                    failures = 0
                    yield result
                if not pending.finished():
                    raise _Abandon()
            except (grpc.RpcError, _Abandon) as e:
                if isinstance(e, grpc.RpcError):
                    code, retry_after = e.code(), _call_retry_after(e)
                    if code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (e.details() or ""):
                        code = grpc.StatusCode.UNAVAILABLE  # a proxy reset the stream: its replica died
                else:
                    code, retry_after = e.code, e.retry_after
                if not _temporary(code, retry_after) or failures >= self.max_retries:
                    if isinstance(e, _Abandon) and e.error is not None:
                        raise e.error from None
                    raise
                self._sleep(failures, code, retry_after)
                failures += 1
            finally:
                attempt.stop.set()
                call.cancel()

    @staticmethod
    def _results(call: Iterable[pb.ProtectResponse]) -> Iterator[Result]:
        chunks: list[pb.ProtectResponse] = []
        for msg in call:
            chunks.append(msg)
            if len(chunks) >= max(1, chunks[0].chunk_count):
                yield decode_response_chunks(chunks)
                chunks = []
