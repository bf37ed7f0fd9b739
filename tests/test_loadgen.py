"""The load generator: bounded in count, loopback only, and it counts what the server answered."""

from __future__ import annotations

import pytest
from advface_client.loadgen import LoadSpec, main, run_load


@pytest.mark.parametrize("target", ["10.0.0.5:50051", "example.com:50051", "127.0.0.1:1,192.168.1.2:2"])
def test_only_loopback_targets_are_accepted(target: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        LoadSpec(target=target).validate()
    assert main(["--target", target]) == 2


def test_every_batch_of_every_stream_is_answered_and_timed(live_server) -> None:
    report = run_load(LoadSpec(target=live_server.address, streams=2, batches=3, batch_size=2, duration_limit=120))
    assert (report.batches, report.faces, report.errors) == (6, 12, 0)
    assert len(report.latencies) == 6 and 0 < report.percentile(50) <= report.percentile(99) <= report.seconds


def test_the_duration_limit_stops_new_batches(live_server) -> None:
    report = run_load(LoadSpec(target=live_server.address, streams=1, batches=1000, batch_size=1,
                               duration_limit=1e-9))
    assert report.batches == 0
