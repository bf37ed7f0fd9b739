"""Face preparation: pass-through for aligned crops, MTCNN for raw photos, LFW layout and pairs."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from plugin_service.bundle import sample_faces_path
from plugin_service.faces import (
    NoFaceFound,
    align,
    load_face,
    load_face_folder,
    read_pairs,
    split_identities,
)

PHOTOS = Path(__file__).resolve().parents[1] / "samples" / "photos"


def test_aligned_faces_pass_through() -> None:
    path = next(sample_faces_path().rglob("*.jpg"))
    face = load_face(path)
    assert face.shape == (3, 160, 160)
    with Image.open(path) as im:
        assert abs(float(face[0, 0, 0]) - im.convert("RGB").getpixel((0, 0))[0] / 255) < 1e-6


@pytest.mark.parametrize("photo", sorted(PHOTOS.glob("*.jpg")), ids=lambda p: p.name)
def test_mtcnn_aligns_a_raw_photo(photo: Path) -> None:
    with Image.open(photo) as im:
        assert im.size != (160, 160)
    face = load_face(photo)
    assert face.shape == (3, 160, 160)
    assert 0 <= face.min() and face.max() <= 1 and face.std() > 0.05


def test_no_face_is_a_clear_error() -> None:
    with pytest.raises(NoFaceFound, match="no face found in blank.png"):
        align(Image.new("RGB", (300, 240), (128, 128, 128)), name="blank.png")


def test_face_folder_reads_lfw_layout() -> None:
    faces = load_face_folder(sample_faces_path())
    assert len(faces) == 32 and len(faces.identities) == 16
    assert faces.images.shape == (32, 3, 160, 160)
    sub = faces.subset(faces.identities[:3])
    assert len(sub) == 6 and sub.labels.max() == 2


def test_identity_split_is_disjoint_and_deterministic() -> None:
    names = [f"person_{i}" for i in range(100)]
    defender, attacker = split_identities(names)
    assert not set(defender) & set(attacker) and len(defender) + len(attacker) == 100
    assert 30 < len(defender) < 70
    assert split_identities(list(reversed(names))) == (defender, attacker)
    assert split_identities(names[:50])[0] == [n for n in defender if n in names[:50]]


def test_read_pairs(tmp_path: Path) -> None:
    text = "2 1\nA 1 2\nA 1 B 1\nC 3 4\nC 1 D 2\n"
    (tmp_path / "pairs.txt").write_text(text)
    pairs = read_pairs(tmp_path / "pairs.txt", tmp_path)
    assert [p.same for p in pairs] == [True, False, True, False]
    assert [p.fold for p in pairs] == [0, 0, 1, 1]
    assert pairs[1].right == tmp_path / "B" / "B_0001.jpg"
    (tmp_path / "bad.txt").write_text("2 1\nA 1 2\n")
    with pytest.raises(ValueError, match="promises 4 pairs"):
        read_pairs(tmp_path / "bad.txt", tmp_path)
