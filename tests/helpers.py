"""Helpers the test modules share; fixtures built on them live in conftest.py.

- Bundles and in-process servers: :func:`make_bundle`, :func:`server_settings`, :func:`run_live_server`
  (what the ``live_server`` and ``start_live_server`` fixtures use), :class:`LiveServer`.
- Requests: :func:`feature_source` (reproducible random z), :func:`edited_request` (malformed batches),
  :class:`HeldStream` and :func:`raw_stream` (ProtectStream below the client), :func:`code_of`.
- Waiting, never sleeping for synchronisation: :func:`wait_for_state` blocks on an in-process server's
  own state (``ServingState.wait_for``, woken on every change of its counts); :func:`poll_until` is for
  conditions outside this process (a subprocess's health, a file it writes, a /metrics scrape), re-checks
  them at a fixed interval, and fails naming what it waited for, or the process that died meanwhile.
- Metrics: :func:`registry_sample` (an in-process server's registry), :func:`scrape` and
  :func:`scraped_sum` (a /metrics endpoint over HTTP).
- Server subprocesses: :func:`spawn_server` starts `advface serve`; :class:`ServerProcess` waits for it,
  reads its metrics and log, and kills it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import torch
from advface.codec import Options, decode_response_chunks, encode_request
from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from plugin_service.bundle import Manifest, PGDDefaults, save_bundle
from plugin_service.config import ServerSettings
from plugin_service.models.extractor import Extractor
from plugin_service.models.shadow import ShadowSpec, build_shadow
from plugin_service.server.app import RunningServer, StartupError, drain_and_stop, start_server
from plugin_service.server.metrics import ServiceMetrics

ROOT = Path(__file__).resolve().parents[1]
FEATURE_SHAPE = (64, 77, 77)
TINY_SHADOW = ShadowSpec(arch="resrec", width=4, depth=1)
TINY_PGD = PGDDefaults(steps=3, alpha=0.2, eps=0.2)

T = TypeVar("T")


# --- bundles and in-process servers -----------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(path: Path, spec: ShadowSpec = TINY_SHADOW, pgd: PGDDefaults = TINY_PGD, seed: int = 0) -> Path:
    """A bundle with a random E and a small shadow S, written to ``path``."""
    torch.manual_seed(seed)
    extractor = Extractor()
    save_bundle(path, Manifest(split="conv2d_2b", shadow=spec, feature_shape=FEATURE_SHAPE, pgd=pgd,
                               provenance={"shadow_identities": "test_identity_a,test_identity_b"}),
                extractor, build_shadow(spec))
    return path


@dataclass
class LiveServer:
    """A server running on its own event loop in a thread of the test process."""

    address: str
    metrics_url: str
    metrics: ServiceMetrics
    running: RunningServer
    loop: asyncio.AbstractEventLoop

    def call(self, coro):  # noqa: ANN001, ANN201 - runs a coroutine on the server's loop
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)


def server_settings(bundle: Path, **overrides: object) -> ServerSettings:
    """Loopback settings for tests (CPU, 2 threads, one warm-up face, a free metrics port), with overrides."""
    base = ServerSettings(bundle=bundle, host="127.0.0.1", port=0, metrics_port=free_port(), device="cpu",
                          max_batch=256, protectors="advface,random,dp", warmup_faces=1, torch_threads=2)
    return replace(base, **overrides).validate()  # type: ignore[arg-type]


def run_live_server(settings: ServerSettings) -> Iterator[LiveServer]:
    """Starts a server in this process, yields it once, then drains and stops it (use with ``yield from``)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    for attempt in range(5):
        metrics = ServiceMetrics()
        try:
            running = asyncio.run_coroutine_threadsafe(start_server(settings, metrics), loop).result(timeout=120)
            break
        except StartupError as e:
            # free_port() released the port before the server bound it, and an ephemeral bind (the
            # server's own gRPC port 0, a client socket) can take it in between: take another one.
            if "cannot serve metrics" not in str(e) or attempt == 4:
                raise
            settings = replace(settings, metrics_port=free_port())
    live = LiveServer(f"127.0.0.1:{running.port}", f"http://127.0.0.1:{settings.metrics_port}/metrics",
                      metrics, running, loop)
    try:
        yield live
    finally:
        live.call(drain_and_stop(running, grace=5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


# --- requests ----------------------------------------------------------------------------------------

def feature_source(seed: int) -> Callable[..., np.ndarray]:
    """``features(n, dtype=np.float32)``: n random z in [0, 0.5), drawn from one generator seeded ``seed``.

    Each test module makes its own, so its draws do not depend on which other modules ran.
    """
    rng = np.random.default_rng(seed)

    def features(n: int, dtype: type = np.float32) -> np.ndarray:
        return (rng.random((n, *FEATURE_SHAPE)) * 0.5).astype(dtype)

    return features


def edited_request(batch_id: str, z, options=None, **fields: object):  # noqa: ANN001, ANN201
    """A one-message ProtectRequest for ``z`` with some fields overwritten, to build malformed batches."""
    (msg,) = encode_request(batch_id, z, options or Options(), chunk_bytes=8 << 20)
    for k, v in fields.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(msg, k, v)
    return msg


class HeldStream:
    """A ProtectStream whose request side sends ``messages`` and then waits for :meth:`go` (more messages or the end).

    Until :meth:`go` the stream is not half-closed; :meth:`close` cancels it without half-closing.
    """

    def __init__(self, address: str, messages: list[pb.ProtectRequest],
                 channel_options: Sequence[tuple[str, object]] = ()) -> None:
        self._go = threading.Event()
        self.sent = threading.Event()  # set once ``messages`` have all been handed to gRPC
        self._more: list[pb.ProtectRequest] = []
        self.channel = grpc.insecure_channel(address, options=list(channel_options))
        self.call = pb_grpc.AdvFaceGuardStub(self.channel).ProtectStream(self._requests(messages), timeout=120)

    def _requests(self, first: list[pb.ProtectRequest]) -> Iterator[pb.ProtectRequest]:
        yield from first
        self.sent.set()
        self._go.wait(120)
        yield from self._more

    def go(self, more: list[pb.ProtectRequest] = ()) -> None:  # type: ignore[assignment]
        self._more = list(more)
        self._go.set()

    def answers(self) -> Iterator:
        """Decoded answers (``BatchResult``) as their last chunk arrives; fails if the stream ends mid-answer."""
        chunks: list[pb.ProtectResponse] = []
        for msg in self.call:
            chunks.append(msg)
            if len(chunks) == max(1, chunks[0].chunk_count):
                yield decode_response_chunks(chunks)
                chunks = []
        assert not chunks, "a response was cut short"

    def close(self) -> None:
        """Cancels the call (a no-op once it has ended) before releasing the request side, so it never half-closes."""
        self.call.cancel()
        self._go.set()
        self.channel.close()


def raw_stream(address: str, messages: list[pb.ProtectRequest]) -> list:
    """Sends ``messages`` on one ProtectStream, half-closes, and returns every decoded answer in order."""
    held = HeldStream(address, messages)
    held.go()
    try:
        return list(held.answers())
    finally:
        held.close()


def code_of(result) -> grpc.StatusCode:  # noqa: ANN001
    """The gRPC status code of one batch's answer (OK when it carries no error)."""
    return result.error.code if result.error else grpc.StatusCode.OK


# --- waiting -----------------------------------------------------------------------------------------

def wait_for_state(live: LiveServer, predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Blocks until ``predicate`` holds on the server's state; it is re-checked on every change of its counts."""
    live.call(live.running.state.wait_for(predicate, timeout))


def poll_until(condition: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.05,
               proc: subprocess.Popen | None = None, log: Path | None = None) -> T:
    """Re-checks ``condition`` every ``interval`` seconds until it is truthy, and returns its value.

    Only for conditions outside this process, which no event announces. Fails after ``timeout``, or as
    soon as ``proc`` (the process expected to bring the condition about) has exited; ``log``'s tail is
    added to the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        tail = f":\n{log.read_text()[-3000:]}" if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)


# --- metrics -----------------------------------------------------------------------------------------

def registry_sample(live: LiveServer, name: str, **labels: str) -> float:
    """A sample's value in an in-process server's registry (0 if the series does not exist yet)."""
    return live.metrics.registry.get_sample_value(name, labels or None) or 0.0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics endpoint, keyed by (name, sorted label items)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def scraped_sum(url: str, name: str, **labels: str) -> float:
    """The sum of a /metrics endpoint's samples named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(value for (n, items), value in scrape(url).items() if n == name and wanted <= set(items))


# --- server subprocesses -----------------------------------------------------------------------------

@dataclass
class ServerProcess:
    """An `advface serve` subprocess on loopback, its output (stdout and stderr) in ``log``."""

    name: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path
    respawn: Callable[[], ServerProcess] | None = None  # the same command on fresh ports

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        return self.log.read_text()

    def sample(self, name: str, **labels: str) -> float:
        """A sample's value from the server's own /metrics (0 if the series does not exist yet)."""
        return scraped_sum(self.metrics_url, name, **labels)

    def wait_serving(self, timeout: float = 120) -> None:
        """Returns once its health check says SERVING; fails if it exits first or after ``timeout``.

        free_port() releases a port before the server binds it, and any ephemeral bind in between
        can take it: a server that exits because its port was taken is started again on fresh ones.
        """
        for attempt in range(5):
            try:
                return self._poll_serving(timeout)
            except AssertionError:
                lost_port = self.proc.poll() is not None and any(
                    reason in self.output() for reason in ("cannot listen on", "cannot serve metrics"))
                if self.respawn is None or not lost_port or attempt == 4:
                    raise
                fresh = self.respawn()
                self.proc, self.port, self.metrics_port = fresh.proc, fresh.port, fresh.metrics_port

    def _poll_serving(self, timeout: float) -> None:
        from advface_client import GuardClient

        with GuardClient(self.address, timeout=2) as client:

            def serving() -> bool:
                try:
                    return client.health() == "SERVING"
                except Exception:  # noqa: BLE001 - not listening yet
                    return False

            poll_until(serving, f"{self.name} to be SERVING", timeout, interval=0.3, proc=self.proc, log=self.log)

    def stop(self) -> None:
        """Kills it if it still runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def spawn_server(bundle: Path, workdir: Path, *flags: str, name: str = "server", metrics_port: int | None = None,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """Starts `python -m plugin_service.cli serve` on a free loopback port (CPU) with ``flags`` added.

    ADVFACE_* variables of the test environment are dropped so the flags alone decide (progress bars
    stay off); ``env`` adds variables. Output goes to ``workdir/<name>.log``.
    """
    port = free_port()
    bound_metrics_port = free_port() if metrics_port is None else metrics_port
    log = workdir / f"{name}.log"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_")}
    run_env.update(ADVFACE_NO_PROGRESS="1", PYTHONUNBUFFERED="1", **(env or {}))
    cmd: Sequence[str] = [sys.executable, "-m", "plugin_service.cli", "serve", "--bundle", str(bundle),
                          "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(bound_metrics_port),
                          "--device", "cpu", *flags]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env, stdout=out, stderr=subprocess.STDOUT)
    return ServerProcess(name, proc, port, bound_metrics_port, log, respawn=lambda: spawn_server(
        bundle, workdir, *flags, name=name, metrics_port=metrics_port, env=env))
