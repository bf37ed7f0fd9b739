"""Overload and faults on loopback: 10x more streams than the device queue admits, cancelled and killed clients.

The run is paced by a gate on the device (the engine computes a batch only when the test hands it
a permit) and synchronised on the server's own counts (``ServingState.wait_for``), never on
sleeps: every step waits for the state it needs, so no ordering depends on timing. The only
polling is for the enrollment client's index file, a condition the run cannot outpace because
the rest of that client's batches stay behind the gate until it has been killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from advface.codec import encode_request, retry_delay
from advface.v1 import plugin_pb2_grpc as pb_grpc
from grpc_status import rpc_status

from tests.helpers import (
    ROOT,
    HeldStream,
    LiveServer,
    code_of,
    edited_request,
    feature_source,
    poll_until,
    registry_sample,
    wait_for_state,
)

features = feature_source(seed=13)
pytestmark = pytest.mark.slow  # a live server saturated by 20 streams and client subprocesses
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients'}", "PYTHONUNBUFFERED": "1"}
QUEUE = 2  # batches the device queue admits
STREAMS = 10 * QUEUE  # streams open at once: the server's --max-streams
ENROLL_FACES, ENROLL_BATCH = 8, 2  # the enrollment client: 4 batches, all inside its window of 4
KILLED = 2  # client processes killed with one batch waiting for the device
FLOOD = STREAMS - 1 - KILLED  # one-batch held streams beside the enrollment and the killed clients
CANCELLED_FLOOD = 3
RSS_GROWTH_BOUND = 256 * 2**20  # stated bound on the server process's growth while saturated
FACE_BYTES = 64 * 77 * 77 * 4
KILLED_CLIENT = """
import sys, threading, grpc, numpy as np
from advface.v1 import plugin_pb2_grpc as pb_grpc
from advface.codec import encode_request
def requests():
    yield from encode_request(sys.argv[2], np.full((1, 64, 77, 77), 0.25, np.float32))
    threading.Event().wait()  # never half-closes: killed here
for _ in pb_grpc.AdvFaceGuardStub(grpc.insecure_channel(sys.argv[1])).ProtectStream(requests()):
    pass
"""


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status here")


def _index_lines(out: Path) -> list[dict]:
    index = out / "index.jsonl"
    return [json.loads(line) for line in index.read_text().splitlines()] if index.exists() else []


def _enroll_cmd(live: LiveServer, feats: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "plugin_service.cli", "enroll", "--target", live.address, "--input", str(feats),
            "--out", str(out), "--batch-size", str(ENROLL_BATCH), "--no-progress"]


def test_overload_with_cancelled_and_killed_clients_answers_every_batch_once(start_live_server,  # noqa: ANN001
                                                                            tmp_path: Path) -> None:
    live = start_live_server(queue_size=QUEUE, workers=1, max_streams=STREAMS)
    state, queue = live.running.state, live.running.queue
    permits = threading.Semaphore(0)  # one per batch the device may compute
    run = queue._run
    queue._run = lambda job: (permits.acquire(timeout=120), run(job))[1]
    peak = [0]
    add = state.budget._add
    state.budget._add = lambda n: (add(n), peak.__setitem__(0, max(peak[0], state.budget.reserved)))[0]

    feats = tmp_path / "faces.npy"
    np.save(feats, features(ENROLL_FACES))
    out = tmp_path / "enrolled"
    enrolling = subprocess.Popen(_enroll_cmd(live, feats, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    flood: list[HeldStream] = []
    killed: list[subprocess.Popen] = []
    try:
        # 1. the enrollment's 4 batches arrive; 2 are computed and stored as shards, the rest held
        wait_for_state(live, lambda: state.in_flight == ENROLL_FACES // ENROLL_BATCH)
        permits.release(2)
        poll_until(lambda: len(_index_lines(out)) == 2, "the enrollment's first two shards", timeout=120, interval=0.02,
                   proc=enrolling)
        rss_before = _rss()

        # 2. saturate: STREAMS streams open, the queue full, everyone else waiting for room
        flood = [HeldStream(live.address, list(encode_request(f"f{k}", features(1)))) for k in range(FLOOD)]
        killed = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, live.address, f"killed-{k}"], env=ENV)
                  for k in range(KILLED)]
        held_batches = 2 + FLOOD + KILLED  # the enrollment's last two, one per other stream
        wait_for_state(live, lambda: state.streams == STREAMS and state.in_flight == held_batches)
        assert _rss() - rss_before < RSS_GROWTH_BOUND

        # 3. more than the server admits is refused at once, with a code that says "retry later"
        with grpc.insecure_channel(live.address) as channel:
            stub = pb_grpc.AdvFaceGuardStub(channel)
            for k in range(4):
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.ProtectStream(iter(encode_request(f"extra-{k}", features(1))), timeout=60))
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "--max-streams" in refused.value.details()
                assert retry_delay(rpc_status.from_call(refused.value)) == 1.0
            for k in range(3):
                with pytest.raises(grpc.RpcError) as full:
                    stub.Protect(edited_request(f"unary-{k}", features(1)), timeout=60)
                assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "device queue is full" in full.value.details()
                assert retry_delay(rpc_status.from_call(full.value)) == 1.0

        # 4. faults: streams cancelled, clients killed (the enrollment with two batches unanswered)
        for held in flood[:CANCELLED_FLOOD]:
            held.close()
        for proc in (*killed, enrolling):
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        wait_for_state(live, lambda: state.streams == FLOOD - CANCELLED_FLOOD)
        cancelled = CANCELLED_FLOOD + KILLED + 2
        assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="CANCELLED") == cancelled

        # 5. the device runs again: every surviving stream gets its one answer
        permits.release(10_000)
        for k, held in enumerate(flood[CANCELLED_FLOOD:], start=CANCELLED_FLOOD):
            held.go()
            assert [(r.batch_id, code_of(r)) for r in held.answers()] == [(f"f{k}", grpc.StatusCode.OK)]

        # 6. the enrollment resumes and ends with every face exactly once
        resumed = subprocess.run(_enroll_cmd(live, feats, out), env=ENV, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert "skipped 4 already enrolled" in resumed.stdout
        ids = [i for entry in _index_lines(out) for i in entry["ids"]]
        assert sorted(ids) == sorted(f"faces:{i}" for i in range(ENROLL_FACES))
        assert len(list((out / "shards").glob("*.npz"))) == len(_index_lines(out)) == 4
    finally:
        permits.release(10_000)
        for held in flood:
            held.close()
        for proc in (*killed, enrolling):
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)

    wait_for_state(live, state.idle)
    m = live.metrics
    assert [g._value.get() for g in (m.in_flight, m.streams, m.reassembling, m.queue_depth, m.reserved)] == [0] * 5
    # every batch sent was answered once, or counted CANCELLED once because its client was gone
    answered = 2 + (FLOOD - CANCELLED_FLOOD) + 2
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="OK") == answered
    assert registry_sample(live, "advface_batches_total", method="ProtectStream", code="CANCELLED") == cancelled
    assert answered + cancelled == ENROLL_FACES // ENROLL_BATCH + FLOOD + KILLED + 2
    assert registry_sample(live, "advface_requests_total", method="ProtectStream", code="RESOURCE_EXHAUSTED") == 4
    assert registry_sample(live, "advface_requests_total", method="Protect", code="RESOURCE_EXHAUSTED") == 3
    assert registry_sample(live, "advface_requests_total", method="ProtectStream", code="CANCELLED") == CANCELLED_FLOOD + KILLED + 1
    # memory: the budget's peak is the bytes of the batches held at saturation (the enrollment's last two,
    # the flood's, the killed clients'), plus at most the one unary request being refused
    held_faces = (ENROLL_FACES - 2 * ENROLL_BATCH) + FLOOD + KILLED
    assert held_faces * FACE_BYTES <= peak[0] <= (held_faces + 1) * FACE_BYTES
