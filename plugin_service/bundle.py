"""Model bundles: E and S as safetensors, plus a manifest that says exactly what they are.

A bundle is a directory::

    manifest.json          architectures, hyper-parameters, feature shape/dtype, input
                           normalisation, split point, training data, PGD defaults, hashes
    extractor.safetensors  E's weights under facenet-pytorch key names
    shadow.safetensors     S's weights
    recognizer.safetensors optional: R, the server-side recogniser after the split (for resynth)
    start.safetensors      optional, with R: resynth's fixed public starting feature (mean of
                           E over public faces), so that no stored feature ever starts from z

Loading checks every claim the manifest makes and names the first one that is false. The
content hash (over the manifest's fields and every weight file) is the model version that the
service reports in its info RPC and metrics, so two replicas with the same version compute the
same thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from plugin_service.models.extractor import FACE_SIZE, Extractor, freeze
from plugin_service.models.recognizer import Recognizer, RecognizerSpec
from plugin_service.models.shadow import ShadowSpec, build_shadow

FORMAT = "advface-bundle/1"
MANIFEST = "manifest.json"
# The repository's samples/ folder (present in a clone and an editable install, absent from the wheel).
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
EXTRACTOR_FILE = "extractor.safetensors"
SHADOW_FILE = "shadow.safetensors"
RECOGNIZER_FILE = "recognizer.safetensors"
START_FILE = "start.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class BundleError(ValueError):
    """A bundle is missing, corrupt, or inconsistent; the message says which part and why."""


@dataclass(frozen=True)
class PGDDefaults:
    """The paper's attack settings (Sec. 4.1): 40 steps of 0.2 within an L_inf ball of 0.2."""

    steps: int = 40
    alpha: float = 0.2
    eps: float = 0.2
    norm: str = "linf"


@dataclass(frozen=True)
class ResynthDefaults:
    """Resynth's stopping rule: cos(R(z'), R(z)) >= target_cosine, or max_steps Adam steps of lr."""

    target_cosine: float = 0.99
    max_steps: int = 100
    lr: float = 0.02


@dataclass(frozen=True)
class Manifest:
    split: str
    shadow: ShadowSpec
    feature_shape: tuple[int, int, int]
    feature_dtype: str = "float32"
    input_size: int = FACE_SIZE
    input_range: tuple[float, float] = (0.0, 1.0)
    input_standardization: str = "E computes (255*x - 127.5) / 128 on RGB faces in [0, 1]"
    pgd: PGDDefaults = PGDDefaults()
    provenance: dict[str, str] = field(default_factory=dict)  # what data and command trained E and S
    # R (the recogniser after the split) when the bundle carries it: resynth needs it.
    recognizer: RecognizerSpec | None = None
    # Largest feature value the service accepts: a generous multiple of the largest value E gave
    # on public faces (E ends in a ReLU, so the smallest is 0). None: not recorded.
    feature_bound: float | None = None
    resynth: ResynthDefaults = ResynthDefaults()

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["format"] = FORMAT
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Manifest:
        if body.get("format") != FORMAT:
            raise BundleError(f"manifest format is {body.get('format')!r}, this build reads {FORMAT!r}")
        try:
            return cls(
                split=body["split"],
                shadow=ShadowSpec(**body["shadow"]),
                feature_shape=tuple(body["feature_shape"]),  # type: ignore[arg-type]
                feature_dtype=body["feature_dtype"],
                input_size=body["input_size"],
                input_range=tuple(body["input_range"]),  # type: ignore[arg-type]
                input_standardization=body["input_standardization"],
                pgd=PGDDefaults(**body["pgd"]),
                provenance=dict(body.get("provenance", {})),
                recognizer=RecognizerSpec(**body["recognizer"]) if body.get("recognizer") else None,
                feature_bound=body.get("feature_bound"),
                resynth=ResynthDefaults(**body.get("resynth", {})),
            )
        except KeyError as e:
            raise BundleError(f"manifest lacks the field {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest is invalid: {e}") from e


@dataclass
class Bundle:
    """Loaded, validated, frozen E and S, shared read-only by every engine call."""

    manifest: Manifest
    extractor: Extractor
    shadow: nn.Module
    content_hash: str
    path: Path
    recognizer: Recognizer | None = None  # E + R when the manifest names R; shares E's weights
    start: torch.Tensor | None = None  # (C, H, W) resynth's public starting feature

    @property
    def version(self) -> str:
        return self.content_hash[:12]

    def to(self, device: torch.device) -> Bundle:
        self.extractor.to(device)
        self.shadow.to(device)
        if self.recognizer is not None:
            self.recognizer.to(device)
        if self.start is not None:
            self.start = self.start.to(device)
        return self

    def require_recognizer(self, why: str) -> tuple[Recognizer, torch.Tensor]:
        """(E + R, start feature), or a BundleError saying how to add them."""
        if self.recognizer is None or self.start is None:
            raise BundleError(f"bundle {self.path} carries no recogniser R, which {why} needs; add it with "
                              "`advface bundle-add-recognizer --bundle DIR --recognizer R.safetensors --data PUBLIC_FACES`")
        return self.recognizer, self.start


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _content_hash(manifest: dict[str, Any], file_hashes: dict[str, str]) -> str:
    body = {k: v for k, v in manifest.items() if k not in ("content_hash", "files")}
    blob = json.dumps({"manifest": body, "files": file_hashes}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def extractor_mismatch(recognizer: Recognizer, bundle: Bundle) -> str | None:
    """Why ``recognizer``'s E is not exactly the bundle's E, or None when it is.

    R only means something on features of the E it was trained with: with another E every
    utility number, and resynth itself, would measure a mismatch rather than the protection.
    """
    ours, theirs = recognizer.extractor.facenet_state(), bundle.extractor.facenet_state()
    if recognizer.spec.split != bundle.manifest.split or set(ours) != set(theirs):
        return f"it splits E at {recognizer.spec.split}, the bundle at {bundle.manifest.split}"
    differing = [k for k in ours if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if differing:
        return (f"its extractor E differs from the bundle's ({len(differing)} tensors, e.g. {differing[0]}); use the "
                "recogniser whose weights trained the bundle (train-shadow --extractor)")
    return None


def _head_state(recognizer: Recognizer) -> dict[str, torch.Tensor]:
    """R's tensors only: E lives once, in extractor.safetensors."""
    e_keys = set(recognizer.extractor.facenet_state())
    return {k: v for k, v in recognizer.flat_state().items() if k not in e_keys}


def save_bundle(path: Path, manifest: Manifest, extractor: Extractor, shadow: nn.Module,
                recognizer: Recognizer | None = None, start: torch.Tensor | None = None) -> str:
    """Writes a bundle directory and returns its content hash.

    ``recognizer`` (E + R) and ``start`` go together; the manifest's ``recognizer`` field must
    then name R's spec, and R's E must be ``extractor``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (recognizer is None) != (start is None) or (recognizer is None) != (manifest.recognizer is None):
        raise BundleError("a bundle carries R, its start feature and its manifest entry together, or none of them")
    save_file({k: v.contiguous().cpu() for k, v in extractor.facenet_state().items()}, str(path / EXTRACTOR_FILE))
    save_file({k: v.contiguous().cpu() for k, v in shadow.state_dict().items()}, str(path / SHADOW_FILE))
    names = [EXTRACTOR_FILE, SHADOW_FILE]
    if recognizer is not None and start is not None:
        save_file(_head_state(recognizer), str(path / RECOGNIZER_FILE))
        save_file({"start": start.detach().float().contiguous().cpu()}, str(path / START_FILE))
        names += [RECOGNIZER_FILE, START_FILE]
    else:
        for stale in (RECOGNIZER_FILE, START_FILE):
            (path / stale).unlink(missing_ok=True)
    body = manifest.to_json()
    files = {name: _sha256(path / name) for name in names}
    body["files"] = files
    body["content_hash"] = _content_hash(body, files)
    (path / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return body["content_hash"]


def _read_weights(file: Path, expected: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Reads a safetensors file and checks it holds exactly ``expected``'s keys and shapes."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"{file.name}: not a readable safetensors file ({e})") from e
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BundleError(f"{file.name}: {what} weights do not match the manifest's architecture "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise BundleError(f"{file.name}: tensor {key} has shape {tuple(tensor.shape)}, "
                              f"the manifest's {what} needs {tuple(expected[key].shape)}")
    return state


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Loads and validates a bundle; ``None`` means the default bundle embedded in the package."""
    path = default_bundle_path() if path is None else Path(path)
    if not path.is_dir():
        problem = "is a file, not a bundle directory" if path.exists() else "does not exist"
        hint = f"; the bundle is its directory, {path.parent}" if path.name == MANIFEST else ""
        raise BundleError(f"bundle {path} {problem}{hint}")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise BundleError(f"bundle {path} holds pickle files {pickles}; bundles carry safetensors only, "
                          "since unpickling runs arbitrary code")
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"bundle {path} has no {MANIFEST}")
    try:
        body = json.loads(manifest_file.read_text())
    except OSError as e:
        raise BundleError(f"{manifest_file}: cannot read it ({e.strerror})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{manifest_file}: not valid JSON ({e})") from e
    if not isinstance(body, dict):
        raise BundleError(f"{manifest_file}: holds a JSON {type(body).__name__}, not a manifest object")
    # Checked before the other fields: without it nothing in the bundle can be verified.
    if not isinstance(body.get("files"), dict):
        raise BundleError(f"{manifest_file}: manifest lacks its 'files' table (file name -> sha256)")
    manifest = Manifest.from_json(body)
    recorded = body["files"]
    names = [EXTRACTOR_FILE, SHADOW_FILE] + ([RECOGNIZER_FILE, START_FILE] if manifest.recognizer else [])
    hashes = {}
    for name in names:
        if not (path / name).is_file():
            raise BundleError(f"bundle {path} lacks {name}")
        hashes[name] = _sha256(path / name)
        if recorded.get(name) != hashes[name]:
            raise BundleError(f"{name}: sha256 {hashes[name][:12]} does not match the manifest's "
                              f"{str(recorded.get(name))[:12]}; the file was changed or corrupted")
    content_hash = _content_hash(body, hashes)
    if body.get("content_hash") != content_hash:
        raise BundleError(f"{MANIFEST}: content hash mismatch (manifest says {str(body.get('content_hash'))[:12]}, "
                          f"contents give {content_hash[:12]}); the manifest was edited after the bundle was made")
    try:
        extractor = Extractor(manifest.split)
        shadow = build_shadow(manifest.shadow)
    except ValueError as e:
        raise BundleError(f"{MANIFEST}: {e}") from e
    extractor.load_facenet_state(_read_weights(path / EXTRACTOR_FILE, extractor.facenet_state(), "extractor"))
    shadow.load_state_dict(_read_weights(path / SHADOW_FILE, shadow.state_dict(), "shadow"))
    freeze(extractor)
    freeze(shadow)
    recognizer, start = None, None
    if manifest.recognizer is not None:
        recognizer, start = _load_recognizer(path, manifest, extractor)
    actual = extractor.feature_shape()
    if actual != tuple(manifest.feature_shape):
        raise BundleError(f"{MANIFEST}: feature_shape {list(manifest.feature_shape)} but E at split "
                          f"{manifest.split} gives {list(actual)}")
    if manifest.feature_dtype not in ("float32", "float16"):
        raise BundleError(f"{MANIFEST}: feature_dtype {manifest.feature_dtype!r} is not float32 or float16")
    return Bundle(manifest, extractor, shadow, content_hash, path, recognizer, start)


def _load_recognizer(path: Path, manifest: Manifest, extractor: Extractor) -> tuple[Recognizer, torch.Tensor]:
    """E + R (R from recognizer.safetensors, E shared with the bundle) and the start feature."""
    assert manifest.recognizer is not None
    if manifest.recognizer.split != manifest.split:
        raise BundleError(f"{MANIFEST}: R is split at {manifest.recognizer.split}, E at {manifest.split}")
    try:
        recognizer = Recognizer(manifest.recognizer)
    except ValueError as e:
        raise BundleError(f"{MANIFEST}: {e}") from e
    head = _read_weights(path / RECOGNIZER_FILE, _head_state(recognizer), "recogniser")
    recognizer.load_flat_state({**extractor.facenet_state(), **head})
    recognizer.extractor = extractor  # one E in memory: the recogniser cannot drift from the bundle's E
    freeze(recognizer)
    start = _read_weights(path / START_FILE, {"start": torch.zeros(manifest.feature_shape)}, "start feature")["start"]
    return recognizer, start


def default_bundle_path() -> Path:
    return Path(str(resources.files("plugin_service") / "assets" / "default_bundle"))


def default_recognizer_path() -> Path:
    return Path(str(resources.files("plugin_service") / "assets" / "recognizer.safetensors"))


def sample_faces_path() -> Path:
    """The source repository's CelebA sample faces, which the wheel leaves out (non-commercial licence)."""
    path = SAMPLES / "faces"
    if not path.is_dir():
        raise FileNotFoundError(f"no sample faces at {path}: the CelebA samples ship with the source repository only "
                                "(see its samples/README.md for their licence); pass your own aligned faces")
    return path
