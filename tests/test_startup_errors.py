"""`advface serve` with a bad bundle or flag: one line on stderr naming the problem, a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plugin_service.bundle import default_bundle_path

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # each test starts an `advface serve` subprocess (seconds: it imports torch)


def serve(*flags: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "plugin_service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                           "--metrics-port", "0", "--device", "cpu", *flags], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stderr


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "Event loop" not in stderr
    return lines[0]


def test_a_file_given_as_the_bundle_is_called_a_file(tmp_path: Path) -> None:
    file = tmp_path / "bundle.tar"
    file.write_bytes(b"not a directory")
    code, stderr = serve("--bundle", str(file))
    assert code != 0
    line = one_line(stderr)
    assert f"bundle {file} is a file, not a bundle directory" in line and "not found" not in line


def test_the_manifest_itself_given_as_the_bundle_points_to_its_directory() -> None:
    code, stderr = serve("--bundle", str(default_bundle_path() / "manifest.json"))
    assert code != 0
    assert f"the bundle is its directory, {default_bundle_path()}" in one_line(stderr)


def test_a_missing_bundle_says_it_does_not_exist(tmp_path: Path) -> None:
    code, stderr = serve("--bundle", str(tmp_path / "nowhere"))
    assert code != 0
    assert f"bundle {tmp_path / 'nowhere'} does not exist" in one_line(stderr)


def test_a_manifest_without_files_says_so(tmp_path: Path) -> None:
    body = json.loads((default_bundle_path() / "manifest.json").read_text())
    del body["files"]
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    code, stderr = serve("--bundle", str(tmp_path))
    assert code != 0
    assert "manifest lacks its 'files' table" in one_line(stderr)


def test_a_manifest_that_is_not_an_object_says_so(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("[]")
    code, stderr = serve("--bundle", str(tmp_path))
    assert code != 0
    assert "holds a JSON list, not a manifest object" in one_line(stderr)


@pytest.mark.parametrize(("flags", "env", "expected"), [
    (("--port", "abc"), {}, "argument --port: invalid int value: 'abc'"),
    (("--device", "gpu0"), {}, "--device 'gpu0' is not a device"),
    (("--no-such-flag",), {}, "unrecognized arguments: --no-such-flag"),
    ((), {"ADVFACE_MAX_BATCH": "0"}, "--max-batch must be >= 1"),
])
def test_a_bad_flag_is_one_line(flags: tuple[str, ...], env: dict[str, str], expected: str) -> None:
    code, stderr = serve(*flags, env=env)
    assert code != 0
    line = one_line(stderr)
    assert line.startswith("advface") and expected in line


def test_the_test_harness_restarts_a_server_whose_metrics_port_was_taken(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """spawn_server's free ports can be taken before the server binds them; wait_serving then starts it again."""
    import socket

    from tests import helpers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        ports = iter([helpers.free_port(), busy])  # the first spawn's gRPC port, then a metrics port in use
        real = helpers.free_port
        monkeypatch.setattr(helpers, "free_port", lambda: next(ports, None) or real())
        server = helpers.spawn_server(tiny_bundle, tmp_path, "--warmup-faces", "1")
        try:
            server.wait_serving()
            assert server.metrics_port != busy
            assert server.sample("advface_model_info") >= 0  # its own metrics endpoint answers
        finally:
            server.stop()
