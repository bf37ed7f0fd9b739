"""`advface enroll`: run E on this machine and stream the features through a running service.

It lives with the service package, not in the torch-free client, because E is a PyTorch model;
the connection flags are the client's own (`advface_client.connection`), so both CLIs connect alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from advface.codec import Options
from advface_client.connection import client_from_args, connection_parser, run_reporting_errors


def load_client_extractor(bundle: Path | None, facenet_weights: Path | None):  # noqa: ANN201 - (Extractor, version)
    """E for the client: the user's FaceNet weights, else the bundle's (default: the embedded one)."""
    from plugin_service.bundle import load_bundle
    from plugin_service.training.shadow import load_extractor

    if facenet_weights is not None:
        return load_extractor(facenet_weights), None
    bundle_obj = load_bundle(bundle)
    return bundle_obj.extractor, bundle_obj.version


def _enroll(args: argparse.Namespace) -> int:
    from plugin_service.enroll import enroll

    with client_from_args(args) as client:
        info = client.info()
        extractor, local_version = (None, None) if args.input.suffix == ".npy" else load_client_extractor(
            args.bundle, args.facenet_weights)
        if local_version is not None and local_version != info.model_version:
            print(f"advface enroll: the server serves bundle {info.model_version} but the local extractor comes from "
                  f"bundle {local_version}; pass the server's bundle with --bundle", file=sys.stderr)
            return 2
        options = Options(args.protector or "", args.steps or 0, args.eps)
        summary = enroll(client, args.input, args.out, extractor, args.batch_size, options, args.wire_dtype,
                         progress=not args.no_progress)
    print(f"enrolled {summary.enrolled} faces in {summary.seconds:.1f}s ({summary.faces_per_second:.2f} faces/s) "
          f"with bundle {info.model_version} on {info.device}; skipped {summary.skipped} already enrolled; "
          f"{summary.failed} failed")
    if summary.gains:
        print(f"privacy gain: median shadow-loss after/before = {summary.median_gain:.3f} over {len(summary.gains)} faces")
    print(f"index: {args.out / 'index.jsonl'}")
    if summary.failed:
        print(f"failures are listed in {args.out / 'failed.jsonl'}", file=sys.stderr)
        return 3
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    return run_reporting_errors("advface enroll", args, _enroll)


def add_enroll_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("enroll", help="stream faces or features through the service and store the protected features",
                       description="Reads face images (raw photos are aligned with MTCNN; 160x160 crops pass through) "
                       "or pre-extracted features (.npy of shape N,C,H,W), runs E client-side, streams batches "
                       "and writes the adversarial features as .npz shards with index.jsonl. Rerun with the same "
                       "--out to resume: finished batches are kept and skipped.", parents=[connection_parser(with_defaults=True)])
    p.add_argument("--input", type=Path, required=True, help="image folder (searched recursively), one image, or FILE.npy")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards, index.jsonl, failed.jsonl")
    p.add_argument("--bundle", type=Path, help="bundle whose E extracts features (default: the embedded bundle, "
                   "which must be the one the server serves)")
    p.add_argument("--facenet-weights", type=Path, help="extract with your own FaceNet weights instead of a bundle's E")
    p.add_argument("--batch-size", type=int, default=32, help="faces per batch; they share BatchNorm statistics on "
                   "the server (default: %(default)s)")
    p.add_argument("--wire-dtype", choices=("float32", "float16"), default="float32",
                   help="feature dtype on the wire and in the shards (default: %(default)s)")
    p.add_argument("--protector", help="protector to ask for (default: the server's)")
    p.add_argument("--steps", type=int, help="PGD steps to ask for (within the server's policy)")
    p.add_argument("--eps", type=float, help="perturbation bound to ask for (within the server's policy)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_enroll)
