"""Issue 11 over a real loopback server: no client can pin memory or starve others, every batch answered once.

Tests synchronise on the server's own state (``ServingState.wait_for``, woken on every change of
its counts) and on answers received, never on sleeps; the engine is held on a gate where a test
needs a batch to stay on the device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from advface.codec import UNARY_MAX_BYTES, encode_request, retry_delay
from advface.v1 import plugin_pb2 as pb
from advface.v1 import plugin_pb2_grpc as pb_grpc
from advface_client import BatchError, GuardClient
from advface_client.client import _temporary
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from plugin_service.bundle import PGDDefaults
from tests.helpers import (
    ROOT,
    TINY_SHADOW,
    HeldStream,
    LiveServer,
    code_of,
    edited_request,
    feature_source,
    make_bundle,
    raw_stream,
    registry_sample,
    wait_for_state,
)

features = feature_source(seed=11)


# --- reassembly: memory only for bytes received, silent batches time out, limits -----------------

def test_a_header_promising_a_huge_batch_holds_only_the_bytes_sent(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(memory_budget_mb=512)
    state = live.running.state
    # Two streams each declare a 256-face float32 batch (~390 MB) and send 1000 bytes of it. Before,
    # each reserved the whole batch at once: the second waited for the budget, and so did everyone.
    promises = [HeldStream(live.address, [edited_request(f"promise-{i}", features(1), shape=[256, 64, 77, 77],
                                                         raw_data=b"\0" * 1000, chunk_count=1000)])
                for i in range(2)]
    try:
        wait_for_state(live, lambda: state.slots.used == 2)
        assert state.budget.reserved == 2000
        (other,) = raw_stream(live.address, list(encode_request("other", features(1))))
        assert other.error is None and other.batch_id == "other"
        for p in promises:
            p.go()
            (answer,) = list(p.answers())
            assert code_of(answer) == grpc.StatusCode.INVALID_ARGUMENT and "stream ended" in answer.error.detail
    finally:
        for p in promises:
            p.close()
    wait_for_state(live, state.idle)


def test_a_batch_whose_next_chunk_never_comes_times_out_and_the_stream_goes_on(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(chunk_timeout_s=0.5)
    state = live.running.state
    slow = list(encode_request("slow", features(1), chunk_bytes=300_000))
    held = HeldStream(live.address, slow[:1])
    try:
        answers = held.answers()
        first = next(answers)  # the server's chunk timer fired; nothing here waits on time
        assert first.batch_id == "slow" and code_of(first) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "chunk 1 of 6 did not arrive within 0.5s" in first.error.detail and first.error.retry_after is None
        wait_for_state(live, lambda: state.budget.reserved == 0 and state.slots.used == 0)  # its memory is back
        held.go(slow[1:] + list(encode_request("next", features(1))))  # late chunks are dropped, once answered
        rest = list(answers)
        assert [(r.batch_id, code_of(r)) for r in rest] == [("next", grpc.StatusCode.OK)]
    finally:
        held.close()
    wait_for_state(live, state.idle)
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="DEADLINE_EXCEEDED") == 1


def test_a_batch_stalled_half_way_by_a_full_budget_is_refused_with_retry_info(start_live_server) -> None:  # noqa: ANN001
    """Two streams each holding part of a batch cannot wait on each other forever."""
    live = start_live_server(memory_budget_mb=3, max_message_mb=1, chunk_kb=256)
    state = live.running.state

    async def shorten_waits() -> None:  # from now on; the streams' current chunk timers keep their 30 s
        state.chunk_timeout = 0.5

    a = list(encode_request("a", features(2, np.float16), chunk_bytes=400_000))  # 1.5 MB in 4 chunks
    b = list(encode_request("b", features(3, np.float16), chunk_bytes=400_000))  # 2.3 MB in 6 chunks
    first, second = HeldStream(live.address, a[:1]), None
    try:
        wait_for_state(live, lambda: state.budget.reserved == 400_000)
        second = HeldStream(live.address, b[:-1])
        wait_for_state(live, lambda: state.budget.reserved == 2_400_000)
        live.call(shorten_waits())
        first.go(a[1:])  # its third chunk does not fit in the 3 MiB budget while b holds 2 MB
        (refused,) = list(first.answers())
        assert refused.batch_id == "a" and code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.error.retry_after == 1.0 and "memory budget stayed full for 0.5s" in refused.error.detail
        second.go(b[-1:])
        assert [(r.batch_id, code_of(r)) for r in second.answers()] == [("b", grpc.StatusCode.OK)]
    finally:
        first.close()
        if second is not None:
            second.close()
    wait_for_state(live, state.idle)


def test_streams_beyond_the_limit_are_refused_with_retry_info(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(max_streams=1)
    state = live.running.state
    first = HeldStream(live.address, [])
    try:
        wait_for_state(live, lambda: state.streams == 1)
        with grpc.insecure_channel(live.address) as channel, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.AdvFaceGuardStub(channel).ProtectStream(iter(encode_request("b", features(1))), timeout=60))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-streams" in info.value.details()
        assert retry_delay(rpc_status.from_call(info.value)) == 1.0
    finally:
        first.close()
    wait_for_state(live, state.idle)


def test_chunked_batches_beyond_the_global_limit_are_answered_with_retry_info(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(max_reassembling=1)
    state = live.running.state
    a = list(encode_request("a", features(1), chunk_bytes=500_000))
    first = HeldStream(live.address, a[:1])
    try:
        wait_for_state(live, lambda: state.slots.used == 1)
        refused, single = raw_stream(live.address, list(encode_request("b", features(1), chunk_bytes=500_000))
                                 + [edited_request("c", features(1))])
        assert refused.batch_id == "b" and code_of(refused) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert refused.error.retry_after == 1.0 and "--max-reassembling" in refused.error.detail
        assert single.batch_id == "c" and code_of(single) == grpc.StatusCode.OK  # one message needs no slot
        first.go(a[1:])
        assert [code_of(r) for r in first.answers()] == [grpc.StatusCode.OK]
    finally:
        first.close()
    wait_for_state(live, state.idle)


# --- exactly once -------------------------------------------------------------------------------

def test_broken_sequences_get_one_answer_each_and_are_counted_once(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server()
    a = list(encode_request("a", features(1), chunk_bytes=400_000))
    b = list(encode_request("b", features(1), chunk_bytes=400_000))
    c = list(encode_request("c", features(1), chunk_bytes=400_000))
    d = list(encode_request("d", features(1)))
    messages = [m for pair in zip(a, b, strict=True) for m in pair] + [c[1], c[0], *c[2:]] + d + d
    messages += list(encode_request("e", features(1)))
    results = raw_stream(live.address, messages)
    assert [(r.batch_id, code_of(r).name) for r in results] == [
        ("a", "INVALID_ARGUMENT"), ("b", "INVALID_ARGUMENT"), ("c", "INVALID_ARGUMENT"), ("d", "OK"),
        ("d", "INVALID_ARGUMENT"), ("e", "OK")]
    assert "already used in this stream" in results[4].error.detail
    wait_for_state(live, live.running.state.idle)
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="OK") == 2
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="INVALID_ARGUMENT") == 4
    assert registry_sample(live, "advface_faces_protected_total", protector="advface") == 2


def test_a_message_over_the_size_limit_fails_its_batch_alone(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(max_message_mb=1, chunk_kb=256)
    before, too_big, after = features(1, np.float16), features(2, np.float16), features(1, np.float16)
    messages = [edited_request("before", before), edited_request("too-big", too_big), edited_request("after", after)]
    assert messages[1].ByteSize() > 2**20 > messages[0].ByteSize()
    results = raw_stream(live.address, messages)
    assert [(r.batch_id, code_of(r).name) for r in results] == [
        ("before", "OK"), ("too-big", "INVALID_ARGUMENT"), ("after", "OK")]
    assert "over the server's limit of 1048576 bytes" in results[1].error.detail
    wait_for_state(live, live.running.state.idle)
    assert registry_sample(live, "advface_requests_total", method="ProtectStream", code="OK") == 1
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="OK") == 2


def test_a_message_grpc_itself_refuses_fails_the_stream_and_every_batch_once(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(max_message_mb=1, chunk_kb=256)
    huge = edited_request("huge", features(3, np.float16))
    assert huge.ByteSize() > 2 * 2**20  # over twice the limit: gRPC ends the call before the service sees it
    with pytest.raises(grpc.RpcError) as info:
        raw_stream(live.address, [edited_request("before", features(1, np.float16)), huge])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    wait_for_state(live, live.running.state.idle)  # nothing leaked: no stream, batch in flight, byte or slot
    # "before" was answered or, if the call died first, counted once as not delivered
    counted = sum(registry_sample(live, "advface_batches_total", method="ProtectStream", code=c) for c in ("OK", "CANCELLED"))
    assert counted == 1


def test_health_and_reflection_are_not_counted_as_requests(live_server: LiveServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(live_server.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        pb_grpc.AdvFaceGuardStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    wait_for_state(live_server, live_server.running.state.idle)
    methods = {s.labels["method"] for fam in live_server.metrics.registry.collect()
               if fam.name == "advface_requests" for s in fam.samples}
    assert "GetModelInfo" in methods and not methods & {"Check", "Watch", "ServerReflectionInfo"}


KILLED_CLIENT = """
import sys, threading, grpc, numpy as np
from advface.v1 import plugin_pb2_grpc as pb_grpc
from advface.codec import encode_request
def requests():
    for i in range(3):
        yield from encode_request(f"k{i}", np.full((1, 64, 77, 77), 0.25, np.float32))
    threading.Event().wait()  # never half-closes: killed here
call = pb_grpc.AdvFaceGuardStub(grpc.insecure_channel(sys.argv[1])).ProtectStream(requests())
for _ in call:
    pass
"""


@pytest.mark.parametrize("how", ["cancelled", "killed"])
def test_in_flight_gauge_returns_to_zero_when_a_waiting_stream_goes_away(start_live_server, how: str) -> None:  # noqa: ANN001
    live = start_live_server(queue_size=1, workers=1)
    state, queue = live.running.state, live.running.queue
    gate = threading.Event()
    run = queue._run
    queue._run = lambda job: (gate.wait(120), run(job))[1]  # the device is busy until the gate opens
    faces_before = registry_sample(live, "advface_faces_protected_total", protector="advface")
    client = None
    try:
        if how == "cancelled":
            client = HeldStream(live.address, [m for i in range(3) for m in encode_request(f"k{i}", features(1))])
        else:
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients'}"}
            client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, live.address], env=env)
        # k0 on the device, k1 queued, k2 waiting for room in the queue: three in flight
        wait_for_state(live, lambda: state.in_flight == 3)
        if how == "cancelled":
            client.close()
        else:
            client.kill()
            client.wait(30)
        wait_for_state(live, lambda: state.streams == 0)
    finally:
        gate.set()
        if isinstance(client, HeldStream):
            client.close()
    wait_for_state(live, state.idle)
    assert state.metrics.in_flight._value.get() == 0 and state.metrics.reserved._value.get() == 0
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="CANCELLED") == 3
    assert registry_sample(live, "advface_faces_protected_total", protector="advface") == faces_before  # none delivered


# --- bounded echoes, unary limits, value ranges, permanent errors -------------------------------

def test_over_long_batch_ids_are_invalid_argument_and_echoed_bounded(live_server: LiveServer) -> None:
    long_id = "L" * 5_000_000
    with grpc.insecure_channel(live_server.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AdvFaceGuardStub(channel).Protect(edited_request(long_id, features(1)), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "…(5000000 bytes)" in info.value.details() and len(info.value.details()) < 300
    (result,) = raw_stream(live_server.address, [edited_request(long_id, features(1))])
    assert code_of(result) == grpc.StatusCode.INVALID_ARGUMENT and len(result.batch_id) < 100


def test_unary_protect_is_limited_so_its_response_fits_a_default_client(live_server: LiveServer) -> None:
    with GuardClient(live_server.address) as client:
        assert client.info().max_unary_bytes == UNARY_MAX_BYTES
    z = features(3)
    assert z.nbytes > UNARY_MAX_BYTES
    with grpc.insecure_channel(live_server.address) as channel:  # a default client: 4 MiB receive limit
        stub = pb_grpc.AdvFaceGuardStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Protect(edited_request("big", z), timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ProtectStream" in info.value.details()
        assert rpc_status.from_call(info.value) is None or retry_delay(rpc_status.from_call(info.value)) is None
        ok = stub.Protect(edited_request("fits", features(2)), timeout=60)  # 2 faces: 3 MB, answered
        assert list(ok.shape) == [2, 64, 77, 77]


def test_absurd_finite_values_are_refused_with_a_count_not_the_values(live_server: LiveServer) -> None:
    one, every = features(2), features(2)
    one[1, 2, 3, 4] = 3e38
    every[:] = -1e30
    results = raw_stream(live_server.address, [edited_request("one", one), edited_request("every", every)])
    assert [code_of(r) for r in results] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "1 of 758912 feature values lie outside" in results[0].error.detail
    assert "758912 of 758912" in results[1].error.detail
    assert not any(s in str(r.error) for r in results for s in ("3e+38", "1e+30", "3e38", "1e30"))


def test_permanent_errors_are_not_retried_and_name_the_batch_once(start_live_server, caplog) -> None:  # noqa: ANN001
    live = start_live_server(max_batch=2)
    caplog.set_level("WARNING", logger="advface_client.client")
    with GuardClient(live.address, max_retries=3, backoff_seconds=5) as client:
        with pytest.raises(BatchError) as info:
            client.protect(features(3, np.float16), batch_id="too-many")  # fits one unary call
        (result,) = client.protect_stream([("too-many-streamed", features(3))])
    for error in (info.value, result.error):
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.retry_after is None
        assert str(error).count("batch '") == 1 and "accepts 1 to 2" in str(error)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    assert registry_sample(live, "advface_batches_total", method="Protect", code="INVALID_ARGUMENT") == 1
    assert _temporary(grpc.StatusCode.RESOURCE_EXHAUSTED, 1.0) and _temporary(grpc.StatusCode.UNAVAILABLE, None)
    assert not _temporary(grpc.StatusCode.RESOURCE_EXHAUSTED, None)


@pytest.mark.slow  # an `advface serve` subprocess
def test_a_bundle_whose_defaults_break_the_policy_is_refused_at_start(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "eps5", TINY_SHADOW, PGDDefaults(steps=3, alpha=0.2, eps=5.0))
    proc = subprocess.run([sys.executable, "-m", "plugin_service.cli", "serve", "--bundle", str(bundle),
                           "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
                           "--max-eps", "0.5"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("advface serve: refusing to serve bundle") and "eps=5" in last and "--max-eps 0.5" in last
    assert "Traceback" not in proc.stderr
