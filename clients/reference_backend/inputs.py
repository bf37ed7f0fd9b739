"""Request bodies -> clean features z: a face image run through E, or z sent as a .npy.

The backend accepts what a recognition backend already receives: either a photo (JPEG/PNG/...;
160x160 crops pass straight through, other photos are aligned with MTCNN) or features the client
device extracted with E, as a NumPy ``.npy`` of shape (C, H, W) or (N, C, H, W). Neither is kept:
z lives only for the duration of the request.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from plugin_service.faces import NoFaceFound, align
from reference_backend.recognition import Recognition

NPY_TYPE = "application/x-npy"


class BadInput(ValueError):
    """The body is not a face image or features of the bundle's shape; the message says which."""


class UnsupportedType(BadInput):
    """The Content-Type is neither an image nor a .npy."""


def features_from_body(body: bytes, content_type: str, recognition: Recognition) -> np.ndarray:
    """(N, C, H, W) float32 clean features for one request body."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == NPY_TYPE:
        return _npy_features(body, recognition.feature_shape)
    if kind.startswith("image/"):
        return recognition.features(_face(body)[None])
    raise UnsupportedType(f"unsupported Content-Type {content_type!r}: send image/* (a face photo) or {NPY_TYPE} (features z)")


def _face(body: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(body)) as image:
            return align(image, name="the uploaded image")
    except UnidentifiedImageError as e:
        raise BadInput("the body is not an image PIL can read") from e
    except NoFaceFound as e:
        raise BadInput(str(e)) from e


def _npy_features(body: bytes, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadInput(f"the body is not a .npy array ({e})") from e
    if array.dtype.kind != "f" or array.dtype.itemsize not in (2, 4):
        raise BadInput(f"features must be float32 or float16, got {array.dtype}")
    if array.ndim == len(shape):
        array = array[None]
    if tuple(array.shape[1:]) != shape or len(array) == 0:
        raise BadInput(f"features must have shape {list(shape)} or [N, {', '.join(map(str, shape))}], "
                       f"got {list(array.shape)}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise BadInput("features contain NaN or infinite values")
    return array
