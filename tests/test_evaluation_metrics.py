"""Reconstruction metrics, the 10-fold threshold, SRRA and pair handling, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from plugin_service.evaluation.data import pick_examples
from plugin_service.evaluation.scoring import (
    other_image_index,
    replay_attack,
    replay_success_rate,
)
from plugin_service.faces import Pair
from plugin_service.image_metrics import mse, psnr, ssim
from plugin_service.pairs import PairIndex, subsample_pairs
from plugin_service.verification import (
    best_threshold,
    kfold_accuracy,
    pair_scores,
    verify,
)


def _const(value: float, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.full((n, 3, size, size), value)


def test_mse_and_psnr_of_a_constant_offset() -> None:
    original, recon = _const(0.5), _const(0.6)
    # (0.6 - 0.5)^2 = 0.01 per pixel; PSNR = 10 log10(1 / 0.01) = 20 dB.
    assert mse(recon, original) == pytest.approx(torch.tensor([0.01, 0.01]), abs=1e-7)
    assert psnr(recon, original) == pytest.approx(torch.tensor([20.0, 20.0]), abs=1e-4)


def test_metrics_clamp_the_reconstruction_to_the_image_range() -> None:
    # 1.3 is clamped to 1.0: (1.0 - 0.5)^2 = 0.25, PSNR = 10 log10(4) = 6.0206 dB.
    assert mse(_const(1.3), _const(0.5)) == pytest.approx(torch.tensor([0.25, 0.25]))
    assert psnr(_const(1.3), _const(0.5))[0].item() == pytest.approx(10 * math.log10(4), abs=1e-4)


def test_ssim_of_identical_images_is_one_and_of_constant_images_is_the_luminance_term() -> None:
    x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    assert ssim(x, x) == pytest.approx(torch.ones(3), abs=1e-5)
    # Constant images have zero variance, so SSIM reduces to (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    # with C1 = (0.01 * data_range)^2.
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5**2 + 0.6**2 + c1)
    assert ssim(_const(0.6), _const(0.5))[0].item() == pytest.approx(expected, abs=1e-5)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert (ssim(noisy, x) < 0.9).all()


def test_best_threshold_and_tenfold_accuracy_on_a_known_case() -> None:
    # Ten folds, each with a matched pair at 0.9 and a mismatched pair at 0.1: perfectly separable.
    scores = np.tile([0.9, 0.1], 10)
    same = np.tile([True, False], 10)
    folds = np.repeat(np.arange(10), 2)
    result = kfold_accuracy(scores, same, folds)
    assert result.accuracy == 1.0 and result.std == 0.0
    assert result.threshold == pytest.approx(0.5)  # midpoint between the two score levels
    # One matched pair in fold 3 scores 0.05, below every mismatched pair: the threshold picked on
    # the other nine folds (0.5) gets that fold half right, so the mean is (9 * 1 + 0.5) / 10.
    scores[6] = 0.05
    result = kfold_accuracy(scores, same, folds)
    assert result.fold_accuracies[3] == 0.5
    assert result.accuracy == pytest.approx(0.95)
    t, acc = best_threshold(scores, same)
    assert acc == pytest.approx(19 / 20) and 0.1 < t < 0.9


def test_verify_scores_pairs_by_index() -> None:
    # Four faces on two axes: faces 0 and 1 are one person, 2 and 3 another.
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    pairs = PairIndex(left=np.array([0, 2] * 10), right=np.array([1, 0] * 10),
                      same=np.array([True, False] * 10), folds=np.repeat(np.arange(10), 2))
    assert verify(emb, emb, pairs).accuracy == 1.0
    # Left faces are embedded by the first tensor, right faces by the second: with the probe
    # side's identities swapped, matched pairs score low and mismatched ones high, and no single
    # threshold does better than calling every pair one class.
    flipped = emb[[2, 3, 0, 1]]
    scores = pair_scores(emb, flipped, pairs)
    assert scores[0] == pytest.approx(float(torch.nn.functional.cosine_similarity(emb[0], flipped[1], dim=0)))
    assert scores[1] == pytest.approx(float(torch.nn.functional.cosine_similarity(emb[2], flipped[0], dim=0)))
    assert scores[0] < scores[1]
    assert verify(emb, flipped, pairs).accuracy == 0.5


def test_replay_success_rate_counts_cosines_at_or_above_the_threshold() -> None:
    angles = torch.tensor([0.0, 30.0, 75.0, 120.0]) * math.pi / 180
    recon = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # length does not matter
    reference = torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    # cosines 1, 0.866, 0.259, -0.5: two reach 0.5.
    assert replay_success_rate(recon, reference, 0.5) == 0.5
    assert replay_success_rate(recon, reference, 0.9) == 0.25
    assert replay_success_rate(reference[:1], reference[:1], 1.0) == 1.0  # '>=' like the verifier


def test_replay_attack_against_another_image_of_the_identity() -> None:
    names = ["a", "a", "b", "c", "c", "c"]
    assert other_image_index(names).tolist() == [1, 0, -1, 4, 5, 3]
    clean = torch.eye(6)
    recon = clean.clone()  # each reconstruction matches its own original exactly...
    recon[3] = clean[4]  # ...except face 3, which looks like face 4 (its 'other image')
    result = replay_attack(recon, clean, names, threshold=0.5)
    assert result.srra == pytest.approx(5 / 6)
    assert result.n_other == 5  # 'b' has no second image
    assert result.srra_other == pytest.approx(1 / 5)
    assert math.isnan(replay_attack(recon[:1], clean[:1], ["x"], 0.5).srra_other)


def test_subsample_pairs_keeps_both_classes_in_every_fold() -> None:
    pairs = [Pair(f"l{i}", f"r{i}", same, fold) for fold in range(10) for same in (True, False) for i in range(3)]
    kept = subsample_pairs(pairs, 2)
    assert len(kept) == 40
    for fold in range(10):
        assert sum(p.same for p in kept if p.fold == fold) == 2
        assert sum(not p.same for p in kept if p.fold == fold) == 2
    assert subsample_pairs(pairs, None) == pairs


def test_pick_examples_takes_different_identities() -> None:
    names = ["a", "a", "b", "c", "c", "d"]
    picked = pick_examples(names, 3).tolist()
    assert len(picked) == 3 and len({names[i] for i in picked}) == 3
    assert pick_examples(names, 10).tolist() == [0, 2, 3, 5]
    assert pick_examples(names, 0).numel() == 0


def test_tar_at_far_accepts_at_most_the_allowed_impostors() -> None:
    from plugin_service.verification import tar_at_far

    genuine = [0.9, 0.8, 0.7, 0.2]
    impostors = [0.1] * 99 + [0.75]
    scores = np.array(genuine + impostors)
    same = np.array([True] * 4 + [False] * 100)
    assert tar_at_far(scores, same, 1e-2) == 1.0  # one impostor may pass: the 0.75 one
    assert tar_at_far(scores, same, 1e-3) == 0.5  # none may pass: only genuine above 0.75
