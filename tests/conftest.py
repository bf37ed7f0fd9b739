"""Shared fixtures: a tiny bundle (random E, small S) and a real server on a loopback port."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("ADVFACE_NO_PROGRESS", "1")

from plugin_service.bundle import Manifest, PGDDefaults, save_bundle  # noqa: E402
from plugin_service.config import ServerSettings  # noqa: E402
from plugin_service.models.extractor import Extractor  # noqa: E402
from plugin_service.models.shadow import ShadowSpec, build_shadow  # noqa: E402
from plugin_service.server.app import RunningServer, drain_and_stop, start_server  # noqa: E402
from plugin_service.server.metrics import ServiceMetrics  # noqa: E402


def edited_request(batch_id: str, z, options=None, **fields: object):  # noqa: ANN001, ANN201
    """A one-message ProtectRequest for ``z`` with some fields overwritten, to build malformed batches."""
    from advface.codec import Options, encode_request

    (msg,) = encode_request(batch_id, z, options or Options(), chunk_bytes=8 << 20)
    for k, v in fields.items():
        if k == "shape":
            del msg.shape[:]
            msg.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(msg, k, v)
    return msg


TINY_SHADOW = ShadowSpec(arch="resrec", width=4, depth=1)
TINY_PGD = PGDDefaults(steps=3, alpha=0.2, eps=0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bundle(path: Path, spec: ShadowSpec = TINY_SHADOW, pgd: PGDDefaults = TINY_PGD, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    extractor = Extractor()
    save_bundle(path, Manifest(split="conv2d_2b", shadow=spec, feature_shape=(64, 77, 77), pgd=pgd,
                               provenance={"shadow_identities": "test_identity_a,test_identity_b"}),
                extractor, build_shadow(spec))
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@dataclass
class LiveServer:
    address: str
    metrics_url: str
    metrics: ServiceMetrics
    running: RunningServer
    loop: asyncio.AbstractEventLoop

    def call(self, coro):  # noqa: ANN001, ANN201 - runs a coroutine on the server's loop
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=120)


def _start(settings: ServerSettings) -> Iterator[LiveServer]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    metrics = ServiceMetrics()
    running = asyncio.run_coroutine_threadsafe(start_server(settings, metrics), loop).result(timeout=120)
    live = LiveServer(f"127.0.0.1:{running.port}", f"http://127.0.0.1:{settings.metrics_port}/metrics",
                      metrics, running, loop)
    try:
        yield live
    finally:
        live.call(drain_and_stop(running, grace=5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def server_settings(bundle: Path, **overrides: object) -> ServerSettings:
    base = ServerSettings(bundle=bundle, host="127.0.0.1", port=0, metrics_port=free_port(), device="cpu",
                          max_batch=256, protectors="advface,random,dp", warmup_faces=1, torch_threads=2)
    return replace(base, **overrides).validate()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    yield from _start(server_settings(tiny_bundle))


@pytest.fixture
def start_live_server(tiny_bundle: Path):  # noqa: ANN201 - factory fixture
    """Starts extra servers with custom settings; stops them at the end of the test."""
    gens = []

    def start(**overrides: object) -> LiveServer:
        gen = _start(server_settings(tiny_bundle, **overrides))
        gens.append(gen)
        return next(gen)

    yield start
    for gen in gens:
        next(gen, None)
