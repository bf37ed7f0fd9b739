"""Flags built from settings dataclasses (plugin_service/settings_cli.py), and every command's flags match its settings."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from plugin_service.cli import build_parser
from plugin_service.config import ServerSettings
from plugin_service.engine_settings import EngineSettings
from plugin_service.evaluation.config import EvaluationConfig
from plugin_service.evaluation.finetune_settings import HeadFinetuning
from plugin_service.evaluation.shadow_check_settings import ShadowCheckSettings
from plugin_service.settings_cli import add_arguments, flag_fields, from_args, like, option
from plugin_service.training.recognizer_settings import DistillTraining, RecognizerTraining
from plugin_service.training.shadow_settings import ShadowTraining


@dataclass(frozen=True)
class Toy:
    data: tuple[Path, ...] = option(help="input folders")
    out: Path = option(help="where to write")
    steps: int = option(3, "how many steps")
    rate: float | None = option(None, "a rate", default_help="the bundle's")
    name: str = option("a", "a name", choices=("a", "b"))
    names: tuple[str, ...] = option(("a",), "some names", choices=("a", "b"), empty="none")
    sweep: tuple[float, ...] = option((0.5, 1.0), "a sweep")
    fast: bool = option(False, "go fast")
    cache: bool = option(True, "keep no cache")
    keep_all: bool = option(True, "drop everything", flag="purge")
    tuning: float = 0.1  # no help: no flag


def _parser(cls: type = Toy, **kw: object) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_arguments(parser, cls, **kw)
    return parser


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def test_one_flag_per_field_with_help_and_the_default_shown() -> None:
    flags = _flags(_parser())
    assert set(flags) == {f.name for f in flag_fields(Toy)} == {f.name for f in fields(Toy)} - {"tuning"}
    assert flags["data"].option_strings == ["--data"] and flags["data"].required
    assert flags["cache"].option_strings == ["--no-cache"] and flags["keep_all"].option_strings == ["--purge"]
    text = _parser().format_help()
    for help_text in ("how many steps (default: 3)", "a rate (default: the bundle's)", "(default: 0.5,1.0)", "go fast"):
        assert help_text in " ".join(text.split()), help_text
    assert "--tuning" not in text


def test_parsing_and_the_round_trip_to_the_dataclass() -> None:
    args = _parser().parse_args(["--data", "a", "b,c", "--out", "o", "--rate", "0.25", "--names", "b,a",
                                 "--sweep", "0,2", "--fast", "--no-cache", "--purge"])
    toy = from_args(args, Toy, tuning=0.3)
    assert toy == Toy(data=(Path("a"), Path("b,c")), out=Path("o"), steps=3, rate=0.25, name="a", names=("b", "a"),
                      sweep=(0.0, 2.0), fast=True, cache=False, keep_all=False, tuning=0.3)
    plain = from_args(_parser().parse_args(["--data", "a", "--out", "o", "--names", "none"]), Toy)
    assert plain.rate is None and plain.names == () and plain.cache and not plain.fast and plain.tuning == 0.1


@pytest.mark.parametrize("argv", [["--name", "c"], ["--names", "a,c"], ["--sweep", "1,x"], ["--steps", "1.5"], []])
def test_bad_values_and_missing_required_flags_exit_with_code_2(argv: list[str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    required = [] if not argv else ["--data", "a", "--out", "o"]
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args([*required, *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unset_flags_stay_none_but_help_shows_the_default() -> None:
    parser = _parser(unset=True)
    args = parser.parse_args(["--data", "a", "--out", "o"])
    assert all(getattr(args, f) is None for f in ("steps", "name", "names", "sweep", "fast", "cache", "keep_all"))
    assert "how many steps (default: 3)" in " ".join(parser.format_help().split())
    partly = _parser(unset=("steps",)).parse_args(["--data", "a", "--out", "o"])
    assert partly.steps is None and partly.name == "a"


def test_environment_variables_set_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOY_STEPS", "7")
    monkeypatch.setenv("TOY_FAST", "yes")
    monkeypatch.setenv("TOY_CACHE", "0")
    parser = _parser(env_prefix="TOY_")
    toy = from_args(parser.parse_args(["--data", "a", "--out", "o"]), Toy)
    assert toy.steps == 7 and toy.fast and not toy.cache
    toy = from_args(parser.parse_args(["--data", "a", "--out", "o", "--steps", "2", "--no-fast", "--cache"]), Toy)
    assert toy.steps == 2 and not toy.fast and toy.cache
    assert "[env TOY_STEPS; default: 7]" in " ".join(parser.format_help().split())


def test_groups_sections_and_skipped_fields() -> None:
    @dataclass(frozen=True)
    class Grouped:
        a: int = option(1, "first", group="one")
        b: int = option(2, "second", group="two")
        c: int = option(3, "third")
        d: int = like(Toy, "steps", 5)  # Toy's help, its own default

    parser = _parser(Grouped, sections=("two", "one"), group="rest", skip=("c",))
    titles = [g.title for g in parser._action_groups]
    assert titles.index("two") < titles.index("one") and "rest" in titles
    assert "c" not in _flags(parser) and parser.parse_args([]).d == 5
    assert "how many steps (default: 5)" in " ".join(parser.format_help().split())


def test_an_unsupported_annotation_is_refused_when_the_parser_is_built() -> None:
    @dataclass(frozen=True)
    class Odd:
        mapping: dict[str, int] = option(None, "no flag can hold this")

    with pytest.raises(TypeError, match="mapping"):
        _parser(Odd)


# Each command's settings classes, and their fields that are deliberately no flags.
COMMANDS = {
    "serve": {ServerSettings: set(), EngineSettings: set()},
    "bench": {EngineSettings: set()},
    "train-shadow": {ShadowTraining: {"command"}},
    "train-recognizer": {RecognizerTraining: {"lr_decay", "weight_decay", "label_smoothing"},
                         DistillTraining: {"weight_decay", "warmup_steps"}},
    "finetune-head": {HeadFinetuning: {"weight_decay", "label_smoothing"}},
    "evaluate": {EvaluationConfig: {"tier_lr", "inversion_lr", "inversion_tv"}},
    "shadow-check": {ShadowCheckSettings: set()},
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_one_flag_per_settings_field(command: str) -> None:
    actions = [a for a in _subcommands()[command]._actions if a.option_strings]
    for cls, exceptions in COMMANDS[command].items():
        assert {f.name for f in fields(cls)} - {f.name for f in flag_fields(cls)} == exceptions, cls.__name__
        for f in flag_fields(cls):
            matching = [a for a in actions if a.dest == f.name]
            assert len(matching) == 1, (command, f.name)
            assert matching[0].help and len(matching[0].help) > 5, (command, f.name)


def test_train_recognizer_flags_build_either_job_with_the_command_s_defaults() -> None:
    parser = build_parser()
    plain = parser.parse_args(["train-recognizer", "--data", "faces", "--out", "r.safetensors"])
    assert plain.teacher is None  # no --teacher: classification
    assert from_args(plain, RecognizerTraining) == RecognizerTraining(data=(Path("faces"),), out=Path("r.safetensors"))
    args = parser.parse_args(["train-recognizer", "--data", "a", "b", "--out", "s.safetensors", "--teacher", "dlib",
                              "--pairs", "dev/pairs.txt", "--report-pairs", "lfw/pairs.txt"])
    cfg = from_args(args, DistillTraining)
    assert cfg.epochs == 15 and cfg.width == 32 and cfg.lr == 1e-3  # the command's defaults, not distillation's own
    assert cfg.monitor == (Path("dev/pairs.txt"), Path("dev"))
    assert cfg.report == ((Path("dev/pairs.txt"), Path("dev")), (Path("lfw/pairs.txt"), Path("lfw")))


def test_the_torch_free_settings_keep_the_models_defaults() -> None:
    from plugin_service.models.recognizer import RecognizerSpec
    from plugin_service.models.shadow import ShadowSpec

    spec = ShadowSpec()
    assert (ShadowTraining.arch, ShadowTraining.width, ShadowTraining.depth) == (spec.arch, spec.width, spec.depth)
    assert DistillTraining(data=(), out=Path("x")).spec == RecognizerSpec(width=64, embedding_dim=128)


def test_building_every_parser_does_not_import_torch() -> None:
    code = "import sys; from plugin_service.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
