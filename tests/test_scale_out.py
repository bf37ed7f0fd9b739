"""Two real `advface serve` replicas behind client-side round-robin; one is killed mid-run.

The replicas are subprocesses on the tiny bundle, so a kill is a real kill: SIGKILL (a crash, a
lost node) or SIGTERM (a rollout, a scale-in: drain, then exit). Several streams run at once
through one GuardClient; round_robin spreads them over both replicas. Every batch must come back
exactly once, in order, protected, and paired with its own input, though one replica dies while
it holds unanswered batches: the client resends those to the survivor.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from advface_client.client import GuardClient
from tests.conftest import free_port
from tests.test_deploy_support import ROOT

FEATURE_SHAPE = (64, 77, 77)
STREAMS, BATCHES_PER_STREAM, FACES = 4, 6, 2
DRAIN_SECONDS = 10


@dataclass
class Replica:
    name: str
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def sample(self, name: str, **labels: str) -> float:
        """A sample's value from the replica's own /metrics (0 if the series does not exist yet)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and s.labels == labels)

    def ok_batches(self) -> float:
        return self.sample("advface_batches_total", method="ProtectStream", code="OK")

    def info_calls(self) -> float:
        return self.sample("advface_requests_total", method="GetModelInfo", code="OK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _spawn(name: str, bundle: Path, workdir: Path) -> Replica:
    port, metrics_port = free_port(), free_port()
    log = workdir / f"{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADVFACE_")}  # flags below decide
    env.update(OMP_NUM_THREADS="1", ADVFACE_NO_PROGRESS="1")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "plugin_service.cli", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port), "--device", "cpu", "--warmup-faces", "1",
             "--torch-threads", "1", "--protectors", "advface", "--drain-seconds", str(DRAIN_SECONDS)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Replica(name, proc, port, metrics_port, log)


def _wait_serving(replica: Replica, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with GuardClient(replica.address, timeout=2) as client:
        while True:
            if replica.proc.poll() is not None:
                raise AssertionError(f"replica {replica.name} exited with {replica.proc.returncode}:\n"
                                     f"{replica.log.read_text()[-3000:]}")
            try:
                if client.health() == "SERVING":
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"replica {replica.name} not SERVING in {timeout}s:\n{replica.log.read_text()[-3000:]}")
            time.sleep(0.3)


@pytest.fixture
def replicas(tiny_bundle: Path, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    pair = (_spawn("a", tiny_bundle, tmp_path), _spawn("b", tiny_bundle, tmp_path))  # start both, then wait
    try:
        for r in pair:
            _wait_serving(r)
        yield pair
    finally:
        for r in pair:
            r.stop()


def _batches(stream: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1000 + stream)
    # non-negative, like the post-ReLU features E produces
    return [(f"s{stream}-b{i}", rng.random((FACES, *FEATURE_SHAPE), dtype=np.float32))
            for i in range(BATCHES_PER_STREAM)]


def _wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_two_replicas_one_killed_mid_run_loses_no_batch(replicas: tuple[Replica, Replica], sig: signal.Signals,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    a, b = replicas
    inputs = {k: _batches(k) for k in range(STREAMS)}
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    caplog.set_level(logging.WARNING, logger="advface_client.client")

    with GuardClient(f"{a.address},{b.address}", max_retries=8, backoff_seconds=0.2) as client:
        client.wait_until_serving(timeout=30)
        # let round_robin connect to both replicas before the streams start (it only picks READY ones)
        _wait_until(lambda: client.info() and a.info_calls() >= 1 and b.info_calls() >= 1, 15,
                    "GetModelInfo calls answered by both replicas")

        def run(k: int) -> None:
            try:
                results[k] = list(client.protect_stream(iter(inputs[k]), window=2))
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k,), name=f"stream-{k}") for k in range(STREAMS)]
        for t in threads:
            t.start()
        # kill `a` once both replicas have answered batches and streams are still running
        _wait_until(lambda: a.ok_batches() >= 2 and b.ok_batches() >= 1 or not any(t.is_alive() for t in threads),
                    60, "both replicas to serve batches")
        served_by_a_before = a.ok_batches()
        served_by_b_before = b.ok_batches()
        assert any(t.is_alive() for t in threads), "the run ended before the kill; make it longer"
        a.proc.send_signal(sig)
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a stream hung after the kill"

    assert errors == []
    assert served_by_a_before >= 2 and served_by_b_before >= 1  # both replicas served batches
    total = STREAMS * BATCHES_PER_STREAM
    for k, batches in inputs.items():
        got = results[k]
        assert [r.batch_id for r in got] == [bid for bid, _ in batches]  # each exactly once, in order
        for (bid, x), r in zip(batches, got, strict=True):
            assert r.error is None, (bid, r.error)
            assert r.features.shape == x.shape and np.isfinite(r.features).all()
            assert not np.array_equal(r.features, x)  # protected
            assert len(r.stats) == FACES

    # the kill hit batches in flight: the client had to resend some
    retries = [rec for rec in caplog.records if "retrying" in rec.getMessage()]
    assert retries, "no stream was interrupted by the kill"

    if sig == signal.SIGTERM:  # drained: exits by itself, cleanly, within the drain time
        assert a.proc.wait(timeout=DRAIN_SECONDS + 20) == 0, a.log.read_text()[-3000:]
        assert "draining" in a.log.read_text()
    else:
        assert a.proc.wait(timeout=10) == -signal.SIGKILL
        # `a` answered at most what it had answered before it died; `b` answered all the rest
        assert b.ok_batches() >= total - served_by_a_before
    assert b.proc.poll() is None
    assert b.ok_batches() > served_by_b_before  # the survivor took over the killed replica's batches

    # each answer belongs to its own batch: the protection is deterministic, so the survivor,
    # asked again without interruption, gives the same features for every batch
    with GuardClient(b.address) as client:
        for k, batches in inputs.items():
            for r, ref in zip(results[k], client.protect_stream(iter(batches), window=2), strict=True):
                assert ref.batch_id == r.batch_id
                np.testing.assert_allclose(r.features, ref.features, rtol=1e-5, atol=1e-5, err_msg=r.batch_id)

