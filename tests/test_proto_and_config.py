"""The committed stubs describe the .proto; settings come from flags, then env, then defaults."""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, text_format
from grpc_tools import protoc

from plugin_service.cli import build_parser
from plugin_service.config import (
    ServerSettings,
    add_settings_arguments,
    settings_from_args,
)

ROOT = Path(__file__).resolve().parents[1]


def _generate_stubs_module():  # noqa: ANN202 - clients/generate_stubs.py is a script, not a package
    sys.path.insert(0, str(ROOT / "clients"))
    try:
        import generate_stubs  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    return generate_stubs


def compiled_descriptor(proto_root: Path, workdir: Path) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto protoc makes now of ``proto_root``/advface/v1/plugin.proto."""
    gen = _generate_stubs_module()
    out = workdir / "plugin.desc"
    args = ["protoc", f"-I{proto_root}", *gen.include_paths(), f"--descriptor_set_out={out}", gen.PROTO]
    assert protoc.main(args) == 0, f"protoc failed on {proto_root / gen.PROTO}"
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return _without_default_json_names(fresh)


def _default_json_name(name: str) -> str:
    """protoc's json_name for a field without an explicit one: lowerCamelCase of the snake_case name."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _without_default_json_names(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A descriptor set spells out every field's json_name; generated modules keep only explicit ones."""
    def strip(messages) -> None:  # noqa: ANN001
        for message in messages:
            for field in [*message.field, *message.extension]:
                if field.json_name == _default_json_name(field.name):
                    field.ClearField("json_name")
            strip(message.nested_type)

    strip(file.message_type)
    for field in file.extension:
        if field.json_name == _default_json_name(field.name):
            field.ClearField("json_name")
    return file


def contract_difference(fresh: descriptor_pb2.FileDescriptorProto,
                        committed: descriptor_pb2.FileDescriptorProto) -> str:
    """'' when the two descriptors are equal, else a unified diff of their text forms."""
    if fresh == committed:
        return ""
    return "\n".join(difflib.unified_diff(text_format.MessageToString(committed).splitlines(),
                                          text_format.MessageToString(fresh).splitlines(),
                                          "committed plugin_pb2.py", "plugin.proto now", lineterm=""))


def _committed_descriptor() -> descriptor_pb2.FileDescriptorProto:
    from advface.v1 import plugin_pb2

    return descriptor_pb2.FileDescriptorProto.FromString(plugin_pb2.DESCRIPTOR.serialized_pb)


def test_committed_stubs_describe_the_proto(tmp_path: Path) -> None:
    """The committed plugin_pb2.py carries the .proto's contract (messages, fields, services, options).

    Compared as descriptors, not as generated text: a protoc upgrade that words the stubs differently
    passes; any change to the contract without regenerating fails.
    """
    fresh = compiled_descriptor(ROOT / "clients", tmp_path)
    diff = contract_difference(fresh, _committed_descriptor())
    assert not diff, f"the committed stubs are stale: run clients/generate_stubs.py\n{diff}"
    # plugin_pb2_grpc.py: every RPC of the .proto, by its wire path, and no other
    from advface.v1 import plugin_pb2_grpc

    grpc_text = Path(plugin_pb2_grpc.__file__).read_text()
    paths = {f"/{fresh.package}.{svc.name}/{m.name}" for svc in fresh.service for m in svc.method}
    assert paths and set(re.findall(rf"'(/{re.escape(fresh.package)}\.[A-Za-z]+/[A-Za-z]+)'", grpc_text)) == paths


def test_the_descriptor_comparison_sees_a_new_field(tmp_path: Path) -> None:
    """The freshness check can fail: a field added to a copy of the .proto is reported."""
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "clients" / "advface", copy / "advface", ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    proto = copy / "advface" / "v1" / "plugin.proto"
    text = proto.read_text()
    assert "message FaceStats {" in text
    proto.write_text(text.replace("message FaceStats {", "message FaceStats {\n  string freshness_probe = 4999;", 1))
    diff = contract_difference(compiled_descriptor(copy, tmp_path), _committed_descriptor())
    assert "freshness_probe" in diff and "4999" in diff
    assert contract_difference(compiled_descriptor(ROOT / "clients", tmp_path), _committed_descriptor()) == ""


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
