"""Verification accuracy and mean privacy gain of AdvFace, storing each face's last PGD state or its best one.

Why a script: `--keep-best` changes what the backend stores, so before it can be recommended its
cost in recognition must be seen next to its gain. This protects the faces of a pairs file through
the serving engine (float32, channels-last, batches in a seeded identity-mixed order, as a server
batches them), once per rule, embeds the stored features with the bundle's R and prints 10-fold
accuracy and TAR@FAR 1e-2, both sides protected and stored against a clean probe. It prints
measured numbers only.

    .venv/bin/python benchmarks/keep_best_pairs.py --faces ../shared/data/celeba160/dev \
        --pairs ../shared/data/celeba160/dev_pairs.txt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from plugin_service.bundle import load_bundle
from plugin_service.engine import Engine
from plugin_service.engine_settings import EngineSettings
from plugin_service.pairs import EvalFaces, load_eval_faces
from plugin_service.verification import pair_scores, tar_at_far, verify


def _summary(left: torch.Tensor, right: torch.Tensor, faces: EvalFaces) -> str:
    result = verify(left, right, faces.pairs)
    tar = tar_at_far(pair_scores(left, right, faces.pairs), faces.pairs.same, 1e-2)
    return f"{100 * result.accuracy:.2f} ± {100 * result.std:.2f} %, TAR@1e-2 {100 * tar:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=Path, required=True, help="LFW-layout face folder of the pairs")
    parser.add_argument("--pairs", type=Path, required=True, help="LFW-format pairs file over --faces")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the embedded one)")
    parser.add_argument("--batch-size", type=int, default=16, help="faces per protected batch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch order")
    args = parser.parse_args()

    faces = load_eval_faces(args.faces, args.pairs)
    bundle = load_bundle(args.bundle)
    head = bundle.require_recognizer("embedding the stored features")[0].eval()
    order = torch.randperm(len(faces), generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        z = torch.cat([bundle.extractor(faces.images[i:i + 64].float() / 255) for i in range(0, len(faces), 64)])
        clean = torch.cat([head.embed_features(z[i:i + 64]) for i in range(0, len(faces), 64)])
    print(f"{len(faces)} faces, {len(faces.pairs)} pairs, bundle {bundle.version}")
    print(f"clean features: {_summary(clean, clean, faces)}")
    for rule, settings in (("last state", EngineSettings(channels_last=True)),
                           ("best state (--keep-best)", EngineSettings(channels_last=True, keep_best=True))):
        engine = Engine(load_bundle(args.bundle), "cpu", settings=settings)
        stored, gains, start = torch.empty_like(z), [], time.perf_counter()
        for k in range(0, len(faces), args.batch_size):
            idx = order[k:k + args.batch_size]
            result = engine.protect(z[idx].numpy())
            stored[idx] = torch.from_numpy(result.features)
            gains.append(result.shadow_loss_after / result.shadow_loss_before)
        with torch.no_grad():
            embedded = torch.cat([head.embed_features(stored[i:i + 64]) for i in range(0, len(faces), 64)])
        print(f"{rule}: mean privacy gain {np.mean(np.concatenate(gains)):.4f} ({time.perf_counter() - start:.0f} s); "
              f"both sides protected {_summary(embedded, embedded, faces)}; "
              f"stored vs clean probe {_summary(embedded, clean, faces)}", flush=True)


if __name__ == "__main__":
    main()
