"""Two real `advface serve` replicas; one is killed mid-run and no batch is lost.

The replicas are subprocesses on the tiny bundle, so a kill is a real kill: SIGKILL (a crash, a
lost node) or SIGTERM (a rollout, a scale-in: drain, then exit). Several streams run at once
through one GuardClient, spread over both replicas by client-side round_robin (what the headless
Service in deploy/k8s gives) or by nginx (deploy/nginx/advface-grpc.conf; integration tests).
Every batch must come back exactly once, in order, protected and from its own input, though one
replica dies while it holds unanswered batches: the client resends those to the survivor.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from advface.codec import BatchError
from advface_client.client import GuardClient

from tests.helpers import (
    FEATURE_SHAPE,
    ROOT,
    ServerProcess,
    free_port,
    poll_until,
    spawn_server,
)
from tests.test_deploy_support import require_tool

STREAMS, BATCHES_PER_STREAM, FACES = 4, 6, 2
PACED = 3  # batches each stream has answered before the kill; the rest are sent after it
DRAIN_SECONDS = 10
pytestmark = pytest.mark.slow  # two `advface serve` subprocesses per test


Replica = ServerProcess  # one `advface serve` subprocess of the pair


def _spawn(name: str, bundle: Path, workdir: Path) -> Replica:
    return spawn_server(bundle, workdir, "--warmup-faces", "1", "--torch-threads", "1", "--protectors", "advface",
                        "--drain-seconds", str(DRAIN_SECONDS), name=name, env={"OMP_NUM_THREADS": "1"})


def _ok_batches(replica: Replica) -> float:
    return replica.sample("advface_batches_total", method="ProtectStream", code="OK")


def _info_calls(replica: Replica) -> float:
    return replica.sample("advface_requests_total", method="GetModelInfo", code="OK")


@pytest.fixture
def replicas(tiny_bundle: Path, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    pair = (_spawn("a", tiny_bundle, tmp_path), _spawn("b", tiny_bundle, tmp_path))  # start both, then wait
    try:
        for r in pair:
            r.wait_serving()
        yield pair
    finally:
        for r in pair:
            r.stop()


def _batches(stream: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1000 + stream)
    # non-negative, like the post-ReLU features E produces
    return [(f"s{stream}-b{i}", rng.random((FACES, *FEATURE_SHAPE), dtype=np.float32))
            for i in range(BATCHES_PER_STREAM)]


@dataclass
class Run:
    inputs: dict[int, list[tuple[str, np.ndarray]]]
    results: dict[int, list]
    served_by_a_before: float
    served_by_b_before: float


def _connect_both(client: GuardClient, a: Replica, b: Replica) -> None:
    """round_robin only picks connected replicas: on this very channel, both must have answered a call."""
    poll_until(lambda: client.info() and _info_calls(a) >= 1 and _info_calls(b) >= 1,
               "GetModelInfo calls answered by both replicas", timeout=30)


def _stopped_serving(replica: Replica, sig: signal.Signals) -> None:
    """Returns once ``replica`` can no longer take a batch: dead (SIGKILL), or draining (SIGTERM: its health
    Watch reports NOT_SERVING, which the server sets right after it starts refusing batches)."""
    if sig == signal.SIGKILL:
        replica.proc.wait(timeout=30)
        return
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(replica.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        first = next(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        replica.proc.send_signal(sig)
        try:
            for update in watch:
                if update.status != health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            return  # the server closed the watch as it stopped: it was draining


def _stream_and_kill(target: str, a: Replica, b: Replica, sig: signal.Signals) -> Run:
    """STREAMS concurrent streams through ``target``; ``a`` gets ``sig`` at a known point of the run.

    The run is paced, not timed: every stream sends PACED batches, and only once all of them are
    answered (a known number, spread over both replicas) is ``a`` killed; the streams' remaining
    batches are released only after ``a`` can no longer serve, so the run cannot end first and the
    streams on ``a`` must resend to ``b``.
    """
    inputs = {k: _batches(k) for k in range(STREAMS)}
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    paced_answered = threading.Semaphore(0)
    killed = threading.Event()

    def paced(k: int) -> Iterator[tuple[str, np.ndarray]]:
        for i, item in enumerate(inputs[k]):
            if i == PACED:
                assert killed.wait(180), "the kill never came"
            yield item

    with GuardClient(target, max_retries=8, backoff_seconds=0.2) as client:
        _connect_both(client, a, b)

        def run(k: int) -> None:
            try:
                got = []
                for result in client.protect_stream(paced(k), window=2):
                    got.append(result)
                    if len(got) == PACED:
                        paced_answered.release()
                results[k] = got
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                paced_answered.release()

        threads = [threading.Thread(target=run, args=(k,), name=f"stream-{k}") for k in range(STREAMS)]
        for t in threads:
            t.start()
        for _ in range(STREAMS):
            assert paced_answered.acquire(timeout=180), "the paced batches were not answered"
        assert errors == [], errors
        # the replicas count a batch once its answer is written, a moment after the client has it
        poll_until(lambda: _ok_batches(a) + _ok_batches(b) == STREAMS * PACED, "the answered batches' counts",
                   timeout=30)
        served_by_a_before, served_by_b_before = _ok_batches(a), _ok_batches(b)
        if sig == signal.SIGKILL:
            a.proc.send_signal(sig)
        _stopped_serving(a, sig)
        killed.set()
        for t in threads:
            t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a stream hung after the kill"
    assert errors == [], errors
    assert served_by_a_before >= 2 and served_by_b_before >= 1  # the streams were spread over both replicas
    return Run(inputs, results, served_by_a_before, served_by_b_before)


def _check_answers(run: Run) -> None:
    """Every batch answered exactly once, in order, without error, protected."""
    for k, batches in run.inputs.items():
        got = run.results[k]
        assert [r.batch_id for r in got] == [bid for bid, _ in batches]
        for (bid, x), r in zip(batches, got, strict=True):
            assert r.error is None, (bid, r.error)
            assert r.features.shape == x.shape and np.isfinite(r.features).all()
            assert not np.array_equal(r.features, x)
            assert len(r.stats) == FACES


def _check_retried(caplog: pytest.LogCaptureFixture) -> None:
    """The kill hit batches in flight: the client had to resend some."""
    assert [rec for rec in caplog.records if "retrying" in rec.getMessage()], "no stream was interrupted by the kill"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_two_replicas_one_killed_mid_run_loses_no_batch(replicas: tuple[Replica, Replica], sig: signal.Signals,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    a, b = replicas
    caplog.set_level(logging.WARNING, logger="advface_client.client")
    run = _stream_and_kill(f"{a.address},{b.address}", a, b, sig)
    _check_answers(run)
    _check_retried(caplog)
    if sig == signal.SIGTERM:  # drained: exits by itself, cleanly, within the drain time
        assert a.proc.wait(timeout=DRAIN_SECONDS + 20) == 0, a.output()[-3000:]
        assert "draining" in a.output()
    else:
        assert a.proc.wait(timeout=10) == -signal.SIGKILL
    assert b.proc.poll() is None
    assert _ok_batches(b) > run.served_by_b_before  # the survivor took over the killed replica's batches

    # each answer belongs to its own batch: the protection is deterministic, so the survivor, asked
    # again without interruption, gives the same features for every batch
    with GuardClient(b.address) as client:
        for k, batches in run.inputs.items():
            for r, ref in zip(run.results[k], client.protect_stream(iter(batches), window=2), strict=True):
                assert ref.batch_id == r.batch_id
                np.testing.assert_allclose(r.features, ref.features, rtol=1e-5, atol=1e-5, err_msg=r.batch_id)


# --- the same through nginx (deploy/nginx/advface-grpc.conf), for hosts without Kubernetes --------------

def _nginx_config(workdir: Path, listen: int, upstreams: list[str]) -> Path:
    site = (ROOT / "deploy" / "nginx" / "advface-grpc.conf").read_text()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:\d+ (.*);$", site, flags=re.M)
    assert len(servers) == 2, "the template lists two replicas"
    site = re.sub(r"^\s*server 127\.0\.0\.1:\d+ .*;\n", "", site, flags=re.M)
    site = site.replace("upstream advface {\n", "upstream advface {\n" + "".join(
        f"    server {u} {servers[0]};\n" for u in upstreams))
    site, n = re.subn(r"listen \d+ http2;", f"listen 127.0.0.1:{listen} http2;", site)
    assert n == 1
    for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / f"{d}_temp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body_temp;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
{site}
}}
""")
    return conf


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    poll_until(listening, f"nginx to listen on port {port}", timeout, interval=0.1, proc=proc)


@pytest.fixture
def nginx_front(replicas: tuple[Replica, Replica], tmp_path: Path) -> Iterator[str]:
    binary = require_tool("nginx")
    port = free_port()
    conf = _nginx_config(tmp_path, port, [r.address for r in replicas])
    check = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        with GuardClient(f"127.0.0.1:{port}", timeout=5) as client:
            client.wait_until_serving(timeout=20)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.integration
def test_nginx_spreads_streams_and_survives_a_killed_replica(replicas: tuple[Replica, Replica], nginx_front: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    a, b = replicas
    caplog.set_level(logging.WARNING, logger="advface_client.client")
    run = _stream_and_kill(nginx_front, a, b, signal.SIGKILL)
    _check_answers(run)
    _check_retried(caplog)
    assert _ok_batches(b) > run.served_by_b_before


@pytest.mark.integration
def test_nginx_without_replicas_answers_unavailable(tmp_path: Path) -> None:
    """With every replica gone nginx answers gRPC UNAVAILABLE (which clients retry), not an HTTP error."""
    import grpc

    binary = require_tool("nginx")
    port = free_port()
    conf = _nginx_config(tmp_path, port, [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"])
    proc = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        with GuardClient(f"127.0.0.1:{port}", timeout=5, max_retries=0) as client:
            with pytest.raises(grpc.RpcError) as rpc:
                client.health()
            assert rpc.value.code() == grpc.StatusCode.UNAVAILABLE, rpc.value
            assert rpc.value.details() == "no AdvFace replica available"
            with pytest.raises(BatchError) as info:
                client.protect(np.zeros((1, *FEATURE_SHAPE), np.float32))
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(timeout=10)
