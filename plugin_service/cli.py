"""`advface`: the operator's command line (serve, train, evaluate, inspect models)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from plugin_service.enroll_cli import add_enroll_parser
from plugin_service.evaluation.cli_args import (
    add_evaluate_parser,
    add_finetune_head_parser,
)
from plugin_service.evaluation.shadow_check_settings import ShadowCheckSettings
from plugin_service.names import DEFAULT_SPLIT, SHADOW_ARCHITECTURES
from plugin_service.settings_cli import add_arguments, flag_fields, from_args
from plugin_service.training.recognizer_settings import DistillTraining, RecognizerTraining
from plugin_service.training.shadow_settings import ShadowTraining

# Third-party modules the base install (the client) lacks -> the extra that brings them.
EXTRA_OF_MODULE = {"torch": "serve", "torchvision": "serve", "facenet_pytorch": "serve", "safetensors": "serve",
                   "PIL": "serve", "prometheus_client": "serve", "grpc_reflection": "serve", "tqdm": "serve",
                   "torchmetrics": "train", "matplotlib": "eval"}
Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def _cmd_train_recognizer(args: argparse.Namespace) -> int:
    if args.teacher:
        from plugin_service.training.distill import distill_recognizer

        try:
            cfg = from_args(args, DistillTraining).validate()
        except ValueError as e:
            print(f"advface train-recognizer: {e}", file=sys.stderr)
            return 2
        distill_recognizer(cfg)
    else:
        from plugin_service.training.recognizer import train_recognizer

        if len(args.data) != 1:
            raise SystemExit("advface train-recognizer: several --data folders need --teacher (labels are per folder)")
        train_recognizer(from_args(args, RecognizerTraining))
    print(f"wrote {args.out}")
    return 0


def _add_train_recognizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-recognizer", help="train E + the server-side recogniser R (distilled or from labels)",
                       description="Train facenet-pytorch's E and the recogniser after the split, R. With --teacher, "
                       "distil: R(E(x)) learns the teacher's embedding of x (cosine loss, AdamW, warm-up + cosine "
                       "schedule, flip/scale/shift/rotation/colour augmentation; teacher embeddings cached on disk). "
                       "Without it, classify identities (cross-entropy, Adam, x0.94 per epoch). Resumes from OUT.ckpt.")
    add_arguments(p, RecognizerTraining)
    # Distillation's own flags; --teacher is unset unless given, since giving it is what chooses distillation.
    add_arguments(p, DistillTraining, skip={f.name for f in flag_fields(RecognizerTraining)}, unset=("teacher",))
    p.set_defaults(func=_cmd_train_recognizer)


def _cmd_train_shadow(args: argparse.Namespace) -> int:
    from plugin_service.training.shadow import train_shadow

    cfg = from_args(args, ShadowTraining, command=shlex.join(["advface", *args.argv]))
    content_hash = train_shadow(cfg)
    print(f"wrote bundle {cfg.out} (version {content_hash[:12]})")
    return 0


def _add_train_shadow(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-shadow", help="train a shadow model S and write a model bundle",
                       description="Train S with L1 loss |x - S(E(x))| (Adam) on a face folder and write a bundle "
                       "(E + S as safetensors, manifest, content hash). Resumes from OUT.ckpt if present.")
    add_arguments(p, ShadowTraining)
    p.set_defaults(func=_cmd_train_shadow)


def _cmd_bundle_add_recognizer(args: argparse.Namespace) -> int:
    from plugin_service.training.bundle_recognizer import add_recognizer

    content_hash = add_recognizer(args.bundle, args.recognizer, args.data, args.out, args.limit_per_identity, args.device)
    print(f"wrote bundle {args.out or args.bundle} (version {content_hash[:12]})")
    return 0


def _add_bundle_add_recognizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bundle-add-recognizer", help="add R (for the resynth protector) to a bundle",
                       description="Copy the recogniser after the split, R, into a bundle, with resynth's public "
                       "starting feature (the mean of E over --data) and the largest feature value the service "
                       "accepts (4x the largest E gave on --data). The recogniser's E must be the bundle's E.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory to extend")
    p.add_argument("--recognizer", type=Path, required=True, help="recogniser .safetensors whose E is the bundle's")
    p.add_argument("--data", type=Path, required=True, nargs="+", help="public faces (LFW layout) for the start feature")
    p.add_argument("--out", type=Path, help="write here instead of rewriting --bundle")
    p.add_argument("--limit-per-identity", type=int, help="at most this many faces per identity")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_bundle_add_recognizer)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from plugin_service.config import settings_from_args
    from plugin_service.engine_settings import engine_settings_from_args
    from plugin_service.runtime import pick_device
    from plugin_service.server.app import serve

    try:
        settings = settings_from_args(args)
        engine_settings = engine_settings_from_args(args)
        pick_device(settings.device)  # a bad --device fails here, before a port is opened or a model loaded
    except (ValueError, RuntimeError) as e:
        print(f"advface serve: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    asyncio.run(serve(settings, engine_settings))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from plugin_service.config import add_settings_arguments

    p = sub.add_parser("serve", help="run the gRPC plug-in service",
                       description="Serve AdvFace over gRPC (advface.v1.AdvFaceGuard, grpc.health.v1, reflection) "
                       "with Prometheus metrics. Every flag can also be set by the environment variable shown.")
    from plugin_service.engine_settings import add_engine_arguments

    add_settings_arguments(p)
    add_engine_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_demo(args: argparse.Namespace) -> int:
    import os

    from advface_client.connection import tls_from_args, token_from_args

    from plugin_service.demo import run_demo

    server_args: list[str] = []
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens"):
        if getattr(args, name) is not None:
            server_args += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    try:
        tls, token = tls_from_args(args), token_from_args(args)
    except (OSError, ValueError) as e:
        print(f"advface demo: {e}", file=sys.stderr)
        return 2
    if (args.tls_cert or os.environ.get("ADVFACE_TLS_CERT")) and tls is None:
        print("advface demo: the server will use TLS; give the client --ca-cert (and --server-name if the certificate "
              "does not name 127.0.0.1)", file=sys.stderr)
        return 2
    if (args.auth_tokens or os.environ.get("ADVFACE_AUTH_TOKENS")) and token is None:
        print("advface demo: the server will require a bearer token; give the client --token-file or ADVFACE_TOKEN",
              file=sys.stderr)
        return 2
    return run_demo(args.faces, args.out, args.batch_size, args.bundle, tuple(server_args), tls, token, args.timeout)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from advface_client.connection import connection_parser

    p = sub.add_parser("demo", help="start the service, stream an enrollment of the sample faces through it, stop",
                       description="End-to-end demo on the embedded bundle and sample faces: starts `advface serve`, "
                       "enrolls the faces through the client library, prints faces/s, the privacy gain and metrics, "
                       "then stops the server with SIGTERM. The --tls-* and --auth-tokens flags (or their ADVFACE_* "
                       "variables) secure the server; the connection flags make the client match.",
                       parents=[connection_parser(with_defaults=True, with_target=False)])
    p.add_argument("--faces", type=Path, help="faces to enroll (default: the embedded sample faces)")
    p.add_argument("--out", type=Path, help="enrollment output directory (default: a new temporary directory)")
    p.add_argument("--bundle", type=Path, help="bundle to serve (default: the embedded bundle)")
    p.add_argument("--batch-size", type=int, default=16)
    server = p.add_argument_group("server security (passed to `advface serve`)")
    server.add_argument("--tls-cert", type=Path, help="PEM certificate chain for the server's TLS")
    server.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    server.add_argument("--tls-client-ca", type=Path, help="CA of client certificates (mutual TLS)")
    server.add_argument("--auth-tokens", type=Path, help="the server's bearer token file")
    p.set_defaults(func=_cmd_demo)


def _cmd_models(args: argparse.Namespace) -> int:
    from plugin_service.models.extractor import Extractor
    from plugin_service.models.recognizer import LightHead
    from plugin_service.models.shadow import (
        ShadowSpec,
        build_shadow,
        count_parameters,
        flops_per_face,
    )

    extractor = Extractor(args.split)
    shape = extractor.feature_shape()
    rows = [("E (client extractor)", extractor, (3, 160, 160)),
            (f"light recogniser head (width {args.head_width})", LightHead(shape[0], args.head_width, 128), shape)]
    for arch in SHADOW_ARCHITECTURES:
        try:
            rows.append((f"{arch} (width {args.width}, depth {args.depth})",
                         build_shadow(ShadowSpec(arch, args.width, args.depth, shape[0], shape[1])), shape))
        except ValueError as e:
            print(f"{arch}: {e}")
    print(f"split {args.split}: features {list(shape)} per face")
    print(f"{'network':44s} {'parameters':>12s} {'GFLOPs/face':>12s}")
    for name, model, input_shape in rows:
        print(f"{name:44s} {count_parameters(model):12,d} {flops_per_face(model, input_shape) / 1e9:12.3f}")
    return 0


def _cmd_judge_pairs(args: argparse.Namespace) -> int:
    from plugin_service.judge import EmbeddingCache, JudgeNotInstalled, load_judge
    from plugin_service.judge.pairs_report import format_report, judge_pairs_report
    from plugin_service.runtime import judge_cache_dir

    try:
        judge = load_judge()
    except JudgeNotInstalled as exc:
        print(f"advface judge-pairs: {exc}", file=sys.stderr)
        return 2
    cache = EmbeddingCache(args.judge_cache_dir or judge_cache_dir(), judge.name)
    print(f"{judge.name} on {args.pairs}: " + format_report(judge_pairs_report(judge, cache, args.data, args.pairs,
                                                                              args.pairs_per_fold)))
    return 0


def _add_judge_pairs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge-pairs", help="the dlib judge/teacher's own verification numbers on a pairs file",
                       description="10-fold accuracy, fold spread and TAR@FAR of the dlib judge (the distillation "
                       "teacher) on an LFW-format pairs file, scored like every recogniser here, plus its accuracy "
                       "at dlib's fixed 0.6 distance. Embeddings are cached by pixel hash.")
    p.add_argument("--data", type=Path, required=True, help="LFW-layout face folder the pairs refer to")
    p.add_argument("--pairs", type=Path, required=True, help="LFW-format pairs.txt over --data")
    p.add_argument("--pairs-per-fold", type=int, help="only this many matched and mismatched pairs per fold")
    p.add_argument("--judge-cache-dir", type=Path, help="embedding cache (default: ~/.cache/advface/judge)")
    p.set_defaults(func=_cmd_judge_pairs)


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="print parameters and FLOPs per face of E, the head and each shadow architecture")
    p.add_argument("--width", type=int, default=16, help="shadow width (default: %(default)s)")
    p.add_argument("--depth", type=int, default=2, help="shadow depth (default: %(default)s)")
    p.add_argument("--head-width", type=int, default=32, help="light recogniser head width (default: %(default)s)")
    p.add_argument("--split", default=DEFAULT_SPLIT)
    p.set_defaults(func=_cmd_models)


def _cmd_bench(args: argparse.Namespace) -> int:
    from plugin_service.benchmark import bench_engine, bench_service, profile_step
    from plugin_service.engine_settings import engine_settings_from_args

    if args.torch_threads > 0:
        torch_threads(args.torch_threads)
    settings = engine_settings_from_args(args)
    if args.profile:
        profile_step(args.bundle, args.device, args.batch_sizes, settings)
        return 0
    bench = bench_engine(args.bundle, args.device, args.batch_sizes, args.repeats, args.steps, settings,
                         args.protectors, args.json, args.faces)
    if args.service_batches:
        bench_service(bench, args.batch_sizes[-1], args.service_batches, args.service_streams)
    return 0


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from plugin_service.engine_settings import add_engine_arguments

    p = sub.add_parser("bench", help="measure engine and service throughput on this machine",
                       description="Runs the eager reference engine and the optimised one (the speed-up flags below) "
                       "alternately on the same batches of real sample-face features and prints, per protector and "
                       "batch size: faces/s, batch latency percentiles, peak RSS, FLOPs per face, GFLOP/s against a "
                       "matmul peak measured in the same run, the speed-up and the largest output differences; then "
                       "(optionally) the whole service over gRPC on loopback. Prints measured numbers only.")
    p.add_argument("--bundle", type=Path, help="bundle to benchmark (default: the embedded bundle)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--faces", type=Path, help="LFW-layout face folder whose features are protected, e.g. the dev "
                   "faces (default: the embedded sample faces, tiled to the batch size)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="faces per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size")
    p.add_argument("--steps", type=int, help="PGD steps (default: the bundle's)")
    p.add_argument("--service-batches", type=int, default=4,
                   help="batches (of the largest size) per stream through a local server; 0 skips it")
    p.add_argument("--service-streams", type=int, default=1, help="concurrent streams to the local server")
    p.add_argument("--protectors", nargs="+", default=["advface"], choices=("advface", "resynth", "random", "dp"),
                   help="protectors to measure (default: advface)")
    p.add_argument("--torch-threads", type=int, default=0, help="CPU threads for PyTorch (0: its default)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--profile", action="store_true",
                   help="instead: profile one eager PGD step per engine and batch size (torch.profiler, page faults)")
    add_engine_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_shadow_check(args: argparse.Namespace) -> int:
    from plugin_service.bundle import default_recognizer_path
    from plugin_service.evaluation.shadow_check import format_table, shadow_check
    from plugin_service.models.recognizer import load_recognizer
    from plugin_service.runtime import pick_device

    cfg = from_args(args, ShadowCheckSettings)
    recognizer = load_recognizer(cfg.recognizer or default_recognizer_path()).to(pick_device(cfg.device)).eval()
    rows = [shadow_check(cfg.data, cfg.pairs, bundle, recognizer, cfg.pairs_per_fold, cfg.batch_size, cfg.device,
                         channels_last=cfg.channels_last)
            for bundle in (cfg.bundle or (None,))]
    print(f"{rows[0].faces} faces of {cfg.pairs}; accuracy = 10-fold verification, the stored side as given, "
          "the probe clean; s/face = AdvFace at the bundle's settings on this machine")
    print(format_table(rows))
    return 0


def _add_shadow_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shadow-check", help="what each bundle's shadow model costs and buys (one row per bundle)",
                       description="Protect the faces a pairs file names with each bundle's AdvFace engine and print, "
                       "per bundle: the shadow's size, CPU seconds per face, verification accuracy with clean, "
                       "E(S(z)) (eps 0: the shadow's round trip alone) and AdvFace features stored, and the shadow's "
                       "reconstruction SSIM from clean and from AdvFace features. Trains nothing.")
    add_arguments(p, ShadowCheckSettings)
    p.set_defaults(func=_cmd_shadow_check)


class _Parser(argparse.ArgumentParser):
    """Reports a bad flag in one line: the usage of `advface serve` alone fills a screen and buries it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="advface", description="AdvFace Guard: adversarial facial features as a gRPC plug-in.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_serve, _add_bench, _add_models, _add_train_recognizer, _add_train_shadow,
                _add_bundle_add_recognizer, _add_shadow_check, _add_judge_pairs, add_enroll_parser,
                add_evaluate_parser, add_finetune_head_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that spin while they wait stall one another when other processes share the cores:
    # PGD ran 6x slower on 2 shared cores (README, Performance on CPU). Read once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"advface {args.command}: {e.name} is not installed; pip install 'advface-guard[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
