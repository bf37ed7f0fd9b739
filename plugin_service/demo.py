"""`advface demo`: the whole product in one command, on the embedded bundle and sample faces.

Starts `advface serve` as a real subprocess, waits for it to report SERVING, streams an
enrollment of the sample faces through it with the client library, prints throughput, the
privacy gain and a few metrics scraped from /metrics, then stops the server with SIGTERM and
checks that it drained and exited cleanly.

With ``server_args`` (``--tls-cert``, ``--auth-tokens``...) the server runs secured, and the
client connects with ``tls`` and ``token``, exactly as a backend would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from plugin_service.bundle import sample_faces_path

if TYPE_CHECKING:
    from advface_client import TLSConfig

SHOWN_METRICS = ("advface_faces_protected_total", "advface_batches_total", "advface_compute_seconds_sum",
                 "advface_shadow_loss_gain_ratio_count")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(faces: Path | None = None, out: Path | None = None, batch_size: int = 16, bundle: Path | None = None,
             server_args: tuple[str, ...] = (), tls: TLSConfig | None = None, token: str | None = None,
             timeout: float | None = None) -> int:
    from advface_client.client import GuardClient
    from plugin_service.enroll import enroll

    from plugin_service.bundle import load_bundle

    faces = faces or sample_faces_path()
    out = out or Path(tempfile.mkdtemp(prefix="advface-demo-"))
    port, metrics_port = _free_port(), _free_port()
    cmd = [sys.executable, "-m", "plugin_service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(metrics_port)]
    if bundle:
        cmd += ["--bundle", str(bundle)]
    cmd += server_args
    print(f"[demo] starting: advface serve --port {port} --metrics-port {metrics_port}", flush=True)
    server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        extractor = load_bundle(bundle).extractor
        with GuardClient(f"127.0.0.1:{port}", tls=tls, token=token, timeout=timeout) as client:
            client.wait_until_serving(timeout=300)
            info = client.info()
            print(f"[demo] service SERVING bundle {info.model_version} ({info.shadow_arch} shadow, "
                  f"{info.protector} steps={info.protector_params['steps']} eps={info.protector_params['eps']}) "
                  f"on {info.device}", flush=True)
            print(f"[demo] enrolling {faces} -> {out} in batches of {batch_size}", flush=True)
            summary = enroll(client, faces, out, extractor, batch_size=batch_size)
        print(f"[demo] enrolled {summary.enrolled} faces in {summary.seconds:.1f}s: {summary.faces_per_second:.2f} faces/s")
        print(f"[demo] privacy gain: median shadow-model L1 loss after/before protection = {summary.median_gain:.3f} "
              f"(min {min(summary.gains):.3f}, max {max(summary.gains):.3f}; 1.0 would mean no gain)")
        print(f"[demo] protected features: {out / 'shards'}, index: {out / 'index.jsonl'}")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        print(f"[demo] metrics endpoint: {url}")
        for line in text.splitlines():
            if line.startswith(SHOWN_METRICS):
                print(f"[demo]   {line}")
        if summary.failed:
            print(f"[demo] {summary.failed} faces failed; see {out / 'failed.jsonl'}")
            return 1
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
    print(f"[demo] server drained and exited with code {code}")
    return 0 if code == 0 else 1
