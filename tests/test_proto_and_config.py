"""The committed stubs match the .proto; settings come from flags, then env, then defaults."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from plugin_service.cli import build_parser
from plugin_service.config import (
    ServerSettings,
    add_settings_arguments,
    settings_from_args,
)

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "clients"))
    try:
        from generate_stubs import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    generate(tmp_path)
    for name in ("plugin_pb2.py", "plugin_pb2.pyi", "plugin_pb2_grpc.py"):
        fresh = (tmp_path / "advface" / "v1" / name).read_text()
        assert fresh == (ROOT / "clients" / "advface" / "v1" / name).read_text(), f"{name} is stale: run clients/generate_stubs.py"


def _parse(argv: list[str]) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(argv))


def test_flags_override_environment_which_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parse([]).port == 50051
    monkeypatch.setenv("ADVFACE_PORT", "6000")
    monkeypatch.setenv("ADVFACE_MAX_EPS", "0.3")
    monkeypatch.setenv("ADVFACE_BUNDLE", "/models/b")
    s = _parse([])
    assert s.port == 6000 and s.max_eps == 0.3 and s.bundle == Path("/models/b")
    assert _parse(["--port", "7000"]).port == 7000


@pytest.mark.parametrize("argv, words", [
    (["--protectors", "advface,none"], "unsafe"),
    (["--min-eps", "0.4", "--max-eps", "0.3"], "min-eps"),
    (["--queue-size", "0"], "--queue-size"),
])
def test_invalid_settings_are_named(argv: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        _parse(argv)


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        text = command.format_help()
        assert len(text) > 200, name
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "ADVFACE_MAX_BATCH" in capsys.readouterr().out
