"""E, the recogniser and the reconstruction networks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from facenet_pytorch import InceptionResnetV1

from plugin_service.models.extractor import Extractor, freeze, standardize
from plugin_service.models.recognizer import Recognizer, RecognizerSpec, load_recognizer
from plugin_service.models.shadow import (
    SHADOW_ARCHITECTURES,
    ShadowSpec,
    build_shadow,
    flops_per_face,
)


def test_extractor_output_shape() -> None:
    z = freeze(Extractor())(torch.rand(2, 3, 160, 160))
    assert z.shape == (2, 64, 77, 77)


def test_extractor_equals_first_three_facenet_blocks() -> None:
    torch.manual_seed(0)
    net = InceptionResnetV1().eval()
    for m in net.modules():  # non-trivial BN statistics, so a wrong mapping would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    extractor = Extractor()
    extractor.load_facenet_state(net.state_dict())
    freeze(extractor)
    x = torch.rand(3, 3, 160, 160)
    with torch.no_grad():
        expected = net.conv2d_2b(net.conv2d_2a(net.conv2d_1a(standardize(x))))
        got = extractor(x)
    torch.testing.assert_close(got, expected)


def test_extractor_refuses_state_without_its_layers() -> None:
    with pytest.raises(ValueError, match="lacks extractor weights"):
        Extractor().load_facenet_state({"conv2d_1a.conv.weight": torch.zeros(32, 3, 3, 3)})


def test_other_split_points_change_the_feature_shape() -> None:
    assert Extractor("conv2d_2a").feature_shape() == (32, 77, 77)
    assert Extractor("conv2d_3b").feature_shape() == (80, 38, 38)
    with pytest.raises(ValueError, match="unknown split point"):
        Extractor("mixed_6a")


@pytest.mark.parametrize("arch", ["light", pytest.param("facenet", marks=pytest.mark.slow)])
def test_recognizer_round_trip(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Recognizer(RecognizerSpec(arch=arch, width=8)).eval()
    path = tmp_path / "r.safetensors"
    model.save(path)
    loaded = load_recognizer(path).eval()
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
        emb = loaded.embed_features(loaded.extractor(x))
    assert emb.shape == (2, loaded.embedding_dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_released_facenet_state_dict_loads_with_weights_only(tmp_path: Path) -> None:
    net = InceptionResnetV1(classify=True, num_classes=5)
    path = tmp_path / "facenet.pt"
    torch.save(net.state_dict(), path)
    model = load_recognizer(path)
    assert model.spec.arch == "facenet"
    torch.testing.assert_close(model.extractor.facenet_state()["conv2d_1a.conv.weight"], net.conv2d_1a.conv.weight)


@pytest.mark.parametrize("arch", SHADOW_ARCHITECTURES)
def test_reconstruction_networks_map_features_to_faces(arch: str) -> None:
    model = build_shadow(ShadowSpec(arch=arch, width=4, depth=1)).eval()
    out = model(torch.rand(2, 64, 77, 77))
    assert out.shape == (2, 3, 160, 160)
    assert out.min() >= 0 and out.max() <= 1
    assert flops_per_face(model, (64, 77, 77)) > 0


def test_unknown_shadow_architecture_is_named() -> None:
    with pytest.raises(ValueError, match="unknown reconstruction architecture 'vae'"):
        ShadowSpec(arch="vae")
