"""Load generator: N concurrent ProtectStream calls against a server on this machine, bounded in count and time.

It measures what a backend would see end to end (encode, wire, queue, engine, wire, decode): faces
per second over the whole run and each batch's latency from the moment the client library takes it
to the moment its answer is decoded. It only talks to loopback addresses, so it cannot be pointed
at a production replica by accident, and it uses the client library alone (no PyTorch).

    python -m advface_client.loadgen --target 127.0.0.1:50051 --streams 2 --batches 4 --batch-size 16
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from advface.codec import Options

from advface_client.client import GuardClient

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class LoadSpec:
    """What to send: ``streams`` concurrent streams of at most ``batches`` batches each, for at most ``duration_limit`` s."""

    target: str = "127.0.0.1:50051"
    streams: int = 1
    batches: int = 4
    batch_size: int = 16
    duration_limit: float = 300.0  # no new batch is sent after this; batches already sent are awaited
    steps: int = 0  # 0: the server's default
    protector: str = ""  # "": the server's default

    def validate(self) -> LoadSpec:
        if min(self.streams, self.batches, self.batch_size) < 1 or not self.duration_limit > 0:
            raise ValueError("--streams, --batches and --batch-size must be >= 1 and --duration-limit > 0")
        for address in self.target.split(","):
            host = address.rsplit(":", 1)[0].strip("[]")
            if not _is_loopback(host):
                raise ValueError(f"the load generator only targets loopback addresses, not {host!r}")
        return self


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class LoadReport:
    faces: int = 0
    batches: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    @property
    def faces_per_s(self) -> float:
        return self.faces / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def __str__(self) -> str:
        return (f"{self.faces} faces in {self.batches} batches ({self.errors} errors) in {self.seconds:.2f} s = "
                f"{self.faces_per_s:.2f} faces/s; batch latency p50 {self.percentile(50):.2f} s, "
                f"p90 {self.percentile(90):.2f} s, p99 {self.percentile(99):.2f} s")


def _stream(client: GuardClient, spec: LoadSpec, features: np.ndarray, name: str, deadline: float,
            report: LoadReport, lock: threading.Lock) -> None:
    sent: dict[str, float] = {}

    def batches() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(spec.batches):
            if time.perf_counter() >= deadline:
                return
            batch_id = f"{name}-{i}"
            sent[batch_id] = time.perf_counter()
            yield batch_id, features

    for result in client.protect_stream(batches(), Options(protector=spec.protector, steps=spec.steps)):
        latency = time.perf_counter() - sent[result.batch_id]
        with lock:
            report.batches += 1
            if result.error is not None or result.features is None:
                report.errors += 1
            else:
                report.faces += len(result.features)
                report.latencies.append(latency)


def run_load(spec: LoadSpec, features: np.ndarray | None = None) -> LoadReport:
    """Runs the load; ``features`` (batch_size, C, H, W) float32, else uniform [0, 1) of the server's feature shape."""
    spec = spec.validate()
    report, lock = LoadReport(), threading.Lock()
    with GuardClient(spec.target) as client:
        client.wait_until_serving()
        if features is None:
            shape = tuple(client.info().feature_shape)
            features = np.random.default_rng(0).random((spec.batch_size, *shape), dtype=np.float32)
        start = time.perf_counter()
        deadline = start + spec.duration_limit
        failures: list[BaseException] = []

        def run(i: int) -> None:
            try:
                _stream(client, spec, features, f"load{i}", deadline, report, lock)
            except BaseException as e:  # noqa: BLE001 - reported by the caller's thread
                failures.append(e)

        threads = [threading.Thread(target=run, args=(i,), name=f"loadgen-{i}") for i in range(spec.streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        report.seconds = time.perf_counter() - start
    if failures:
        raise failures[0]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advface_client.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=LoadSpec.target, help="loopback host:port of the server (default: %(default)s)")
    p.add_argument("--streams", type=int, default=LoadSpec.streams, help="concurrent ProtectStream calls")
    p.add_argument("--batches", type=int, default=LoadSpec.batches, help="batches per stream, at most")
    p.add_argument("--batch-size", type=int, default=LoadSpec.batch_size, help="faces per batch")
    p.add_argument("--duration-limit", type=float, default=LoadSpec.duration_limit,
                   help="seconds after which no new batch is sent (default: %(default)s)")
    p.add_argument("--steps", type=int, default=0, help="PGD steps to ask for (default: the server's)")
    p.add_argument("--protector", default="", help="protector to ask for (default: the server's)")
    args = p.parse_args(argv)
    try:
        spec = LoadSpec(args.target, args.streams, args.batches, args.batch_size, args.duration_limit, args.steps,
                        args.protector).validate()
    except ValueError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    report = run_load(spec)
    print(f"{spec.streams} stream(s) x {spec.batches} batches of {spec.batch_size} to {spec.target}: {report}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
