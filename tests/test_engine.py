"""The AdvFace engine and the baseline protectors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plugin_service.bundle import sample_faces_path
from plugin_service.faces import load_face_folder
from plugin_service.models.extractor import Extractor, freeze
from plugin_service.models.shadow import ShadowSpec, batch_statistics, build_shadow
from plugin_service.protect.baselines import LaplaceDP, RandomNoise
from plugin_service.protect.pgd import AdvFace


def _models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    return freeze(Extractor()), freeze(build_shadow(ShadowSpec(width=4, depth=1)))


def _shadow_feature(extractor: torch.nn.Module, shadow: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), batch_statistics():
        return extractor(shadow(z))


def test_linf_bound_holds_for_every_element() -> None:
    extractor, shadow = _models()
    z = extractor(torch.rand(4, 3, 160, 160))
    for eps in (0.05, 0.2):
        out = AdvFace(extractor, shadow, eps=eps, alpha=0.2, steps=3)(z)
        shadow_feature = _shadow_feature(extractor, shadow, z)
        assert (out.features - shadow_feature).abs().max() <= eps + 1e-6
        assert torch.all(out.perturbation_norm <= eps + 1e-6)
        assert out.features.shape == z.shape and out.features.dtype == z.dtype


def test_l2_bound_holds_per_face() -> None:
    extractor, shadow = _models()
    z = extractor(torch.rand(3, 3, 160, 160))
    out = AdvFace(extractor, shadow, eps=2.0, alpha=1.0, steps=3, norm="l2")(z)
    delta = out.features - _shadow_feature(extractor, shadow, z)
    assert torch.all(delta.flatten(1).norm(dim=1) <= 2.0 + 1e-4)


@pytest.mark.slow  # trains a small shadow first (~10 s)
def test_shadow_loss_rises_on_a_trained_shadow() -> None:
    torch.manual_seed(0)
    extractor = freeze(Extractor())
    faces = load_face_folder(sample_faces_path()).floats(slice(None))
    shadow = build_shadow(ShadowSpec(width=4, depth=1))
    opt = torch.optim.Adam(shadow.parameters(), lr=3e-3)
    with torch.no_grad():
        z = extractor(faces)
    for _ in range(40):
        loss = F.l1_loss(shadow(z), faces)
        opt.zero_grad()
        loss.backward()
        opt.step()
    freeze(shadow)
    out = AdvFace(extractor, shadow, eps=0.2, alpha=0.2, steps=5)(z[:16])
    assert out.shadow_loss_after is not None and out.shadow_loss_before is not None
    assert torch.all(out.shadow_loss_after > out.shadow_loss_before)


def test_batch_statistics_couple_batch_mates_and_leave_running_stats_alone() -> None:
    extractor, shadow = _models()
    z = extractor(torch.rand(4, 3, 160, 160))
    buffers = {k: v.clone() for k, v in shadow.state_dict().items()}
    engine = AdvFace(extractor, shadow, eps=0.2, alpha=0.2, steps=2)
    first = engine(z).features[0]
    again = engine(z).features[0]
    other_mates = engine(torch.cat([z[:1], extractor(torch.rand(3, 3, 160, 160))])).features[0]
    torch.testing.assert_close(first, again)  # stateless: same batch, same answer
    assert not torch.allclose(first, other_mates)  # per-batch BN: mates matter
    for k, v in shadow.state_dict().items():
        torch.testing.assert_close(v, buffers[k], msg=f"{k} changed")


def test_engine_takes_no_weight_gradients() -> None:
    """PGD differentiates with respect to delta only, even if a caller left the weights trainable."""
    extractor, shadow = _models()
    for net in (extractor, shadow):
        net.requires_grad_(True)
    AdvFace(extractor, shadow, steps=2)(extractor(torch.rand(2, 3, 160, 160)).detach())
    params = [*shadow.parameters(), *extractor.parameters()]
    assert params and all(p.grad is None for p in params)


def test_random_noise_respects_its_bound() -> None:
    z = torch.rand(3, 64, 77, 77)
    out = RandomNoise(eps=0.1, alpha=0.04, steps=10, generator=torch.Generator().manual_seed(0))(z)
    assert (out.features - z).abs().max() <= 0.1 + 1e-6
    assert (out.features - z).abs().max() > 0.05  # it does perturb


def test_laplace_dp_clips_and_scales_noise_by_budget() -> None:
    z = torch.rand(8, 64, 77, 77) * 3
    dp = LaplaceDP(epsilon=2.0, bound=1.0, generator=torch.Generator().manual_seed(0))
    noise = dp(z).features - z.clamp(0, 1.0)
    # Laplace(b): E|X| = b = bound / epsilon
    assert abs(noise.abs().mean().item() - 0.5) < 0.01
    assert abs(noise.mean().item()) < 0.01
