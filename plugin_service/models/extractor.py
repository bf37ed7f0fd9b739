"""The client-side extractor E: the first layers of facenet-pytorch's InceptionResnetV1.

E is what a recognition client runs on the phone or kiosk; its output is the feature that
travels to the server and gets stored. Everything after the split point stays on the server
(see :mod:`plugin_service.models.recognizer`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from facenet_pytorch.models.inception_resnet_v1 import BasicConv2d
from torch import nn

from plugin_service.names import DEFAULT_SPLIT

# InceptionResnetV1's stem, in forward order, with the feature shape each layer yields for a
# 160x160 face. The paper splits after conv2d_2b (64x77x77); the others are offered for
# experiments with deeper or shallower client extractors.
STEM_LAYERS: tuple[str, ...] = ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b")
FACE_SIZE = 160


def _stem_layer(name: str) -> nn.Module:
    """Builds one stem layer with the exact hyper-parameters of InceptionResnetV1."""
    layers: dict[str, nn.Module] = {
        "conv2d_1a": BasicConv2d(3, 32, kernel_size=3, stride=2),
        "conv2d_2a": BasicConv2d(32, 32, kernel_size=3, stride=1),
        "conv2d_2b": BasicConv2d(32, 64, kernel_size=3, stride=1, padding=1),
        "maxpool_3a": nn.MaxPool2d(3, stride=2),
        "conv2d_3b": BasicConv2d(64, 80, kernel_size=1, stride=1),
    }
    return layers[name]


def layers_until(split: str) -> tuple[str, ...]:
    """Names of the stem layers that make up E for a split point, in order."""
    if split not in STEM_LAYERS:
        raise ValueError(f"unknown split point {split!r}; choose one of {', '.join(STEM_LAYERS)}")
    return STEM_LAYERS[: STEM_LAYERS.index(split) + 1]


def standardize(images: torch.Tensor) -> torch.Tensor:
    """facenet-pytorch's fixed_image_standardization for images in [0, 1]: (255x - 127.5) / 128."""
    return (images * 255.0 - 127.5) / 128.0


class Extractor(nn.Module):
    """E: faces (N, 3, 160, 160) in [0, 1] -> features (N, C, H, W); (N, 64, 77, 77) at conv2d_2b.

    The input standardisation lives inside E so that every caller (client, shadow training,
    PGD's z~ = E(x~)) feeds the same [0, 1] images and none can forget it.
    """

    def __init__(self, split: str = DEFAULT_SPLIT) -> None:
        super().__init__()
        self.split = split
        self.layers = nn.Sequential()
        for name in layers_until(split):
            self.layers.add_module(name, _stem_layer(name))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(standardize(images))

    def feature_shape(self) -> tuple[int, int, int]:
        with torch.no_grad():
            probe = torch.zeros(1, 3, FACE_SIZE, FACE_SIZE, device=next(self.parameters()).device)
            was_training = self.training
            self.eval()
            shape = tuple(self(probe).shape[1:])
            self.train(was_training)
        return shape  # type: ignore[return-value]

    def load_facenet_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Loads E's layers from a full InceptionResnetV1 state dict (keys like ``conv2d_1a.conv.weight``).

        Keys of later layers are ignored, so the released vggface2 / casia-webface files and the
        recognisers trained here all work. Missing stem keys are an error, never a silent default.
        """
        wanted = {k: v for k, v in state.items() if k.split(".")[0] in self.layers._modules}
        mapped = {f"layers.{k}": v for k, v in wanted.items()}
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if missing:
            raise ValueError(f"the state dict lacks extractor weights: {', '.join(sorted(missing)[:6])}")
        assert not unexpected, unexpected

    def facenet_state(self) -> dict[str, torch.Tensor]:
        """E's weights under facenet-pytorch key names, the inverse of :meth:`load_facenet_state`."""
        return {k.removeprefix("layers."): v for k, v in self.state_dict().items()}


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no weight gradients: shared read-only by concurrent engine calls."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``module``: their running statistics are what fine-tuning and re-measuring touch."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
