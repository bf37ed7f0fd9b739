"""The `evaluate` and `finetune-head` subcommands, for plugin_service/cli.py's ``build_parser``.

Only argparse and pathlib are imported here; torch and the harness load inside the command
functions, so `advface --help` stays fast. Both functions return an exit code: 0 on success, 2
when the inputs are inconsistent (the message names the problem; no traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from plugin_service.names import IDENTITY_HALVES, PROTECTORS, SHADOW_ARCHITECTURES


def _names(allowed: tuple[str, ...], empty: str | None = None) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of ``allowed`` names; ``empty`` (e.g. 'none') stands for no names."""

    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        if empty is not None and items == (empty,):
            return ()
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items

    return parse


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _arch_or_none(text: str) -> str:
    if text not in (*SHADOW_ARCHITECTURES, "none"):
        raise argparse.ArgumentTypeError(f"choose one of {', '.join(SHADOW_ARCHITECTURES)} or none")
    return text


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from plugin_service.bundle import BundleError
    from plugin_service.evaluation.config import EvaluationConfig, EvaluationError
    from plugin_service.evaluation.report import REPORT, RESULTS, fmt
    from plugin_service.evaluation.runner import run_evaluation
    from plugin_service.judge import JudgeNotInstalled

    fields: dict[str, Any] = {
        "data": args.data, "pairs": args.pairs, "attack_data": tuple(args.attack_data), "out": args.out,
        "bundle": args.bundle, "recognizer": args.recognizer, "finetuned_recognizer": args.finetuned_recognizer,
        "protectors": args.protectors, "attackers": args.attackers, "transfer_shadows": args.transfer_shadows,
        "eps": args.eps, "dp_epsilons": args.dp_epsilons, "protector_eps": args.protector_eps,
        "pgd_steps": args.pgd_steps, "pgd_alpha": args.pgd_alpha, "dp_epsilon": args.dp_epsilon,
        "dp_bound": args.dp_bound, "attacker_width": args.attacker_width, "attacker_depth": args.attacker_depth,
        "attacker_epochs": args.attacker_epochs, "shadow_width": args.shadow_width, "shadow_depth": args.shadow_depth,
        "shadow_epochs": args.shadow_epochs, "train_batch_size": args.train_batch_size, "lr": args.lr,
        "batch_size": args.batch_size, "pairs_per_fold": args.pairs_per_fold,
        "attack_limit_per_identity": args.attack_limit_per_identity, "attack_max_identities": args.attack_max_identities,
        "examples": args.examples, "channels_last": args.channels_last, "resume": not args.no_resume,
        "cache_dir": args.cache_dir, "device": args.device, "seed": args.seed,
        "tier_faces": args.tier_faces, "tier_attack_faces": args.tier_attack_faces, "tier_epochs": args.tier_epochs,
        "inversion_faces": args.inversion_faces, "judge_faces": args.judge_faces, "inversion_steps": args.inversion_steps,
        "surrogate_epochs": args.surrogate_epochs, "gallery_distractors": args.gallery_distractors, "judge_cache_dir": args.judge_cache_dir,
    }
    if args.no_tiers:
        fields["tiers"] = False
    try:
        cfg = EvaluationConfig.create(quick=args.quick, use_cache=not args.no_cache, adaptive_attacker=args.adaptive_attacker,
                                      allow_unknown_shadow_data=args.allow_unknown_shadow_data, **fields)
        results = run_evaluation(cfg)
    except (EvaluationError, BundleError, FileNotFoundError, JudgeNotInstalled) as e:
        print(f"advface evaluate: {e}", file=sys.stderr)
        return 2
    print(f"clean verification accuracy {fmt(results['clean']['recognizer']['accuracy'], 'accuracy')}")
    for name, rec in results["main"].items():
        worst = max(rec["privacy"].values(), key=lambda p: p["psnr"])
        print(f"{name:>8}: accuracy {fmt(rec['utility']['recognizer']['accuracy'], 'accuracy')}, "
              f"strongest attacker PSNR {fmt(worst['psnr'], 'psnr')} dB, SSIM {fmt(worst['ssim'], 'ssim')}")
    print(f"wrote {cfg.out / REPORT} and {cfg.out / RESULTS}")
    return 0


def _add_protector_params(g: argparse._ActionsContainer) -> None:
    """The protector settings both commands take; unset means the bundle's or the registry's default."""
    g.add_argument("--pgd-steps", type=int, help="PGD steps for advface and random (default: the bundle's)")
    g.add_argument("--pgd-alpha", type=float, help="PGD step size (default: the bundle's)")
    g.add_argument("--dp-epsilon", type=float, help="DP budget of the dp protector (default: the registry's)")
    g.add_argument("--dp-bound", type=float, help="DP clipping bound / sensitivity (default: the registry's)")


def add_evaluate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `advface evaluate` to ``sub``; its ``func`` runs the evaluation and returns an exit code."""
    p = sub.add_parser(
        "evaluate", help="privacy/utility report: attackers, replay attacks, verification accuracy, trade-offs",
        description="Train attackers the defender never saw (attacker half of --attack-data, cached), then measure "
        "for each protector how well they reconstruct the stored features of the --data faces (PSNR, SSIM, MSE, "
        "replay success) and the verification accuracy on --pairs; sweep the protection strength and the "
        "shadow x attacker architectures. Writes report.md, results.json and PNG figures to --out.")
    g = p.add_argument_group("inputs")
    g.add_argument("--bundle", type=Path, help="model bundle directory (default: the embedded default bundle)")
    g.add_argument("--recognizer", type=Path,
                   help="recogniser .safetensors whose E is the bundle's (default: the embedded one)")
    g.add_argument("--finetuned-recognizer", type=Path,
                   help="a head fine-tuned by `advface finetune-head`: its accuracy is reported next to the original's")
    g.add_argument("--data", type=Path, required=True, help="LFW-layout verification faces (name/name_NNNN.jpg)")
    g.add_argument("--pairs", type=Path, required=True, help="LFW-format pairs.txt over --data")
    g.add_argument("--attack-data", type=Path, required=True, nargs="+",
                   help="LFW-layout public face folder(s): attackers train on the attacker half of their identities, "
                   "defender shadows on the defender half (the split train-shadow --half uses)")
    g.add_argument("--out", type=Path, required=True, help="report directory to write")
    g = p.add_argument_group("what to compare")
    g.add_argument("--protectors", type=_names(PROTECTORS), help="comma-separated (default: none,random,dp,advface, and resynth when the bundle carries R; "
                   "'none' is always included as the reference)")
    g.add_argument("--attackers", type=_names(SHADOW_ARCHITECTURES),
                   help="paper-setting attacker architectures (default: urec,resrec,transrec)")
    g.add_argument("--adaptive-attacker", type=_arch_or_none,
                   help="architecture of the attacker that knows the defence, or none (default: urec)")
    g.add_argument("--transfer-shadows", type=_names(SHADOW_ARCHITECTURES, empty="none"),
                   help="shadow architectures of the transferability matrix, or none (default: urec,resrec,transrec)")
    g.add_argument("--eps", type=_floats,
                   help="trade-off sweep of the PGD radius for advface and random (default: 0,0.05,0.1,0.2,0.3)")
    g.add_argument("--dp-epsilons", type=_floats, help="trade-off sweep of the DP budget (default: 1,2,5,10,20,50)")
    g = p.add_argument_group("protection settings (main tables)")
    g.add_argument("--protector-eps", type=float, help="PGD radius (default: the bundle's)")
    _add_protector_params(g)
    g = p.add_argument_group("attackers and shadows")
    g.add_argument("--attacker-width", type=int, help="attacker width (default: twice the bundle shadow's; never equal to it)")
    g.add_argument("--attacker-depth", type=int, help="attacker depth (default: 2)")
    g.add_argument("--attacker-epochs", type=int, help="attacker training epochs (default: 10)")
    g.add_argument("--shadow-width", type=int, help="transfer/adaptive shadow width (default: the bundle shadow's)")
    g.add_argument("--shadow-depth", type=int, help="transfer/adaptive shadow depth (default: the bundle shadow's)")
    g.add_argument("--shadow-epochs", type=int, help="transfer/adaptive shadow epochs (default: the bundle's, else 10)")
    g.add_argument("--train-batch-size", type=int, help="training batch size (default: 32)")
    g.add_argument("--lr", type=float, help="Adam learning rate of reconstruction networks (default: 1e-4)")
    g.add_argument("--cache-dir", type=Path,
                   help="trained-network cache (default: $ADVFACE_CACHE_DIR or ~/.cache/advface/attackers)")
    g.add_argument("--no-cache", action="store_true", help="train every network afresh and cache nothing")
    g.add_argument("--allow-unknown-shadow-data", action="store_true",
                   help="evaluate a bundle whose manifest does not record its shadow identities (disjointness unverified)")
    g = p.add_argument_group("attacker tiers (A0-A3 and the embedding-only floor; need the dlib judge)")
    g.add_argument("--no-tiers", action="store_true", help="skip the tiers (and the judge)")
    g.add_argument("--tier-faces", type=int, help="privacy faces the tiers score (default: 1024)")
    g.add_argument("--tier-attack-faces", type=int, help="attacker faces for A1 decoders, linkage and surrogate E (default: 1024)")
    g.add_argument("--tier-epochs", type=int, help="epochs of A1 decoders, the floor decoder and the linkage student (default: 8)")
    g.add_argument("--gallery-distractors", type=int,
                   help="identities beyond the probes' in the rank-1 gallery, one photo each (default: 1000)")
    g.add_argument("--judge-faces", type=int, help="faces per reconstruction set the dlib judge scores (default: 300)")
    g.add_argument("--inversion-faces", type=int, help="faces each A2 inversion runs on (default: 64)")
    g.add_argument("--inversion-steps", type=int, help="Adam steps per A2 inversion (default: 200)")
    g.add_argument("--surrogate-epochs", type=int, help="epochs fitting the black-box surrogate E (default: 3)")
    g.add_argument("--judge-cache-dir", type=Path, help="judge embedding cache (default: ~/.cache/advface/judge)")
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, help="faces per protector call; AdvFace uses batch statistics (default: 32)")
    g.add_argument("--channels-last", action="store_true",
                   help="run AdvFace's PGD on channels-last tensors, as `advface serve --channels-last` does: the same "
                   "function up to floating-point reordering, about 1.5x faster on CPU")
    g.add_argument("--no-resume", action="store_true",
                   help="recompute every protector pass instead of reusing the ones a previous, interrupted run "
                   "of the same settings finished (kept under --cache-dir)")
    g.add_argument("--pairs-per-fold", type=int, help="use only this many matched and mismatched pairs per fold")
    g.add_argument("--attack-limit-per-identity", type=int, help="read at most this many attack faces per identity")
    g.add_argument("--attack-max-identities", type=int, help="read only the first N attack identities (sorted)")
    g.add_argument("--examples", type=int, help="faces in the reconstruction figure (default: 4)")
    g.add_argument("--quick", action="store_true",
                   help="smoke run: tiny networks, 1 epoch, 3 PGD steps, 2+2 pairs per fold, few attack faces "
                   "(explicit options still win); numbers are not meaningful")
    g.add_argument("--device", help="auto, cpu or cuda[:N] (default: auto)")
    g.add_argument("--seed", type=int, help="base seed (default: 0)")
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_finetune_head(args: argparse.Namespace) -> int:
    from plugin_service.bundle import BundleError, default_recognizer_path
    from plugin_service.evaluation.config import EvaluationError
    from plugin_service.evaluation.finetune import HeadFinetuning, finetune_head
    from plugin_service.judge import JudgeNotInstalled
    from plugin_service.protect.registry import ProtectorParams

    dp = {k: v for k, v in (("dp_epsilon", args.dp_epsilon), ("dp_bound", args.dp_bound)) if v is not None}
    params = ProtectorParams(steps=args.pgd_steps, alpha=args.pgd_alpha, eps=args.eps, **dp)
    cfg = HeadFinetuning(recognizer=args.recognizer or default_recognizer_path(), data=tuple(args.data), out=args.out,
                         bundle=args.bundle, protector=args.protector, target=args.target, params=params, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, clean_mix=not args.no_clean_mix, half=args.half,
                         limit_per_identity=args.limit_per_identity, seed=args.seed, device=args.device)
    try:
        result = finetune_head(cfg)
    except (EvaluationError, BundleError, FileNotFoundError, JudgeNotInstalled) as e:
        print(f"advface finetune-head: {e}", file=sys.stderr)
        return 2
    print(f"fine-tuned the head on {result.faces} faces of {result.identities} identities: last epoch loss "
          f"{result.loss:.3f}, accuracy on protected features {result.train_accuracy:.3f}")
    print(f"wrote {args.out}; pass it to `advface evaluate --finetuned-recognizer` to compare")
    return 0


def add_finetune_head_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `advface finetune-head` (offline mode) to ``sub``; its ``func`` returns an exit code."""
    p = sub.add_parser(
        "finetune-head", help="offline mode (XNN-d): retrain R on protected features (E stays frozen)",
        description="Distil the server-side recogniser R on protected features of --data (plus the clean features "
        "of the same faces), with E frozen: R(protected) learns the clean R's embedding of the clean face "
        "(--target clean, XNN-d), the teacher's (--target teacher, dlib), or identities by cross-entropy "
        "(--target identity). Writes a recogniser .safetensors for `advface evaluate --finetuned-recognizer`.")
    p.add_argument("--recognizer", type=Path, help="recogniser .safetensors to start from (default: the embedded one)")
    p.add_argument("--bundle", type=Path, help="bundle whose protector makes the features (default: the embedded one)")
    p.add_argument("--data", type=Path, required=True, nargs="+", help="LFW-layout public face folder(s); never the evaluation sets")
    p.add_argument("--out", type=Path, required=True, help="output recogniser (.safetensors)")
    p.add_argument("--protector", choices=("advface", "resynth", "random", "dp"), default="advface")
    p.add_argument("--target", choices=("clean", "teacher", "identity"), default="clean",
                   help="what R(protected) learns: the clean R's embedding (XNN-d), dlib's, or identity CE (default: clean)")
    p.add_argument("--eps", type=float, help="PGD radius (default: the bundle's)")
    _add_protector_params(p)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="faces per protector call and per step (default: 32)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--no-clean-mix", action="store_true", help="train on protected features only")
    p.add_argument("--half", choices=IDENTITY_HALVES, default="all",
                   help="train on one identity half of --data (default: all)")
    p.add_argument("--limit-per-identity", type=int, help="read at most this many faces per identity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=_cmd_finetune_head)
    return p
