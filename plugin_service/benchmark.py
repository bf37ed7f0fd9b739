"""`advface bench`: measured throughput of the engine alone and of the whole service over gRPC.

Prints numbers it measured on this machine, nothing else; the README and deploy/README.md
quote its output with the command line that produced it.
"""

from __future__ import annotations

import asyncio
import platform
import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from plugin_service.bundle import load_bundle
from plugin_service.engine import Engine
from plugin_service.protect import ProtectorParams


def _features(bundle_path: Path | None, n: int) -> np.ndarray:
    """Realistic features: E of random-pixel faces would be atypical, so use E of the sample faces, tiled."""
    from plugin_service.bundle import sample_faces_path
    from plugin_service.faces import load_face_folder

    bundle = load_bundle(bundle_path)
    faces = load_face_folder(sample_faces_path()).floats(slice(None))
    with torch.no_grad():
        z = bundle.extractor(faces).numpy()
    return np.concatenate([z] * (n // len(z) + 1))[:n]


def bench_engine(bundle_path: Path | None, device: str, batch_sizes: list[int], repeats: int, steps: int | None) -> None:
    engine = Engine(load_bundle(bundle_path), device)
    params = ProtectorParams(steps=steps)
    engine.protect(_features(bundle_path, 2), params=params)  # warm-up
    print(f"engine: bundle {engine.bundle.version}, {engine.bundle.manifest.shadow.arch} width "
          f"{engine.bundle.manifest.shadow.width}, steps {steps or engine.bundle.manifest.pgd.steps}, device {engine.device}, "
          f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    for n in batch_sizes:
        z = _features(bundle_path, n)
        times = [engine.protect(z, params=params).compute_seconds for _ in range(repeats)]
        med = statistics.median(times)
        print(f"  batch {n:4d}: median {med:7.2f} s per batch over {repeats} runs "
              f"(min {min(times):.2f}, max {max(times):.2f}) = {n / med:8.2f} faces/s")


def bench_service(bundle_path: Path | None, device: str, batch: int, batches: int, steps: int | None) -> None:
    from advface_client.client import GuardClient

    from plugin_service.config import ServerSettings
    from plugin_service.server.app import drain_and_stop, start_server
    from advface.codec import Options

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    settings = replace(ServerSettings(), bundle=bundle_path, host="127.0.0.1", port=0, metrics_port=0, device=device)
    running = asyncio.run_coroutine_threadsafe(start_server(settings.validate()), loop).result()
    z = _features(bundle_path, batch)
    try:
        with GuardClient(f"127.0.0.1:{running.port}") as client:
            start = time.perf_counter()
            n = sum(len(r.features) for r in client.protect_stream(((f"b{i}", z) for i in range(batches)),
                                                                     Options(steps=steps or 0)))
            seconds = time.perf_counter() - start
        print(f"service over gRPC (loopback, float32, {batches} batches of {batch} streamed): "
              f"{n} faces in {seconds:.2f} s = {n / seconds:.2f} faces/s")
    finally:
        asyncio.run_coroutine_threadsafe(drain_and_stop(running, 10), loop).result()
        loop.call_soon_threadsafe(loop.stop)
