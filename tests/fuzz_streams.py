"""Hypothesis strategies for request streams, and the oracle their answers are checked against.

A *program* is a list of logical batches (each: id, datatype, shape, values, chunking, options,
and the ways it is broken) turned into one message sequence: batches may be interleaved, a
complete batch may be sent again under the same id, "timeout" events may fall between messages
(the reassembler's chunk timer firing), and the stream may end abruptly. The oracle knows, per
logical batch, how many answers it must get (exactly one if any of its messages was sent) and
which codes are precise for the defects it was given; a batch with no defect must succeed with
its own data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np
from advface.v1 import plugin_pb2 as pb
from hypothesis import strategies as st

from advface.codec import Options, encode_request

IA, OK, DE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED
TIMEOUT = "timeout"  # an event in the message sequence: the pending batch's chunk timer fires


@dataclass(frozen=True)
class Space:
    """What may be generated: the server's feature shape and limits, and which events are possible."""

    feature_shape: tuple[int, ...]
    max_batch: int
    bound: float  # values must lie in [0, bound]
    chunk_sizes: tuple[int, ...]
    timeouts: bool
    options: bool  # vary protector options (needs a policy: server level only)


@dataclass
class Logical:
    batch_id: str
    messages: list[pb.ProtectRequest]
    features: np.ndarray | None  # the data a success must carry (None when the batch cannot succeed)
    codes: set[grpc.StatusCode] = field(default_factory=set)  # precise codes for its defects
    exact: bool = True  # False when its own chunks disagree on chunk_count (no single reading exists)
    complete: bool = True  # every chunk is sent (possibly out of order): the id is settled after them


@dataclass
class Program:
    batches: list[Logical]
    events: list[pb.ProtectRequest | str]  # messages and TIMEOUT markers, in sending order
    truncated: bool

    def expected_answers(self) -> Counter[str]:
        sent = {id(e) for e in self.events if not isinstance(e, str)}
        return Counter(b.batch_id for b in self.batches if any(id(m) in sent for m in b.messages))

    def check(self, answers: list[tuple[str, grpc.StatusCode, np.ndarray | None]], protected: bool = False) -> None:
        """The property: one answer per started batch, a precise code, a defect-free batch's own data back.

        ``protected``: answers carry protected features (the server), so only shape and dtype must match.
        """
        got = Counter(bid for bid, _, _ in answers)
        want = self.expected_answers()
        by_id: dict[str, list[Logical]] = {}
        for b in self.batches:
            by_id.setdefault(b.batch_id, []).append(b)
        for bid in set(got) | set(want):
            group = by_id.get(bid, [])
            assert group, f"answer for a batch never sent: {bid[:80]!r}"
            if all(b.exact for b in group):
                assert got[bid] == want[bid], f"batch {bid[:80]!r}: {got[bid]} answers, expected {want[bid]}"
            else:
                assert 1 <= got[bid] <= sum(len(b.messages) for b in group), bid[:80]
        remaining = {bid: list(group) for bid, group in by_id.items()}
        timed_out = self._timed_out
        for bid, code, features in answers:
            candidates = remaining[bid]
            logical = candidates.pop(0) if candidates else by_id[bid][-1]
            allowed = logical.codes or {OK}
            if id(logical) in timed_out:  # its chunk timer may have fired while it was pending
                if logical.codes:
                    allowed = logical.codes | {DE}
                elif timed_out[id(logical)]:  # complete and well-formed, but a timeout fell inside it
                    allowed = {DE}
            if not logical.exact:
                allowed = allowed | {IA}
            assert code in allowed, f"batch {bid[:80]!r}: {code.name}, expected one of {sorted(c.name for c in allowed)}"
            if code == OK:
                assert logical.features is not None and features is not None
                if protected:
                    assert features.shape == logical.features.shape and features.dtype == logical.features.dtype
                    assert np.isfinite(features).all()
                else:
                    np.testing.assert_array_equal(features, logical.features)

    @property
    def _timed_out(self) -> dict[int, bool]:
        """Batches a timeout event may have hit: id(logical) -> whether it fell strictly inside their messages.

        A batch is pending from its first message until its last, or, if it is left incomplete,
        until another batch's message arrives (or the stream ends).
        """
        out: dict[int, bool] = {}
        for b in self.batches:
            mine = {id(m) for m in b.messages}
            pos = [i for i, e in enumerate(self.events) if id(e) in mine]
            if not pos:
                continue
            end = next((i for i in range(pos[-1] + 1, len(self.events))
                        if self.events[i] != TIMEOUT and id(self.events[i]) not in mine), len(self.events))
            if any(self.events[i] == TIMEOUT for i in range(pos[0], end)):
                out[id(b)] = any(self.events[i] == TIMEOUT for i in range(pos[0], pos[-1]))
        return out


_VALUE_DEFECTS = ("nan", "inf", "huge", "negative", "max_float")


@st.composite
def logical_batch(draw: st.DrawFn, space: Space, index: int) -> Logical:
    codes: set[grpc.StatusCode] = set()
    long_id = draw(st.integers(0, 15)) == 0
    # distinct in their first characters, so that their bounded echoes stay distinct too
    batch_id = f"{index}-" + ("x" * draw(st.integers(129, 400)) if long_id else draw(st.sampled_from(["b", "é", "🙂", ""])))
    if long_id:
        codes.add(IA)
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    n = draw(st.integers(0, space.max_batch + 1))
    if not 1 <= n <= space.max_batch:
        codes.add(IA)
    shape = (n, *space.feature_shape)
    if draw(st.integers(0, 7)) == 0:
        shape = (n, *space.feature_shape[:-1], space.feature_shape[-1] + 1)
        codes.add(IA)
    seed = draw(st.integers(0, 2**16))
    features = (np.random.default_rng(seed).random(shape) * min(space.bound, 1.0)).astype(dtype)
    value_defect = draw(st.sampled_from((None,) * 6 + _VALUE_DEFECTS))
    if value_defect and features.size:
        flat = features.reshape(-1)
        where = draw(st.integers(0, flat.size - 1))
        flat[where] = {"nan": np.nan, "inf": np.inf, "huge": 1e30 if dtype == np.float32 else np.inf,
                       "negative": -1.0, "max_float": np.finfo(dtype).max}[value_defect]
        if draw(st.booleans()):
            flat[:] = flat[where]  # every value the same absurd one
        codes.add(IA)
    options = Options()
    if space.options:
        options = Options(draw(st.sampled_from(["", "", "advface", "random", "blur", "none"])),
                          draw(st.sampled_from([0, 0, 1, 2, 1000])), draw(st.sampled_from([None, None, 0.1, 9.0])))
        if options.protector in ("blur",):
            codes.add(IA)
        if options.protector == "none":
            codes.add(grpc.StatusCode.PERMISSION_DENIED)
        if options.steps == 1000 or options.eps == 9.0:
            codes.add(grpc.StatusCode.OUT_OF_RANGE)
    messages = list(encode_request(batch_id, features, options, chunk_bytes=draw(st.sampled_from(space.chunk_sizes))))
    datatype = draw(st.sampled_from([None] * 8 + [0, 3, 7]))
    if datatype is not None:
        messages[0].datatype = datatype
        codes.add(IA)
    byte_change = draw(st.sampled_from([0] * 6 + [-3, -1, 1, 2]))
    if byte_change:
        last = messages[-1]
        before = len(last.raw_data)
        last.raw_data = last.raw_data[:byte_change] if byte_change < 0 else last.raw_data + b"\x00" * byte_change
        if len(last.raw_data) != before:
            codes.add(IA)
    exact = complete = True
    order = draw(st.sampled_from(["keep"] * 5 + ["swap", "reverse", "drop", "recount"]))
    if len(messages) > 1 and order == "swap":
        i = draw(st.integers(0, len(messages) - 2))
        messages[i], messages[i + 1] = messages[i + 1], messages[i]
        codes.add(IA)
    elif len(messages) > 1 and order == "reverse":
        messages.reverse()
        codes.add(IA)
    elif len(messages) > 1 and order == "drop":
        del messages[draw(st.integers(0, len(messages) - 1))]
        codes.add(IA)
        complete = False
    elif order == "recount":
        messages[draw(st.integers(0, len(messages) - 1))].chunk_count = len(messages) + 1
        codes.add(IA)
        exact = False
    clean = not codes
    return Logical(batch_id, messages, features.astype(features.dtype.newbyteorder("=")) if clean else None,
                   codes, exact, complete)


@st.composite
def programs(draw: st.DrawFn, space: Space, max_batches: int = 5) -> Program:
    count = draw(st.integers(1, max_batches))
    batches = [draw(logical_batch(space, i)) for i in range(count)]
    events: list[pb.ProtectRequest | str] = []
    originals = list(batches)
    i = 0
    while i < len(originals):
        b = originals[i]
        if i + 1 < len(originals) and draw(st.integers(0, 4)) == 0:  # interleave with the next batch
            c = originals[i + 1]
            pattern = draw(st.permutations([0] * len(b.messages) + [1] * len(c.messages)))
            its = [iter(b.messages), iter(c.messages)]
            merged = [next(its[k]) for k in pattern]
            for k, x in enumerate((b, c)):  # broken only if the other batch's messages fall inside its span
                mine = [j for j, owner in enumerate(pattern) if owner == k]
                if mine and any(owner != k for owner in pattern[mine[0] : mine[-1] + 1]):
                    x.codes.add(IA)
                    x.features = None
            events.extend(merged)
            i += 2
            continue
        events.extend(b.messages)
        if b.exact and b.complete and draw(st.integers(0, 5)) == 0:  # the same id again, as a second batch
            again = Logical(b.batch_id, [pb.ProtectRequest.FromString(m.SerializeToString()) for m in b.messages],
                            None, {IA})
            batches.append(again)
            events.extend(again.messages)
        i += 1
    if space.timeouts:
        for _ in range(draw(st.integers(0, 2))):
            events.insert(draw(st.integers(0, len(events))), TIMEOUT)
    truncated = draw(st.integers(0, 5)) == 0 and len(events) > 1
    if truncated:
        cut = draw(st.integers(1, len(events) - 1))
        for b in batches:  # a batch cut short cannot succeed; it is answered "stream ended" (or failed before)
            sent = [m for m in b.messages if any(m is e for e in events[:cut])]
            if sent and len(sent) < len(b.messages):
                b.codes.add(IA)
                b.features = None
        events = events[:cut]
    return Program(batches, events, truncated)
