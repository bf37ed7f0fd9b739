"""End to end over a real loopback socket: streams, big batches, errors, health, drain, metrics."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from advface.codec import encode_request
from advface.v1 import plugin_pb2_grpc as pb_grpc
from advface_client import BatchError, GuardClient, Options
from grpc_health.v1 import health_pb2, health_pb2_grpc

from plugin_service.bundle import load_bundle
from plugin_service.models.shadow import batch_statistics
from tests.helpers import (
    LiveServer,
    edited_request,
    feature_source,
    free_port,
    poll_until,
    raw_stream,
    scrape,
    server_settings,
    spawn_server,
)

features = feature_source(seed=0)


def shadow_feature(bundle_path: Path, z: np.ndarray) -> np.ndarray:
    """z~ = E(S(z)) with batch statistics, computed independently of the service."""
    b = load_bundle(bundle_path)
    with torch.no_grad(), batch_statistics():
        return b.extractor(b.shadow(torch.from_numpy(z).float())).numpy()


def test_two_batch_stream_keeps_ids_order_and_eps_bound(live_server: LiveServer, tiny_bundle: Path) -> None:
    a, b = features(3), features(5)
    with GuardClient(live_server.address) as client:
        results = list(client.protect_stream([("first", a), ("second", b)]))
    assert [r.batch_id for r in results] == ["first", "second"]
    for r, z in zip(results, (a, b), strict=True):
        assert r.error is None and r.features.shape == z.shape and len(r.stats) == len(z)
        assert np.abs(r.features - shadow_feature(tiny_bundle, z)).max() <= 0.2 + 1e-5
        assert all(0 < s.perturbation_norm <= 0.2 + 1e-6 for s in r.stats)
        assert r.model_version == load_bundle(tiny_bundle).version


@pytest.mark.slow
def test_256_face_float32_batch_round_trips_with_default_settings(live_server: LiveServer) -> None:
    z = features(256)
    assert z.nbytes > 300 * 2**20  # ~390 MB: far above any default message limit
    with GuardClient(live_server.address) as client:
        result = client.protect(z, batch_id="big")
    assert result.batch_id == "big" and result.features.shape == (256, 64, 77, 77)
    assert result.features.dtype == np.float32 and len(result.stats) == 256
    assert np.isfinite(result.features).all()


def test_float16_on_the_wire(live_server: LiveServer) -> None:
    z = features(2, np.float16)
    with GuardClient(live_server.address) as client:
        result = client.protect(z)
    assert result.features.dtype == np.float16 and result.features.shape == z.shape


_single = edited_request


def test_each_malformed_batch_fails_alone(live_server: LiveServer) -> None:
    good = features(2)
    nan = good.copy()
    nan[1, 3, 4, 5] = np.nan
    chunked = list(encode_request("broken-chunks", features(2), chunk_bytes=100_000))
    bad_header = list(encode_request("bad-header-chunked", features(2), chunk_bytes=100_000))
    bad_header[0].datatype = 9
    messages = [
        _single("ok-1", good),
        _single("wrong-shape", features(2)[:, :32], shape=[2, 32, 77, 77]),
        _single("wrong-dtype", good, datatype=7),
        _single("nan", nan),
        _single("short-bytes", good, raw_data=good.tobytes()[:-8]),
        _single("unknown-protector", good, Options(protector="blur")),
        _single("disabled-protector", good, Options(protector="none")),
        _single("steps-out-of-policy", good, Options(steps=1000)),
        _single("eps-out-of-policy", good, Options(eps=0.001)),
        *chunked[:2], *chunked[3:],  # chunk 2 missing
        *bad_header,  # rejected on its first chunk: answered once, the other chunks are dropped
        _single("ok-2", good),
    ]
    results = raw_stream(live_server.address, messages)
    codes = {r.batch_id: (r.error.code if r.error else grpc.StatusCode.OK) for r in results}
    assert [r.batch_id for r in results] == [
        "ok-1", "wrong-shape", "wrong-dtype", "nan", "short-bytes", "unknown-protector", "disabled-protector",
        "steps-out-of-policy", "eps-out-of-policy", "broken-chunks", "bad-header-chunked", "ok-2"]
    assert codes == {
        "ok-1": grpc.StatusCode.OK, "wrong-shape": grpc.StatusCode.INVALID_ARGUMENT,
        "wrong-dtype": grpc.StatusCode.INVALID_ARGUMENT, "nan": grpc.StatusCode.INVALID_ARGUMENT,
        "short-bytes": grpc.StatusCode.INVALID_ARGUMENT, "unknown-protector": grpc.StatusCode.INVALID_ARGUMENT,
        "disabled-protector": grpc.StatusCode.PERMISSION_DENIED, "steps-out-of-policy": grpc.StatusCode.OUT_OF_RANGE,
        "eps-out-of-policy": grpc.StatusCode.OUT_OF_RANGE, "broken-chunks": grpc.StatusCode.INVALID_ARGUMENT,
        "bad-header-chunked": grpc.StatusCode.INVALID_ARGUMENT, "ok-2": grpc.StatusCode.OK}
    for r in results:
        if r.error:
            assert r.batch_id in str(r.error)
    assert "NaN" in next(r for r in results if r.batch_id == "nan").error.detail


def test_unary_errors_are_call_statuses(live_server: LiveServer) -> None:
    with grpc.insecure_channel(live_server.address) as channel:
        stub = pb_grpc.AdvFaceGuardStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Protect(_single("u", features(1), shape=[1, 64, 7, 7]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'u'" in info.value.details()
        ok = stub.Protect(_single("v", features(1)))
        assert ok.batch_id == "v" and list(ok.shape) == [1, 64, 77, 77]
    with GuardClient(live_server.address) as client, pytest.raises(BatchError) as err:
        client.protect(features(1), options=Options(eps=9.0))
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE


def test_model_info_health_and_reflection(live_server: LiveServer, tiny_bundle: Path) -> None:
    with GuardClient(live_server.address) as client:
        info = client.info()
        assert info.model_version == load_bundle(tiny_bundle).version
        assert list(info.feature_shape) == [64, 77, 77] and info.device == "cpu"
        assert info.protector == "advface" and info.protector_params["steps"] == "3"
        assert list(info.policy.protectors) == ["advface", "random", "dp"] and info.policy.max_batch == 256
        assert client.health() == "SERVING" and client.health("advface.v1.AdvFaceGuard") == "SERVING"
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(live_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (resp,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in resp.list_services_response.service}
    assert {"advface.v1.AdvFaceGuard", "grpc.health.v1.Health"} <= names


def test_metrics_move_by_exactly_what_the_calls_did(live_server: LiveServer) -> None:
    before = scrape(live_server.metrics_url)
    with GuardClient(live_server.address) as client:
        results = list(client.protect_stream([("m1", features(3)), ("m2", features(4))]))
        with pytest.raises(BatchError):
            client.protect(features(1), batch_id="bad", options=Options(steps=999))
    after = scrape(live_server.metrics_url)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # An RPC is counted when its handler returns, which can be just after the client has its answer.
    def counted() -> bool:
        nonlocal after
        after = scrape(live_server.metrics_url)
        return delta("advface_requests_total", method="Protect", code="OUT_OF_RANGE") >= 1

    poll_until(counted, "the failed Protect call to be counted", timeout=10)

    assert all(r.error is None for r in results)
    assert delta("advface_faces_protected_total", protector="advface") == 7
    assert delta("advface_batches_total", method="ProtectStream", code="OK") == 2
    assert delta("advface_batches_total", method="Protect", code="OUT_OF_RANGE") == 1
    assert delta("advface_requests_total", method="ProtectStream", code="OK") == 1
    assert delta("advface_requests_total", method="Protect", code="OUT_OF_RANGE") == 1
    assert delta("advface_batch_size_faces_count") == 2 and delta("advface_batch_size_faces_sum") == 7
    assert delta("advface_batch_size_faces_bucket", le="4.0") == 2 and delta("advface_batch_size_faces_bucket", le="2.0") == 0
    assert delta("advface_shadow_loss_gain_ratio_count") == 7
    assert delta("advface_perturbation_norm_count") == 7
    assert delta("advface_compute_seconds_count") == 2 and delta("advface_queue_wait_seconds_count") == 2
    assert delta("advface_batch_latency_seconds_count") == 2
    assert delta("advface_wire_received_bytes_total") > 7 * 64 * 77 * 77 * 4
    assert delta("advface_wire_sent_bytes_total") > 7 * 64 * 77 * 77 * 4
    assert after[("advface_batches_in_flight", ())] == 0 and after[("advface_queue_depth", ())] == 0
    assert after[("advface_memory_budget_reserved_bytes", ())] == 0
    assert after[("advface_device_memory_bytes", ())] == 0  # CPU
    assert after[("advface_device_memory_capacity_bytes", ())] == 0
    info = next(k for k in after if k[0] == "advface_model_info")
    assert dict(info[1])["device"] == "cpu" and dict(info[1])["protector"] == "advface"


def test_full_queue_pushes_unary_calls_back_with_retry_info(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(queue_size=1, workers=1)
    z = features(2)
    codes: list[grpc.StatusCode] = []
    retry_hints: list[bool] = []

    def call(i: int) -> None:
        with grpc.insecure_channel(live.address) as channel:
            try:
                pb_grpc.AdvFaceGuardStub(channel).Protect(_single(f"c{i}", z, Options(steps=100)), timeout=120)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                keys = [k for k, _ in (e.trailing_metadata() or ())]
                retry_hints.append("grpc-status-details-bin" in keys)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert retry_hints and all(retry_hints)


def test_health_is_not_serving_until_warm_up_has_run(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm-up is held until the test has seen NOT_SERVING, so no machine is too fast to see it."""
    from plugin_service.engine import Engine
    from plugin_service.server.app import drain_and_stop, start_server

    warm_up, release, started = Engine.warm_up, threading.Event(), threading.Event()

    def gated(engine: Engine, faces: int) -> float:
        started.set()
        assert release.wait(timeout=120), "the test never released the warm-up"
        return warm_up(engine, faces)

    monkeypatch.setattr(Engine, "warm_up", gated)
    port = free_port()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    starting = asyncio.run_coroutine_threadsafe(start_server(server_settings(tiny_bundle, port=port, metrics_port=0)),
                                                loop)
    try:
        assert started.wait(timeout=120), "the server never reached its warm-up"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            before = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            release.set()
            running = starting.result(timeout=120)  # start_server returns once SERVING
            after = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert before == health_pb2.HealthCheckResponse.NOT_SERVING
        assert after == health_pb2.HealthCheckResponse.SERVING
        asyncio.run_coroutine_threadsafe(drain_and_stop(running, grace=5), loop).result(timeout=60)
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@pytest.mark.slow  # an `advface serve` subprocess
def test_sigterm_drains_a_batch_in_flight(tiny_bundle: Path, tmp_path: Path) -> None:
    server = spawn_server(tiny_bundle, tmp_path, "--drain-seconds", "60")
    proc = server.proc
    try:
        with GuardClient(server.address, max_retries=0) as client:
            client.wait_until_serving()
            outcome: dict[str, object] = {}

            def call() -> None:
                try:
                    outcome["result"] = client.protect(features(8), batch_id="in-flight", options=Options(steps=30))
                except Exception as e:  # noqa: BLE001
                    outcome["error"] = e

            t = threading.Thread(target=call)
            t.start()
            poll_until(lambda: scrape(server.metrics_url).get(("advface_batches_in_flight", ()), 0) >= 1,
                       "the batch to reach the engine", timeout=60, interval=0.02, proc=proc, log=server.log)
            proc.send_signal(signal.SIGTERM)
            t.join(timeout=120)
        assert "error" not in outcome, outcome.get("error")
        result = outcome["result"]
        assert result.batch_id == "in-flight" and result.features.shape == (8, 64, 77, 77)
        assert proc.wait(timeout=60) == 0
        assert "draining" in server.output()
    finally:
        server.stop()


def test_a_cancelled_stream_gives_back_memory_and_in_flight_slots(live_server: LiveServer) -> None:
    with GuardClient(live_server.address) as client:
        stream = client.protect_stream((f"c{i}", features(4)) for i in range(6))
        assert next(stream).batch_id == "c0"
        stream.close()  # the client walks away with batches queued and in flight

    def released() -> bool:
        m = scrape(live_server.metrics_url)
        return m[("advface_batches_in_flight", ())] == 0 and m[("advface_memory_budget_reserved_bytes", ())] == 0

    poll_until(released, "in-flight batches and reserved memory to be released (else they leaked)",
               timeout=60, interval=0.1)
