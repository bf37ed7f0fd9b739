"""The client alone: installed into an empty venv without torch, it runs the README's example against a live server.

The venv is made with ``python -m venv`` in a temporary directory and gets exactly what the
README tells a backend to install (``'.[client]'`` with constraints.txt). The example is read
from README.md, so the README cannot drift from what is tested; only the address is replaced
by the test server's. The server runs in this (the main) venv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import LiveServer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_MARKER = "<!-- client-example:"
SOURCE_FILES = ("pyproject.toml", "README.md", "clients", "plugin_service")  # what building the wheel reads
README_ADDRESS = "localhost:50051"
MAX_WHEELS_MB = 50  # what pip downloads for the client: the "under 50 MB"
# On disk NumPy alone takes ~73 MB (its OpenBLAS is 28 MB) and grpcio ~19 MB, so the installed
# footprint cannot be under 50 MB; this bound catches a heavy dependency (torch is gigabytes).
MAX_INSTALLED_MB = 150
# The server's dependencies; plugin_service's own code is in the wheel but cannot import without them.
SERVER_ONLY = ("torch", "torchvision", "facenet_pytorch", "safetensors", "prometheus_client", "PIL")

pytestmark = pytest.mark.slow


def readme_example() -> str:
    """The python block right after the client-example marker in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(EXAMPLE_MARKER) + r".*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its client example block"
    return match.group(1)


def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_the_readme_example_is_five_lines() -> None:
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    assert README_ADDRESS in code and "torch" not in code


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the client wheel and its dependencies, installed from wheels built here."""
    tmp = tmp_path_factory.mktemp("client")
    wheels = tmp / "wheels"
    run([sys.executable, "-m", "venv", str(tmp / "venv")], timeout=300)
    python = tmp / "venv" / "bin" / "python"
    source = tmp / "src"  # a copy: an in-tree build would leave build/ in the repository, stale files and all
    source.mkdir()
    for name in SOURCE_FILES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run([str(python), "-m", "pip", "wheel", "-q", "-c", str(ROOT / "constraints.txt"), "-w", str(wheels),
         f"{source}[client]"], timeout=900, cwd=tmp)
    run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
         "-c", str(ROOT / "constraints.txt"), "advface-guard[client]"], timeout=900, cwd=tmp)
    return python


def installed_mb(python: Path) -> dict[str, float]:
    """Bytes on disk of every installed distribution but the venv's own pip/setuptools, in MB."""
    code = ("import json, os\nfrom importlib import metadata\nsizes = {}\n"
            "for d in metadata.distributions():\n"
            "    name = d.metadata['Name']\n"
            "    if name in ('pip', 'setuptools'): continue\n"
            "    files = [d.locate_file(f) for f in d.files or []]\n"
            "    sizes[name] = sum(os.path.getsize(f) for f in files if os.path.isfile(f)) / 2**20\n"
            "print(json.dumps(sizes))")
    return json.loads(run([str(python), "-c", code], timeout=120).stdout)


def test_the_client_installs_without_torch_and_small(client_venv: Path) -> None:
    wheels = client_venv.parents[2] / "wheels"
    wheel_mb = sum(w.stat().st_size for w in wheels.glob("*.whl")) / 2**20
    sizes = installed_mb(client_venv)
    print(f"client wheels {wheel_mb:.1f} MB; installed {sum(sizes.values()):.1f} MB: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])))
    assert not {n.lower() for n in sizes} & {"torch", "torchvision", "facenet-pytorch"}, sorted(sizes)
    assert wheel_mb < MAX_WHEELS_MB
    (own,) = wheels.glob("advface_guard-*.whl")
    with zipfile.ZipFile(own) as z:  # the CelebA samples (non-commercial licence) stay out of the wheel
        assert not [n for n in z.namelist() if n.endswith(".jpg")]
    assert sum(sizes.values()) < MAX_INSTALLED_MB
    probe = f"import importlib.util as u; print([m for m in {SERVER_ONLY!r} if u.find_spec(m)])"
    assert run([str(client_venv), "-c", probe], timeout=60).stdout.strip() == "[]"


def test_the_readme_example_runs_against_a_live_server(client_venv: Path, live_server: LiveServer,
                                                        tmp_path: Path) -> None:
    code = readme_example().replace(README_ADDRESS, live_server.address)
    script = tmp_path / "example.py"
    script.write_text(code + "import sys\nassert not {'torch', 'plugin_service'} & set(sys.modules)\n")
    out = run([str(client_venv), str(script)], timeout=300, cwd=tmp_path).stdout
    assert out.startswith("(2, 64, 77, 77) ") and len(out.split()[-1]) == 12
