"""Streaming batch enrollment: faces or features in, protected features written as shards + index.

Output layout (``--out DIR``)::

    shards/batch-000001.npz   features (N, 64, 77, 77), ids (N,), shadow_loss_before/after, perturbation_norm
    index.jsonl               one line per finished shard: {"shard", "ids", "model_version", ...}
    failed.jsonl              one line per input that could not be enrolled, with the reason

A shard is written to a temporary name and renamed before its index line is appended and
flushed to disk, so a run killed at any point leaves only whole shards in the index. A rerun
reads the index, skips every id it lists, and enrolls the rest: every face ends up enrolled
exactly once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from advface_client.client import GuardClient
from plugin_service.faces import NoFaceFound, list_images, load_face
from plugin_service.models.extractor import Extractor
from advface.codec import Options, Result

log = logging.getLogger(__name__)


@dataclass
class EnrollSummary:
    enrolled: int = 0
    skipped: int = 0  # already enrolled by an earlier run
    failed: int = 0
    seconds: float = 0.0
    gains: list[float] = field(default_factory=list)

    @property
    def faces_per_second(self) -> float:
        return self.enrolled / self.seconds if self.seconds else 0.0

    @property
    def median_gain(self) -> float:
        return float(np.median(self.gains)) if self.gains else float("nan")


class EnrollmentStore:
    """The output directory: what is already enrolled, and atomic writes of new shards."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.shards = self.out / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.index = self.out / "index.jsonl"
        self.failed_log = self.out / "failed.jsonl"
        self._drop_orphans()

    def _drop_orphans(self) -> None:
        """Removes shards a killed run wrote but never indexed; their faces are enrolled again."""
        listed = set()
        if self.index.exists():
            listed = {json.loads(line)["shard"] for line in self.index.read_text().splitlines() if line.strip()}
        for path in self.shards.iterdir():
            if path.name not in listed:
                path.unlink()

    def enrolled_ids(self) -> set[str]:
        done: set[str] = set()
        if self.index.exists():
            for line in self.index.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    if (self.shards / entry["shard"]).exists():
                        done.update(entry["ids"])
        return done

    def next_shard_number(self) -> int:
        numbers = [int(p.stem.split("-")[1]) for p in self.shards.glob("batch-*.npz")]
        return max(numbers, default=0) + 1

    def write(self, number: int, ids: list[str], result: Result) -> None:
        assert result.features is not None
        name = f"batch-{number:06d}.npz"
        tmp = self.shards / f".{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, features=result.features, ids=np.array(ids),
                     shadow_loss_before=np.array([s.shadow_loss_before for s in result.stats], np.float32),
                     shadow_loss_after=np.array([s.shadow_loss_after for s in result.stats], np.float32),
                     perturbation_norm=np.array([s.perturbation_norm for s in result.stats], np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.shards / name)
        self._append(self.index, {"shard": name, "batch_id": result.batch_id, "ids": ids,
                                  "model_version": result.model_version})

    def record_failure(self, item_id: str, reason: str) -> None:
        self._append(self.failed_log, {"id": item_id, "reason": reason})

    @staticmethod
    def _append(path: Path, entry: dict) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _feature_items(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(id, feature) from a .npy of shape (N, C, H, W); ids are ``<file stem>:<row>``."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim != 4:
        raise ValueError(f"{path}: expected features of shape (N, C, H, W), got {array.shape}")
    for i in range(len(array)):
        yield f"{path.stem}:{i}", np.asarray(array[i])


def _image_ids(root: Path) -> list[tuple[str, Path]]:
    files = list_images(root)
    base = root if root.is_dir() else root.parent
    return [(str(p.relative_to(base).with_suffix("")), p) for p in files]


def _batches(root: Path, extractor: Extractor | None, done: set[str], batch_size: int, dtype: np.dtype,
             store: EnrollmentStore, summary: EnrollSummary) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields (ids, features) batches of not-yet-enrolled inputs, extracting E client-side for images."""
    ids: list[str] = []
    items: list[np.ndarray] = []

    def flush() -> tuple[list[str], np.ndarray]:
        if extractor is None:
            feats = np.stack(items)
        else:
            with torch.no_grad():
                feats = extractor(torch.stack([torch.from_numpy(x) for x in items])).numpy()
        return ids, feats.astype(dtype)

    if root.suffix == ".npy":
        source: Iterator[tuple[str, np.ndarray | Path]] = _feature_items(root)
    else:
        source = iter(_image_ids(root))
    for item_id, item in source:
        if item_id in done:
            summary.skipped += 1
            continue
        if isinstance(item, Path):
            try:
                item = load_face(item).numpy()
            except (NoFaceFound, OSError, ValueError) as e:
                summary.failed += 1
                store.record_failure(item_id, str(e))
                log.warning("skipping %s: %s", item_id, e)
                continue
        ids.append(item_id)
        items.append(item)
        if len(ids) == batch_size:
            yield flush()
            ids, items = [], []
    if ids:
        yield flush()


def enroll(client: GuardClient, source: Path, out: Path, extractor: Extractor | None, batch_size: int = 32,
           options: Options = Options(), wire_dtype: str = "float32", window: int = 4,
           progress: bool = True) -> EnrollSummary:
    """Enrolls every input under ``source`` not already in ``out``; resumable at any point."""
    store = EnrollmentStore(out)
    done = store.enrolled_ids()
    summary = EnrollSummary()
    number = store.next_shard_number()
    batch_ids: dict[str, list[str]] = {}

    def requests() -> Iterator[tuple[str, np.ndarray]]:
        batches = _batches(source, extractor, done, batch_size, np.dtype(wire_dtype), store, summary)
        for k, (ids, features) in enumerate(batches, start=number):
            bid = f"batch-{k:06d}"
            batch_ids[bid] = ids
            yield bid, features

    start = time.perf_counter()
    bar = tqdm(unit="face", desc="enrolling", disable=not progress, dynamic_ncols=True)
    for result in client.protect_stream(requests(), options, window=window):
        ids = batch_ids.pop(result.batch_id)
        if result.error is not None:
            summary.failed += len(ids)
            for item_id in ids:
                store.record_failure(item_id, f"{result.error.code.name}: {result.error.detail}")
            log.error("batch %s rejected: %s", result.batch_id, result.error)
            continue
        store.write(number, ids, result)
        number += 1
        summary.enrolled += len(ids)
        summary.gains.extend(s.shadow_loss_after / s.shadow_loss_before for s in result.stats if s.shadow_loss_before > 0)
        bar.update(len(ids))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary
