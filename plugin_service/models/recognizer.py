"""The face recogniser, split into the client-side extractor E and the server-side head.

Two architectures share one interface:

* ``facenet``: facenet-pytorch's full InceptionResnetV1; the head is every layer after the
  split point. This is the paper's setting and the one to use with the released vggface2 weights.
* ``light``: the same E followed by a small convolutional head. It exists because the full
  network cannot be trained from scratch to a useful accuracy on two CPU cores; the shipped
  numbers say which one they used.

Weights are stored as safetensors with facenet-pytorch key names for E (``conv2d_1a.conv.weight``)
so that E loads identically from either architecture or from a released FaceNet state dict.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from facenet_pytorch import InceptionResnetV1
from safetensors.torch import load_file, save_file
from torch import nn

from plugin_service.models.extractor import DEFAULT_SPLIT, STEM_LAYERS, Extractor, layers_until
from plugin_service.names import RECOGNIZER_ARCHITECTURES
from plugin_service.runtime import progress

# Unit embeddings are scaled before an identity classifier (training it, or fine-tuning an attacker
# through it) so that softmax can become confident.
EMBEDDING_SCALE = 16.0


@dataclass(frozen=True)
class RecognizerSpec:
    """Everything needed to rebuild a recogniser before its weights are loaded."""

    arch: str = "light"
    split: str = DEFAULT_SPLIT
    embedding_dim: int = 128
    width: int = 64  # light head only: channels of its first block

    def __post_init__(self) -> None:
        if self.arch not in RECOGNIZER_ARCHITECTURES:
            raise ValueError(f"unknown recogniser architecture {self.arch!r}; choose one of {RECOGNIZER_ARCHITECTURES}")
        layers_until(self.split)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LightHead(nn.Module):
    """Features (N, C, 77, 77) -> unit embeddings (N, D): four strided conv blocks, pool, linear."""

    def __init__(self, in_channels: int, width: int, embedding_dim: int) -> None:
        super().__init__()
        w = width
        self.blocks = nn.Sequential(
            _conv_bn_relu(in_channels, w, 2),
            _conv_bn_relu(w, 2 * w, 2),
            _conv_bn_relu(2 * w, 2 * w, 1),
            _conv_bn_relu(2 * w, 4 * w, 2),
            _conv_bn_relu(4 * w, 4 * w, 1),
            _conv_bn_relu(4 * w, 8 * w, 2),
        )
        self.dropout = nn.Dropout(0.2)
        self.linear = nn.Linear(8 * w, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.blocks(z), 1).flatten(1)
        return F.normalize(self.bn(self.linear(self.dropout(x))), dim=1)


class FacenetHead(nn.Module):
    """The layers of InceptionResnetV1 after the split point, holding the full network's weights."""

    def __init__(self, split: str) -> None:
        super().__init__()
        self.net = InceptionResnetV1()
        self.skip = len(layers_until(split))
        for name in layers_until(split):  # E's layers live in the Extractor, not twice
            delattr(self.net, name)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = z
        for name in STEM_LAYERS[self.skip :]:
            x = getattr(n, name)(x)
        for layer in (n.conv2d_4a, n.conv2d_4b, n.repeat_1, n.mixed_6a, n.repeat_2, n.mixed_7a, n.repeat_3, n.block8):
            x = layer(x)
        x = n.last_linear(n.dropout(n.avgpool_1a(x)).flatten(1))
        return F.normalize(n.last_bn(x), dim=1)


class Recognizer(nn.Module):
    """E followed by a server-side head: faces -> unit embeddings, or features -> embeddings."""

    def __init__(self, spec: RecognizerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.extractor = Extractor(spec.split)
        if spec.arch == "light":
            channels = self.extractor.feature_shape()[0]
            self.head: nn.Module = LightHead(channels, spec.width, spec.embedding_dim)
        else:
            self.head = FacenetHead(spec.split)

    @property
    def embedding_dim(self) -> int:
        return 512 if self.spec.arch == "facenet" else self.spec.embedding_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """What the server does with a stored (possibly adversarial) feature."""
        return self.head(features)

    def flat_state(self) -> dict[str, torch.Tensor]:
        """State under facenet-pytorch names for E (and, for ``facenet``, the whole network)."""
        state = self.extractor.facenet_state()
        for k, v in self.head.state_dict().items():
            if self.spec.arch == "facenet":
                state[k.removeprefix("net.")] = v
            else:
                state[f"head.{k}"] = v
        return {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def load_flat_state(self, state: dict[str, torch.Tensor]) -> None:
        self.extractor.load_facenet_state(state)
        if self.spec.arch == "facenet":
            own = set(self.head.state_dict())
            head_state = {f"net.{k}": v for k, v in state.items() if f"net.{k}" in own}
            missing = own - set(head_state)
        else:
            head_state = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
            missing = set(self.head.state_dict()) - set(head_state)
        if missing:
            raise ValueError(f"recogniser weights lack {len(missing)} head tensors, e.g. {sorted(missing)[0]}")
        self.head.load_state_dict(head_state)

    def save(self, path: Path, extra: dict[str, str] | None = None) -> None:
        meta = {"spec": json.dumps(asdict(self.spec)), **(extra or {})}
        save_file(self.flat_state(), str(path), metadata=meta)


def load_recognizer(path: Path, map_location: str = "cpu") -> Recognizer:
    """Loads a recogniser saved by :meth:`Recognizer.save`, or a released FaceNet state dict.

    Released FaceNet files (``20180402-114759-vggface2.pt``) are pickled state dicts; they are
    read with ``weights_only=True``, which refuses anything but tensors, so no code runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recogniser weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        spec = RecognizerSpec(**json.loads(meta["spec"])) if "spec" in meta else RecognizerSpec(arch="facenet")
        state = load_file(str(path), device=map_location)
    else:
        spec = RecognizerSpec(arch="facenet")
        state = torch.load(path, map_location=map_location, weights_only=True)
    model = Recognizer(spec)
    model.load_flat_state(state)
    return model


@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 64,
                 desc: str = "embedding") -> torch.Tensor:
    """The recogniser's (N, D) embeddings of uint8 faces, batch by batch, on the CPU."""
    batches = torch.arange(len(images)).split(batch_size)
    out = [model(images[idx].float().div(255.0).to(device)).float().cpu()
           for idx in progress(batches, total=len(batches), desc=desc)]
    return torch.cat(out)
