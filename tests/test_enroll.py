"""The enrollment CLI: streamed batches, shards + index, resume after a kill, features input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from advface_client.cli import main as client_main

from plugin_service.bundle import load_bundle, sample_faces_path
from plugin_service.cli import main as advface_main
from plugin_service.faces import list_images
from tests.helpers import LiveServer, poll_until


def _enrolled(out: Path) -> list[str]:
    ids: list[str] = []
    for line in (out / "index.jsonl").read_text().splitlines():
        entry = json.loads(line)
        with np.load(out / "shards" / entry["shard"]) as shard:
            assert list(shard["ids"]) == entry["ids"]
            assert shard["features"].shape == (len(entry["ids"]), 64, 77, 77)
        ids += entry["ids"]
    return ids


def _enroll_cmd(live: LiveServer, bundle: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "plugin_service.cli", "enroll", "--target", live.address,
            "--input", str(sample_faces_path()), "--out", str(out), "--bundle", str(bundle), "--no-progress", *extra]


@pytest.mark.slow  # two enrollment subprocesses, 40 PGD steps
def test_killed_enrollment_resumes_and_enrolls_every_face_once(live_server: LiveServer, tiny_bundle: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "enrolled"
    faces = {str(p.relative_to(sample_faces_path()).with_suffix("")) for p in list_images(sample_faces_path())}
    first = subprocess.Popen(_enroll_cmd(live_server, tiny_bundle, out, "--batch-size", "2", "--steps", "40"),
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    index = out / "index.jsonl"
    poll_until(lambda: index.exists() and len(index.read_text().splitlines()) >= 3,
               "three enrolled batches before the kill", timeout=120, proc=first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    partial = _enrolled(out)
    assert 3 <= len(set(partial)) < len(faces)

    second = subprocess.run(_enroll_cmd(live_server, tiny_bundle, out, "--batch-size", "4"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"skipped {len(partial)} already enrolled" in second.stdout
    ids = _enrolled(out)
    assert sorted(ids) == sorted(faces)  # every face, each exactly once
    assert len(list((out / "shards").iterdir())) == len((out / "index.jsonl").read_text().splitlines())


def test_enroll_precomputed_features_and_report_bad_batches(live_server: LiveServer, tmp_path: Path,
                                                            capsys) -> None:  # noqa: ANN001
    z = np.random.default_rng(0).random((5, 64, 77, 77), dtype=np.float32)
    np.save(tmp_path / "feats.npy", z)
    code = advface_main(["enroll", "--target", live_server.address, "--input", str(tmp_path / "feats.npy"),
                        "--out", str(tmp_path / "o"), "--batch-size", "2", "--no-progress", "--wire-dtype", "float16"])
    assert code == 0
    assert _enrolled(tmp_path / "o") == [f"feats:{i}" for i in range(5)]
    assert "enrolled 5 faces" in capsys.readouterr().out
    with np.load(next((tmp_path / "o" / "shards").iterdir())) as shard:
        assert shard["features"].dtype == np.float16

    code = advface_main(["enroll", "--target", live_server.address, "--input", str(tmp_path / "feats.npy"),
                        "--out", str(tmp_path / "p"), "--no-progress", "--eps", "9"])
    assert code == 3
    failed = [json.loads(line) for line in (tmp_path / "p" / "failed.jsonl").read_text().splitlines()]
    assert len(failed) == 5 and all("OUT_OF_RANGE" in f["reason"] for f in failed)


def test_enroll_refuses_an_extractor_from_another_bundle(live_server: LiveServer, tmp_path: Path) -> None:
    from tests.helpers import make_bundle

    other = make_bundle(tmp_path / "other", seed=7)
    assert load_bundle(other).version != live_server.running.state.model_info.model_version
    code = advface_main(["enroll", "--target", live_server.address, "--input", str(sample_faces_path()),
                        "--out", str(tmp_path / "o"), "--bundle", str(other), "--no-progress"])
    assert code == 2


def test_client_health_and_info_commands(live_server: LiveServer, capsys) -> None:  # noqa: ANN001
    assert client_main(["--target", live_server.address, "health"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert client_main(["--target", live_server.address, "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature_shape"] == ["64", "77", "77"] and info["protector"] == "advface"
