"""Property-based fuzzing of request streams (hypothesis, derandomized: the same cases on every run).

Volume runs against the torch-free reassembly layer directly (thousands of programs: shapes,
datatypes, byte lengths, chunk orders, interleavings, duplicate and over-long ids, NaN/Inf/huge
values, chunk timeouts, abrupt ends); a smaller number of programs go through the real gRPC server
on the tiny bundle, with protector options and cancelled calls. Properties: every batch started
gets exactly one answer with a precise code, a defect-free batch gets its own data back, a
well-formed batch on the same stream afterwards succeeds, and every count (streams, batches in
flight, reserved bytes, batches being reassembled) returns to 0. Nothing waits on time: the
server is awaited on its own state-change events, every call has a deadline.
"""

from __future__ import annotations


import grpc
import numpy as np
import pytest
from advface.v1 import plugin_pb2 as pb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advface.codec import BatchError, BatchLimits, encode_request, response_id
from plugin_service.server.reassembly import Failed, Slots, StreamAssembler
from tests.fuzz_streams import OK, TIMEOUT, Program, Space, programs
from tests.helpers import HeldStream

CODEC_SPACE = Space(feature_shape=(2, 3, 3), max_batch=4, bound=100.0, chunk_sizes=(16, 64, 100, 1 << 20),
                    timeouts=True, options=False)
CODEC_LIMITS = BatchLimits((2, 3, 3), max_batch=4, max_batch_bytes=1 << 20, value_range=(0.0, 100.0))
FINAL = np.full((2, 2, 3, 3), 0.5, np.float32)


def _run_codec(program: Program, slots: Slots) -> list:
    r = StreamAssembler(CODEC_LIMITS, slots)
    answers = []

    def take(outcomes: list) -> None:
        for o in outcomes:
            if o is None:
                continue
            if isinstance(o, Failed):
                answers.append((o.error.batch_id, o.error.code, None))
                continue
            try:
                batch = o.check(CODEC_LIMITS)
                answers.append((batch.batch_id, OK, batch.features))
            except BatchError as e:
                answers.append((e.batch_id, e.code, None))

    for event in program.events:
        take([r.expire(30)] if event == TIMEOUT else r.feed(event))
    if not program.truncated:  # the stream goes on: a well-formed batch afterwards succeeds
        for msg in encode_request("final", FINAL, chunk_bytes=64):
            take(r.feed(msg))
        assert answers[-1][0] == "final" and answers[-1][1] == OK, answers[-1][:2]
        answers.pop()
    take([r.finish()])
    assert r.held_bytes == 0 and r.pending is None
    return answers


@pytest.mark.slow  # 4000 hypothesis examples
@settings(max_examples=4000, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(program=programs(CODEC_SPACE))
def test_reassembly_answers_every_batch_exactly_once(program: Program) -> None:
    slots = Slots(4)
    program.check(_run_codec(program, slots))
    assert slots.used == 0


# --- the same properties through the real server --------------------------------------------------

SERVER_SPACE = Space(feature_shape=(64, 77, 77), max_batch=2, bound=1e4, chunk_sizes=(300_000, 1 << 20, 4 << 20),
                     timeouts=False, options=True)


def _stream(address: str, messages: list[pb.ProtectRequest], cancel_after: bool) -> list:
    """Sends ``messages`` on one stream; returns the decoded answers (none if the call is cancelled after sending)."""
    held = HeldStream(address, messages, channel_options=[("grpc.max_receive_message_length", 64 << 20),
                                                          ("grpc.max_send_message_length", 64 << 20)])
    try:
        if cancel_after:
            assert held.sent.wait(60), "the messages were never sent"
            return []  # never half-closed; cancelled below
        held.go()
        return list(held.answers())
    finally:
        held.close()


@pytest.mark.slow  # fuzzed streams against a live server
def test_server_answers_fuzzed_streams_exactly_once(start_live_server) -> None:  # noqa: ANN001
    live = start_live_server(max_batch=2, queue_size=2, max_message_mb=8, chunk_kb=1024)
    state = live.running.state
    final = np.full((1, 64, 77, 77), 0.25, np.float32)

    @settings(max_examples=60, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(program=programs(SERVER_SPACE, max_batches=3), cancel=st.integers(0, 5))
    def run(program: Program, cancel: int) -> None:
        messages = [e for e in program.events if not isinstance(e, str)]
        if cancel == 0:  # the client walks away mid-stream: nothing to check but that the server recovers
            _stream(live.address, messages, cancel_after=True)
        else:
            if not program.truncated:
                messages = messages + list(encode_request("final", final))
            results = _stream(live.address, messages, cancel_after=False)
            by_response_id = {response_id(b.batch_id): b.batch_id for b in program.batches}
            answers = [(by_response_id.get(r.batch_id, r.batch_id), r.error.code if r.error else OK, r.features)
                       for r in results]
            if not program.truncated:
                assert answers[-1][:2] == ("final", OK), answers[-1][:2]
                answers.pop()
            program.check(answers, protected=True)
        live.call(state.wait_for(state.idle, timeout=60))  # gauges back to 0: streams, in flight, bytes, slots
        assert state.metrics.in_flight._value.get() == 0 and state.metrics.reserved._value.get() == 0

    run()
    # and the server still serves a plain batch
    (result,) = _stream(live.address, list(encode_request("after-fuzz", final)), cancel_after=False)
    assert result.error is None and result.features.shape == final.shape


def test_fuzz_oracle_catches_a_double_answer() -> None:
    """The oracle is not vacuous: a second answer for one batch, or a wrong code, fails it."""
    from tests.fuzz_streams import Logical

    msgs = list(encode_request("a", FINAL))
    program = Program([Logical("a", msgs, FINAL)], msgs, False)
    program.check([("a", OK, FINAL)])
    with pytest.raises(AssertionError, match="2 answers"):
        program.check([("a", OK, FINAL)] * 2)
    with pytest.raises(AssertionError, match="INVALID_ARGUMENT"):
        program.check([("a", grpc.StatusCode.INVALID_ARGUMENT, None)])
