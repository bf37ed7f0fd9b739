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
                          width=8, embedding_dim=16, epochs=10, batch_size=8, lr=3e-3,
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
    longer = DistillTraining(**{**cfg.__dict__, "epochs": 11})
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


def test_impossible_stage_flags_exit_2_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from plugin_service.cli import main

    code = main(["train-recognizer", "--teacher", "dlib", "--data", str(tmp_path / "absent"),
                 "--out", str(tmp_path / "r.safetensors"), "--restarts", "1", "--average-stages", "3"])
    assert code == 2
    assert "--average-stages must be between 1 and --restarts + 1 (2)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


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

    stage1, stage2 = tmp_path / "one-stage1.safetensors", tmp_path / "one-stage2.safetensors"
    for mine, chained in ((stage1, first.out), (stage2, second.out), (one.out, second.out)):
        assert _same(mine, chained), mine.name
    assert not _same(stage1, stage2)  # the restart trained
    # a rerun after losing the last stage skips the finished first stage and redoes the same restart
    stage2.unlink()
    Path(str(stage2) + ".ckpt").unlink()
    one.out.unlink()
    with caplog.at_level("INFO", logger="plugin_service.training.distill"):
        distill_recognizer(one, teacher=teacher, teacher_name="fake")
    assert "stage 1/2: " in caplog.text and "not trained again" in caplog.text
    assert _same(one.out, second.out)
    # averaging the two stages, and measuring BatchNorm again, reuses both stage files (nothing trains)
    averaged = DistillTraining(**{**one.__dict__, "average_stages": 2, "bn_faces": 16})
    distill_recognizer(averaged, teacher=teacher, teacher_name="fake")
    a, b, mean = _weights(stage1), _weights(stage2), _weights(one.out)
    conv = next(k for k in mean if k.endswith("weight") and mean[k].dim() == 4)
    assert torch.allclose(mean[conv], (a[conv] + b[conv]) / 2)
    assert not torch.equal(mean[conv], b[conv])
    for bad in ({"restarts": -1}, {"restarts": 1, "average_stages": 3}, {"bn_faces": -1}):
        with pytest.raises(ValueError, match="--restarts|--average-stages"):
            DistillTraining(**{**base.__dict__, **bad}).validate()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_recognizer(path).state_dict()


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_batch_norm_recalibration_measures_the_mean_of_un_augmented_faces() -> None:
    from plugin_service.models.recognizer import Recognizer, RecognizerSpec
    from plugin_service.training.stage_average import recalibrate_batch_norm

    torch.manual_seed(0)
    model = Recognizer(RecognizerSpec(arch="light", width=8, embedding_dim=16))
    faces = load_face_folders(sample_faces_path())
    first = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first.running_mean.fill_(100.0)  # stale statistics
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].detach()))
    recalibrate_batch_norm(model, faces, count=len(faces), batch_size=len(faces), seed=0, device=torch.device("cpu"))
    hook.remove()
    assert len(seen) == 1 and not model.training and not first.training
    assert torch.allclose(first.running_mean, seen[0].mean(dim=(0, 2, 3)), atol=1e-5)
    assert first.momentum == 0.1


class _Interrupted(Exception):
    pass


@pytest.mark.slow  # trains two small students
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming restores every RNG the epochs draw from, dropout's global one included: bit-identical weights."""
    from plugin_service.checkpoint import Checkpointer

    base = DistillTraining(data=(sample_faces_path(),), out=tmp_path / "straight.safetensors", width=8,
                           embedding_dim=16, epochs=3, batch_size=8, lr=1e-2, warmup_steps=1,
                           cache_dir=tmp_path / "cache", device="cpu")
    distill_recognizer(base, teacher=teacher, teacher_name="fake")
    cut = DistillTraining(**{**base.__dict__, "out": tmp_path / "cut.safetensors"})
    save = Checkpointer.save

    def save_then_stop(self: Checkpointer, epoch: int, *args: object, **kwargs: object) -> None:
        save(self, epoch, *args, **kwargs)
        if epoch == 0:
            raise _Interrupted

    with monkeypatch.context() as m:
        m.setattr(Checkpointer, "save", save_then_stop)
        with pytest.raises(_Interrupted):
            distill_recognizer(cut, teacher=teacher, teacher_name="fake")
    torch.manual_seed(1234)  # whatever the process drew in between must not matter
    distill_recognizer(cut, teacher=teacher, teacher_name="fake")
    assert _same(base.out, cut.out)
