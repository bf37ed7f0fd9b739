"""`advface bench`: the eager reference and the optimised engine, measured in one process on the same inputs.

Prints numbers it measured on this machine, nothing else; the README quotes its output with the
command line that produced it. Runs of the two engines alternate, so a machine shared with other
work slows both alike and the speed-up stays meaningful when the absolute numbers do not.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from plugin_service.bundle import load_bundle
from plugin_service.engine import Engine, EngineResult
from plugin_service.engine_settings import EngineSettings
from plugin_service.protect import ProtectorParams


def _features(bundle_path: Path | None, n: int, faces: Path | None = None) -> np.ndarray:
    """Realistic features: E of the first ``n`` faces of ``faces`` (default: the sample faces), tiled if fewer.

    E of random-pixel faces would be atypical. Faces are taken in a seeded shuffle, so a batch
    mixes identities as a service's batches do.
    """
    from plugin_service.bundle import sample_faces_path
    from plugin_service.faces import load_face_folder

    bundle = load_bundle(bundle_path)
    face_set = load_face_folder(faces or sample_faces_path())
    order = torch.randperm(len(face_set), generator=torch.Generator().manual_seed(0))[:n]
    with torch.no_grad():
        z = bundle.extractor(face_set.floats(order)).numpy()
    return np.concatenate([z] * (n // len(z) + 1))[:n]


def machine_peak_gflops(size: int = 2048, repeats: int = 3) -> float:
    """The best GFLOP/s of a large float32 matmul: the machine's practical peak, measured now."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """Samples resident memory every 5 ms while the block runs; yields a one-element list with the peak."""
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], _rss_bytes())


@dataclass
class EngineRun:
    """One engine on one protector and batch size: ``repeats`` timed batches."""

    engine: str
    latencies: list[float]
    batch: int
    peak_rss_mb: float
    flops_per_face: float
    mean_steps: float
    gain: float  # mean shadow loss after/before; NaN without a shadow model
    faces_per_s: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    gflops: float = 0.0

    def __post_init__(self) -> None:
        self.faces_per_s = self.batch * len(self.latencies) / sum(self.latencies)
        self.p50, self.p90, self.p99 = (float(np.percentile(self.latencies, q)) for q in (50, 90, 99))
        self.gflops = self.flops_per_face * self.faces_per_s / 1e9


@dataclass
class Comparison:
    protector: str
    batch: int
    reference: EngineRun
    optimised: EngineRun
    compile_seconds: float  # the optimised engine's first batch of this size, untimed otherwise
    speedup: float = 0.0
    max_feature_diff: float = 0.0
    feature_diff_fraction: float = 0.0  # elements that differ at all
    max_loss_rel_diff: float = 0.0  # per face, shadow loss after protection
    gain_rel_diff: float = 0.0  # mean privacy gain, optimised vs reference
    # early stop only: mean privacy gain against every step run with the same best-state rule (--keep-best)
    gain_vs_full_best: float = float("nan")
    peak_fraction: dict[str, float] = field(default_factory=dict)


def _gain(r: EngineResult) -> float:
    return float(np.mean(r.shadow_loss_after / r.shadow_loss_before))


def _diff(a: EngineResult, b: EngineResult) -> tuple[float, float, float]:
    d = np.abs(a.features.astype(np.float64) - b.features)
    loss = np.abs(b.shadow_loss_after / a.shadow_loss_after - 1)
    return float(d.max()), float((d > 0).mean()), float(np.nan_to_num(loss, nan=0.0).max())


def _flops(engine: Engine, z: np.ndarray, protector: str, params: ProtectorParams) -> float:
    """FLOPs per face counted on the eager reference (the optimised engine does the same arithmetic per step)."""
    counter = FlopCounterMode(display=False)
    with counter:
        engine.protect(z, protector, params, torch.Generator().manual_seed(0))
    return counter.get_total_flops() / len(z)


class Bench:
    """Both engines on one bundle (loaded twice, so channels-last weights never reach the reference)."""

    def __init__(self, bundle_path: Path | None, device: str, settings: EngineSettings, steps: int | None,
                 faces: Path | None = None) -> None:
        self.faces = faces
        self.reference = Engine(load_bundle(bundle_path), device, settings=EngineSettings.reference())
        self.optimised = Engine(load_bundle(bundle_path), device, settings=settings)
        # What early stop gives up: the same engine run for every step, keeping each face's best state.
        self.full_best = Engine(load_bundle(bundle_path), device, settings=replace(
            self.optimised.settings, early_stop=False, keep_best=True)) if settings.early_stop else None
        self.bundle_path, self.params = bundle_path, ProtectorParams(steps=steps)
        self.steps = steps or self.reference.bundle.manifest.pgd.steps
        self._per_step: tuple[float, float] | None = None

    def _advface_flops(self, z: np.ndarray, steps: float) -> float:
        """Setup + ``steps`` PGD steps per face, from counts at 0 and 1 steps on one face."""
        if self._per_step is None:
            zero, one = (_flops(self.reference, z[:1], "advface", replace(self.params, steps=s)) for s in (0, 1))
            self._per_step = (zero, one - zero)
        setup, per_step = self._per_step
        return setup + per_step * steps

    def _loop_steps(self, result: EngineResult) -> float:
        """Steps the early-stopping loop ran: until the host's first check after the last face stopped."""
        every = self.optimised.settings.check_every
        return float(min(self.steps, -(-int(np.max(result.steps)) // every) * every))

    def compare(self, protector: str, n: int, repeats: int) -> Comparison:
        z = _features(self.bundle_path, n, self.faces)
        compile_seconds = _timed(lambda: self.run(self.optimised, z, protector))
        runs: dict[str, list[EngineResult]] = {"reference": [], "optimised": []}
        peaks = {"reference": 0, "optimised": 0}
        for i in range(repeats):  # alternate the order so neither engine always runs first
            for name in (("reference", "optimised") if i % 2 == 0 else ("optimised", "reference")):
                with peak_rss() as peak:
                    runs[name].append(self.run(getattr(self, name), z, protector))
                peaks[name] = max(peaks[name], peak[0])
        out = {}
        for name, results in runs.items():
            steps = float("nan")
            if protector == "advface":
                early = name == "optimised" and self.optimised.settings.early_stop
                steps = float(np.mean(results[0].steps)) if early else float(self.steps)
                flops = self._advface_flops(z, self._loop_steps(results[0]) if early else self.steps)
            else:
                flops = _flops(self.reference, z[: min(n, 2)], protector, self.params)
            gain = _gain(results[0]) if protector == "advface" else float("nan")
            out[name] = EngineRun(name, [r.compute_seconds for r in results], n, peaks[name] / 2**20, flops, steps, gain)
        ref, opt = runs["reference"][0], runs["optimised"][0]
        max_diff, fraction, loss_diff = _diff(ref, opt)
        gain_diff = out["optimised"].gain / out["reference"].gain - 1 if protector == "advface" else 0.0
        vs_full_best = float("nan")
        if protector == "advface" and self.full_best is not None:
            vs_full_best = out["optimised"].gain / _gain(self.run(self.full_best, z, protector)) - 1
        return Comparison(protector, n, out["reference"], out["optimised"], compile_seconds,
                          out["optimised"].faces_per_s / out["reference"].faces_per_s, max_diff, fraction, loss_diff,
                          gain_diff, vs_full_best)

    def run(self, engine: Engine, z: np.ndarray, protector: str) -> EngineResult:
        return engine.protect(z, protector, self.params, torch.Generator().manual_seed(0))


def _row(c: Comparison, run: EngineRun, peak: float) -> str:
    gflops = f"{run.gflops:8.1f} {100 * run.gflops / peak:5.1f}%" if run.flops_per_face else f"{'-':>8s} {'-':>6s}"
    return (f"{c.protector:8s} {c.batch:5d} {run.engine:9s} {run.faces_per_s:8.2f} {run.p50:7.2f} {run.p90:7.2f} "
            f"{run.p99:7.2f} {run.peak_rss_mb:8.0f} {run.flops_per_face / 1e9:9.2f} {gflops} {run.mean_steps:6.1f}")


def bench_engine(bundle_path: Path | None, device: str, batch_sizes: list[int], repeats: int, steps: int | None,
                 settings: EngineSettings, protectors: list[str], json_path: Path | None,
                 faces: Path | None = None) -> Bench:
    bench = Bench(bundle_path, device, settings, steps, faces)
    peak = machine_peak_gflops()
    b = bench.reference.bundle
    print(f"bundle {b.version}, {b.manifest.shadow.arch} width {b.manifest.shadow.width}, steps {bench.steps}, "
          f"device {bench.reference.device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}; peak (2048x2048 float32 matmul) {peak:.1f} GFLOP/s")
    print(f"optimised: {bench.optimised.settings}")
    print(f"{'protector':8s} {'batch':>5s} {'engine':9s} {'faces/s':>8s} {'p50 s':>7s} {'p90 s':>7s} {'p99 s':>7s} "
          f"{'RSS MB':>8s} {'GFLOP/f':>9s} {'GFLOP/s':>8s} {'peak':>6s} {'steps':>6s}")
    comparisons = []
    for protector in protectors:
        for n in batch_sizes:
            c = bench.compare(protector, n, repeats)
            for run in (c.reference, c.optimised):
                c.peak_fraction[run.engine] = run.gflops / peak
                print(_row(c, run, peak))
            print(f"{'':14s} speed-up {c.speedup:.2f}x; outputs: max |diff| {c.max_feature_diff:.3g}, "
                  f"{100 * c.feature_diff_fraction:.2f}% of elements differ; shadow loss after: max rel diff "
                  f"{c.max_loss_rel_diff:.2%}; mean privacy gain {c.gain_rel_diff:+.2%} "
                  f"(first optimised batch incl. compilation {c.compile_seconds:.1f} s)", flush=True)
            if not math.isnan(c.gain_vs_full_best):
                print(f"{'':14s} early stop against all {bench.steps} steps keeping each face's best state "
                      f"(--keep-best, untimed): mean privacy gain {c.gain_vs_full_best:+.2%}", flush=True)
            comparisons.append(c)
    if json_path is not None:
        json_path.write_text(json.dumps({
            "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "peak_gflops": peak,
                        "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
            "bundle": b.version, "steps": bench.steps, "repeats": repeats,
            "optimised_settings": asdict(bench.optimised.settings),
            "results": [asdict(c) for c in comparisons]}, indent=2))
        print(f"wrote {json_path}")
    return bench


def bench_service(bench: Bench, batch: int, batches: int, streams: int = 1) -> tuple[float, float]:
    """(service faces/s, engine-alone faces/s): a local server on loopback against the same engine alone.

    The server (in this process, with the optimised engine's settings) gets ``streams`` concurrent
    streams of ``batches`` batches; the optimised engine alone runs the same batch right before and
    right after, so both see the same machine and the ratio means what it says.
    """
    from advface_client.loadgen import LoadSpec, run_load

    from plugin_service.config import ServerSettings
    from plugin_service.server.app import drain_and_stop, start_server

    z = _features(bench.bundle_path, batch, bench.faces)
    alone = [_timed(lambda: bench.run(bench.optimised, z, "advface"))]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    server_settings = replace(ServerSettings(), bundle=bench.bundle_path, host="127.0.0.1", port=0, metrics_port=0,
                              device=str(bench.optimised.device), warmup_faces=batch)  # warm-up compiles this size
    running = asyncio.run_coroutine_threadsafe(
        start_server(server_settings.validate(), engine_settings=bench.optimised.settings), loop).result()
    try:
        report = run_load(LoadSpec(target=f"127.0.0.1:{running.port}", streams=streams, batches=batches,
                                   batch_size=batch, steps=bench.params.steps or 0, duration_limit=3600.0), z)
    finally:
        asyncio.run_coroutine_threadsafe(drain_and_stop(running, 10), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    alone.append(_timed(lambda: bench.run(bench.optimised, z, "advface")))
    engine_rate = 2 * batch / sum(alone)
    print(f"service over gRPC (loopback, float32, {streams} stream(s) x {batches} batches of {batch}): {report}")
    print(f"engine alone on the same batch, before and after: {engine_rate:.2f} faces/s; "
          f"service / engine = {report.faces_per_s / engine_rate:.0%}")
    return report.faces_per_s, engine_rate


def profile_step(bundle_path: Path | None, device: str, batch_sizes: list[int], settings: EngineSettings,
                 rows: int = 8) -> None:
    """One PGD step per engine and batch size under torch.profiler, with the minor page faults it caused.

    This is how the batch-size scaling was diagnosed: the eager step's convolutions got slower per
    face from batch 8 to 32 while the step page-faulted its 160x160 activations in afresh each time.
    """
    import resource

    from torch.profiler import ProfilerActivity, profile

    for name, engine_settings in (("reference", EngineSettings.reference()), ("optimised", settings)):
        # eager kernels (compilation would hide them in one fused graph), every step
        engine = Engine(load_bundle(bundle_path), device, settings=replace(engine_settings, compile=False,
                                                                            early_stop=False))
        for n in batch_sizes:
            z = _features(bundle_path, n)
            engine.protect(z, params=ProtectorParams(steps=1))  # allocator and caches warm
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                engine.protect(z, params=ProtectorParams(steps=2))
                seconds = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(f"{name}, batch {n}: 2 PGD steps (and the setup) in {seconds:.2f} s = "
                  f"{1e3 * seconds / (2 * n):.1f} ms per face-step, {faults / 2:,.0f} minor page faults per step")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
