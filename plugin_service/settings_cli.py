"""Command-line flags built from a settings dataclass, so a command's flags cannot drift from its settings.

Every job and the server keep their settings in one frozen dataclass. A field made with
:func:`option` carries its ``help`` (written once, next to the field) and becomes one flag,
``--field-name``; a field without ``help`` is a knob kept off the command line. The flag's type
comes from the field's annotation, which ``from __future__ import annotations`` leaves as a string:
it is read here rather than resolved, because resolving would import the names the dataclass's
module uses (for the jobs: torch), and `advface --help` must stay fast. Understood annotations are
``int``, ``float``, ``str``, ``bool``, ``Path``, ``X | None`` and ``tuple[X, ...]``:

* a boolean is ``--name`` when it defaults to False and ``--no-name`` when it defaults to True;
  with an environment prefix it is both (``--name/--no-name``): the variable may flip the default;
* ``tuple[Path, ...]`` takes several values after one flag (a path may hold a comma); other tuples
  take one comma-separated value (``--eps 0,0.1``), each item checked against ``choices``.

:func:`from_args` builds the dataclass back from the parsed flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any

_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "Path": Path}
_SAME: Any = object()  # like()'s "keep the original field's default"


def option(default: Any = MISSING, help: str = "", *, choices: Collection[str] | None = None,  # noqa: A002
           flag: str | None = None, default_help: str | None = None, group: str | None = None,
           empty: str | None = None) -> Any:
    """A settings field that is also a flag.

    ``choices`` limits a name (or each name of a tuple); ``flag`` replaces the name derived from the
    field (``no-cache`` for ``use_cache``); ``default_help`` describes a default the value alone does
    not explain ("the bundle's"); ``group`` titles the --help section; ``empty`` is the word that
    stands for an empty tuple ("none"). A boolean's ``help`` says what its flag does, which for a
    field that defaults to True is turning it off (``--no-resume``).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "default_help": default_help, "group": group,
                "empty": empty}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def like(cls: type, name: str, default: Any = _SAME, **overrides: Any) -> Any:
    """A field described as ``cls``'s field ``name`` is (same flag, same help), for two settings sharing a flag.

    ``overrides`` replace metadata keys (``group=None`` drops the group).
    """
    source: Field = next(f for f in fields(cls) if f.name == name)
    metadata = {k: v for k, v in {**source.metadata, **overrides}.items() if v is not None}
    return field(default=source.default if default is _SAME else default, metadata=metadata)


def flag_fields(cls: type) -> list[Field]:
    """The fields of ``cls`` that are flags (those with a ``help``)."""
    return [f for f in fields(cls) if "help" in f.metadata]


@dataclass(frozen=True)
class _Kind:
    scalar: str  # int, float, str, bool or Path
    many: bool  # tuple[scalar, ...]


def _kind(f: Field) -> _Kind:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    rest = [p.strip() for p in text.split("|") if p.strip() != "None"]  # X | None: a flag that may stay unset
    if len(rest) == 1:
        many = rest[0].startswith("tuple[") and rest[0].endswith(", ...]")
        scalar = rest[0][len("tuple["):-len(", ...]")] if many else rest[0]
        if scalar in _SCALARS or (scalar == "bool" and not many):
            return _Kind(scalar, many)
    raise TypeError(f"{f.name}: no flag for the type {text!r}; settings flags take int, float, str, bool, Path, "
                    "X | None and tuple[X, ...]")


def _comma_list(item: Callable[[str], Any], choices: Collection[str] | None,
                empty: str | None) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        words = tuple(t.strip() for t in text.split(",") if t.strip())
        if empty is not None and words == (empty,):
            return ()
        bad = [w for w in words if choices is not None and w not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown name(s) {', '.join(bad)}; choose from {', '.join(choices or ())}")
        try:
            return tuple(item(w) for w in words)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}: {e}") from e

    return parse


def _shown(value: Any) -> str:
    """A default as --help prints it; '' for defaults that mean 'not set'."""
    if value is None or value is False or value == ():
        return ""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _env_default(raw: str, kind: _Kind) -> Any:
    """A flag's default from its environment variable; argparse converts a string default with the flag's type."""
    return raw.strip().lower() in ("1", "true", "yes", "on") if kind.scalar == "bool" else raw


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, env_prefix: str | None = None,
                  group: str | None = None, sections: Sequence[str] = (), unset: bool | Collection[str] = False,
                  skip: Collection[str] = ()) -> None:
    """One flag per :func:`flag_fields` field of ``cls``, in field order.

    ``env_prefix`` ("ADVFACE_"): ``<prefix><FIELD>`` overrides each default. ``group`` titles the
    fields without a group of their own. ``unset`` (True, or field names): those flags are None
    unless given, for settings laid over other defaults later (``EvaluationConfig.create``) or a
    flag whose presence chooses the job; --help still shows the field's default. ``sections``:
    group titles to create first, in this order (otherwise groups appear as fields first use them).
    ``skip``: fields another settings class of the same command already made flags of.
    """
    groups = {title: parser.add_argument_group(title) for title in sections}
    for f in flag_fields(cls):
        if f.name in skip:
            continue
        title = f.metadata.get("group", group)
        container = parser if title is None else groups.get(title) or groups.setdefault(
            title, parser.add_argument_group(title))
        _add_flag(container, f, env_prefix, unset is True or (unset is not False and f.name in unset))


def _add_flag(container: argparse._ActionsContainer, f: Field, env_prefix: str | None, unset: bool) -> None:
    kind, meta = _kind(f), f.metadata
    required = f.default is MISSING and f.default_factory is MISSING
    default = f.default_factory() if f.default_factory is not MISSING else None if required else f.default
    env = None if env_prefix is None else env_name(env_prefix, f.name)
    if env is not None and env in os.environ:
        default = _env_default(os.environ[env], kind)
    shown = meta.get("default_help") or _shown(default)
    if kind.scalar == "bool":  # a switch's default is being off: "default: True" of --no-resume would confuse
        shown = str(default) if env else ""
    text = meta["help"] + (f" [env {env}; default: {shown or 'unset'}]" if env else f" (default: {shown})" if shown else "")
    kw: dict[str, Any] = {"dest": f.name, "default": None if unset else default, "help": text.replace("%", "%%")}
    name = meta.get("flag", f.name).replace("_", "-")
    if kind.scalar == "bool":
        if env is not None:
            container.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
        else:
            flag = name if "flag" in meta else f"no-{name}" if default else name
            container.add_argument(f"--{flag}", action="store_false" if default else "store_true", **kw)
        return
    if kind.many and kind.scalar == "Path":
        kw.update(type=Path, nargs="+" if required else "*")
    elif kind.many:
        kw["type"] = _comma_list(_SCALARS[kind.scalar], meta.get("choices"), meta.get("empty"))
    else:
        kw.update(type=_SCALARS[kind.scalar], choices=meta.get("choices"))
    container.add_argument(f"--{name}", required=required, **kw)


def env_name(prefix: str, field_name: str) -> str:
    return f"{prefix}{field_name.upper()}"


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """``cls``'s flag values from parsed ``args`` (lists of paths as tuples), by field name."""
    return {f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v for f in flag_fields(cls)}


def from_args(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    """``cls`` built from its flags in ``args`` and ``extra`` (fields that are no flags); the rest keep their defaults."""
    return cls(**values_from_args(args, cls), **extra)
