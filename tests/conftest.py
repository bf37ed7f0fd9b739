"""Shared fixtures: a tiny bundle (random E, small S) and a real server on a loopback port.

The functions and classes behind them live in tests/helpers.py; import those from there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("ADVFACE_NO_PROGRESS", "1")

from tests.helpers import LiveServer, make_bundle, run_live_server, server_settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def live_server(tiny_bundle: Path) -> Iterator[LiveServer]:
    yield from run_live_server(server_settings(tiny_bundle))


@pytest.fixture
def start_live_server(tiny_bundle: Path):  # noqa: ANN201 - factory fixture
    """Starts extra servers with custom settings; stops them at the end of the test."""
    gens = []

    def start(**overrides: object) -> LiveServer:
        gen = run_live_server(server_settings(tiny_bundle, **overrides))
        gens.append(gen)
        return next(gen)

    yield start
    for gen in gens:
        next(gen, None)
