"""The `evaluate` and `finetune-head` subcommands, for plugin_service/cli.py's ``build_parser``.

Each command's flags are built from its settings class (EvaluationConfig, HeadFinetuning) by
:mod:`plugin_service.settings_cli`. Only those torch-free modules are imported here; torch and the
harness load inside the command functions, so `advface --help` stays fast. Both functions return an exit code: 0 on success, 2
when the inputs are inconsistent (the message names the problem; no traceback).
"""

from __future__ import annotations

import argparse
import sys

from plugin_service.evaluation.config import SECTIONS, EvaluationConfig
from plugin_service.evaluation.finetune_settings import HeadFinetuning
from plugin_service.settings_cli import add_arguments, from_args, values_from_args


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from plugin_service.bundle import BundleError
    from plugin_service.evaluation.config import EvaluationError
    from plugin_service.evaluation.report import REPORT, RESULTS, fmt
    from plugin_service.evaluation.runner import run_evaluation
    from plugin_service.judge import JudgeNotInstalled

    values = values_from_args(args, EvaluationConfig)  # None where not given: create() picks full or quick
    try:
        cfg = EvaluationConfig.create(quick=bool(values.pop("quick")), **values)
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


def add_evaluate_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `advface evaluate` to ``sub``; its ``func`` runs the evaluation and returns an exit code."""
    p = sub.add_parser(
        "evaluate", help="privacy/utility report: attackers, replay attacks, verification accuracy, trade-offs",
        description="Train attackers the defender never saw (attacker half of --attack-data, cached), then measure "
        "for each protector how well they reconstruct the stored features of the --data faces (PSNR, SSIM, MSE, "
        "replay success) and the verification accuracy on --pairs; sweep the protection strength and the "
        "shadow x attacker architectures. Writes report.md, results.json and PNG figures to --out.")
    add_arguments(p, EvaluationConfig, sections=SECTIONS, unset=True)
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_finetune_head(args: argparse.Namespace) -> int:
    from plugin_service.bundle import BundleError
    from plugin_service.evaluation.config import EvaluationError
    from plugin_service.evaluation.finetune import finetune_head
    from plugin_service.judge import JudgeNotInstalled

    cfg = from_args(args, HeadFinetuning)
    try:
        result = finetune_head(cfg)
    except (EvaluationError, BundleError, FileNotFoundError, JudgeNotInstalled) as e:
        print(f"advface finetune-head: {e}", file=sys.stderr)
        return 2
    print(f"fine-tuned the head on {result.faces} faces of {result.identities} identities: last epoch loss "
          f"{result.loss:.3f}, {result.fit_name} on protected features {result.fit:.3f}")
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
    add_arguments(p, HeadFinetuning)
    p.set_defaults(func=_cmd_finetune_head)
    return p
