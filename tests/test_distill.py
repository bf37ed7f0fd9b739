"""Distillation of E + R from a teacher: it learns, it resumes, and a missing teacher is named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from plugin_service.bundle import sample_faces_path
from plugin_service.faces import load_face_folders
from plugin_service.judge import JudgeNotInstalled, dlib_resnet
from plugin_service.models.recognizer import embed_images, load_recognizer
from plugin_service.training.distill import DistillTraining, build_teacher, distill_recognizer

PROJECTION = torch.randn(3 * 20 * 20, 16, generator=torch.Generator().manual_seed(0))


def teacher(faces: torch.Tensor) -> torch.Tensor:
    """A cheap deterministic 'recogniser' of the image: a fixed projection of an 8x downsample."""
    return torch.nn.functional.avg_pool2d(faces.float() / 255, 8).flatten(1) @ PROJECTION


def _distance(model: torch.nn.Module, faces: torch.Tensor) -> float:
    """Mean 1 - cos to the centred teacher embeddings, the distillation target."""
    student = embed_images(model.eval(), faces, torch.device("cpu"))
    target = teacher(faces)
    target = target - target.mean(dim=0, keepdim=True)
    return float((1 - torch.nn.functional.cosine_similarity(student, target, dim=1)).mean())


@pytest.mark.slow  # trains a student
def test_distillation_lowers_student_teacher_distance_and_resumes(tmp_path: Path) -> None:
    cfg = DistillTraining(data=(sample_faces_path(),), out=tmp_path / "s.safetensors",
                          width=8, embedding_dim=16, epochs=6, batch_size=8, lr=1e-2,
                          warmup_steps=1, cache_dir=tmp_path / "cache", device="cpu")
    faces = load_face_folders(cfg.data).images
    torch.manual_seed(0)
    from plugin_service.models.recognizer import Recognizer

    before = _distance(Recognizer(cfg.spec), faces)
    model, _ = distill_recognizer(cfg, teacher=teacher, teacher_name="fake")
    after = _distance(model, faces)
    assert after < before - 0.15, (before, after)
    saved = load_recognizer(cfg.out).eval()
    assert torch.allclose(embed_images(saved, faces[:4], torch.device("cpu")),
                          embed_images(model, faces[:4], torch.device("cpu")), atol=1e-5)
    # a rerun with more epochs resumes from the checkpoint instead of starting over
    longer = DistillTraining(**{**cfg.__dict__, "epochs": 7})
    resumed, _ = distill_recognizer(longer, teacher=teacher, teacher_name="fake")
    assert _distance(resumed, faces) < before - 0.15
    # --init starts a new run from the finished weights, not from scratch
    warm = DistillTraining(**{**cfg.__dict__, "out": tmp_path / "warm.safetensors", "init": cfg.out, "epochs": 1,
                              "lr": 1e-5})
    restarted, _ = distill_recognizer(warm, teacher=teacher, teacher_name="fake")
    assert _distance(restarted, faces) < before - 0.15
    with pytest.raises(ValueError, match="--init"):
        distill_recognizer(DistillTraining(**{**warm.__dict__, "width": 16}), teacher=teacher, teacher_name="fake")


def test_unknown_or_missing_teacher_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("vgg")
    dlib_resnet._import_dlib.cache_clear()
    monkeypatch.setitem(sys.modules, "dlib", None)
    try:
        with pytest.raises(JudgeNotInstalled, match="dlib-bin"):
            build_teacher("dlib")
    finally:
        dlib_resnet._import_dlib.cache_clear()


@pytest.mark.slow  # trains three small students
def test_warm_restarts_in_one_command_equal_the_chained_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = DistillTraining(data=(sample_faces_path(),), out=tmp_path / "one.safetensors", width=8, embedding_dim=16,
                           epochs=2, batch_size=8, lr=1e-2, warmup_steps=1, cache_dir=tmp_path / "cache",
                           device="cpu")
    one = DistillTraining(**{**base.__dict__, "restarts": 1, "restart_epochs": 1, "restart_lr": 5e-3})
    distill_recognizer(one, teacher=teacher, teacher_name="fake")
    first = DistillTraining(**{**base.__dict__, "out": tmp_path / "first.safetensors"})
    distill_recognizer(first, teacher=teacher, teacher_name="fake")
    second = DistillTraining(**{**base.__dict__, "out": tmp_path / "second.safetensors", "init": first.out,
                                "epochs": 1, "lr": 5e-3})
    distill_recognizer(second, teacher=teacher, teacher_name="fake")

    def weights(path: Path) -> dict[str, torch.Tensor]:
        return load_recognizer(path).state_dict()

    stage1 = tmp_path / "one-stage1.safetensors"
    for mine, chained in ((stage1, first.out), (one.out, second.out)):
        a, b = weights(mine), weights(chained)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), mine.name
    assert not all(torch.equal(v, weights(stage1)[k]) for k, v in weights(one.out).items())  # the restart trained
    # a rerun after losing the last stage skips the finished first stage and redoes the same restart
    one.out.unlink()
    Path(str(one.out) + ".ckpt").unlink()
    with caplog.at_level("INFO", logger="plugin_service.training.distill"):
        distill_recognizer(one, teacher=teacher, teacher_name="fake")
    assert "stage 1/2: " in caplog.text and "exists" in caplog.text
    assert all(torch.equal(v, weights(second.out)[k]) for k, v in weights(one.out).items())
    with pytest.raises(ValueError, match="--restarts"):
        _ = DistillTraining(**{**base.__dict__, "restarts": -1}).stages
