"""Tier A2 (training-free inversion of E), the surrogate E, and the A3 linkage maps."""

from __future__ import annotations

import pytest
import torch

from plugin_service.bundle import load_bundle, sample_faces_path
from plugin_service.evaluation.attacks import (
    InversionSettings,
    feature_objective,
    fit_linear_link,
    fit_surrogate_extractor,
    invert,
    predict,
    train_linkage_student,
)
from plugin_service.evaluation.scoring import Gallery, rank1
from plugin_service.faces import load_face_folder
from plugin_service.image_metrics import ssim

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # each test optimises faces or trains a network on the real E


def test_inversion_recovers_a_clean_face_through_e() -> None:
    extractor = load_bundle(None).extractor  # the real, tiny E: three conv layers
    faces = load_face_folder(sample_faces_path())
    x = faces.floats(torch.tensor([0, 10]))
    with torch.no_grad():
        z = extractor(x)
    recon = invert(feature_objective(extractor), z, InversionSettings(steps=120, lr=0.3, tv_weight=0.1), CPU)
    grey = torch.full_like(x, 0.5)
    assert recon.shape == x.shape and recon.min() >= 0 and recon.max() <= 1
    recovered, flat = float(ssim(recon, x).mean()), float(ssim(grey, x).mean())
    assert recovered > 0.6 and recovered > flat + 0.2, (recovered, flat)


def test_surrogate_extractor_fits_queries() -> None:
    extractor = load_bundle(None).extractor
    faces = load_face_folder(sample_faces_path())
    surrogate = fit_surrogate_extractor(faces.images, extractor, "conv2d_2b", epochs=6, device=CPU, batch_size=8,
                                       lr=1e-2)
    x = faces.floats(slice(0, 4))
    with torch.no_grad():
        target = extractor(x)
        fitted = (surrogate(x) - target).pow(2).mean()
        fresh = (type(surrogate)("conv2d_2b")(x) - target).pow(2).mean()
    assert float(fitted) < 0.5 * float(fresh)


def test_linkage_student_links_stored_values_to_identities() -> None:
    torch.manual_seed(0)
    people, shots = 12, 6
    identity = torch.nn.functional.normalize(torch.randn(people, 16), dim=1)
    judge = identity.repeat_interleave(shots, 0) + 0.05 * torch.randn(people * shots, 16)
    mixing = torch.randn(16, 32)
    stored = judge @ mixing + 0.05 * torch.randn(people * shots, 32)  # a transform of the identity
    names = [f"p{i}" for i in range(people) for _ in range(shots)]
    train = torch.arange(len(names)) % shots != 0
    student = train_linkage_student(stored[train], judge[train], epochs=30, device=CPU, batch_size=8)
    held_out = (~train).nonzero().flatten()
    gallery = Gallery(identity, [f"p{i}" for i in range(people)])
    hits = rank1(predict(student, stored[held_out], CPU), [names[i] for i in held_out], gallery, metric="cosine")
    assert hits >= 0.75 > gallery.chance * 3


def test_linear_link_maps_an_affine_transform_of_the_identity_back_to_it() -> None:
    torch.manual_seed(1)
    people, shots = 12, 6
    identity = torch.nn.functional.normalize(torch.randn(people, 16), dim=1)
    judge = identity.repeat_interleave(shots, 0) + 0.05 * torch.randn(people * shots, 16)
    stored = judge @ torch.randn(16, 24) + torch.randn(24)  # an affine view of the identity, as R(stored) is
    names = [f"p{i}" for i in range(people) for _ in range(shots)]
    train = torch.arange(len(names)) % shots != 0
    link = fit_linear_link(stored[train], judge[train])
    held_out = (~train).nonzero().flatten()
    gallery = Gallery(identity, [f"p{i}" for i in range(people)])
    out = predict(link, stored[held_out], CPU)
    assert torch.allclose(out.norm(dim=1), torch.ones(len(out)))
    assert rank1(out, [names[i] for i in held_out], gallery, metric="cosine") >= 0.9 > gallery.chance * 3
    noise = torch.randn_like(stored)  # and it finds nothing where there is nothing
    blind = fit_linear_link(noise[train], judge[train])
    assert rank1(predict(blind, noise[held_out], CPU), [names[i] for i in held_out], gallery, metric="cosine") <= 0.35
