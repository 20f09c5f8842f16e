"""How an option is declared, read and checked: once, as a dataclass field (``opt``), serving the Python
API, the YAML recipes (``build_config``, type-checked) and the command line (``add_arguments``).

A command's configuration is either one group of options (``predict``, ``export``) or composed of groups
(``group``: the training jobs' model / data / training / pruning / run, as ``run_glue.py`` splits its
arguments), each group a dataclass that checks itself. Flags, recipes and the saved ``config.yaml`` stay
flat (``--lr``, ``lr: 3e-5``): an option's name is unique across a command's groups.

Defaults < YAML recipe (``--config``) < command-line flags; with ``--resume`` the interrupted run's saved
options come first. The jobs' option groups themselves are declared in ``config`` (training jobs) and
beside their commands (``predict``, ``runtime.commands``). A leaf: nothing of the training stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparsebert.errors import SparseBertError
from sparsebert.io import is_sparsebert_output
from sparsebert.tasks import DEFAULT_LENGTH

TRAINED_LENGTH = f"truncate inputs to N tokens (default: the length the model was trained at, else {DEFAULT_LENGTH})"

C = TypeVar("C")
RESTORE = "restore it from a copy, or start the run again with --overwrite"  # a damaged config.yaml's way out


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, group: str = "training", factory=None):
    """Declare an option once: its default, its help and its choices serve the dataclass (the API), the
    YAML recipes (type-checked by ``build_config``) and the command line (``add_arguments``)."""
    metadata = {"help": help, "choices": choices, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def group(factory: Callable[[], Any]) -> Any:
    """A group of options inside a command's configuration; ``factory`` gives the command's defaults (the
    student's training group starts from a higher learning rate than a fine-tuning's: its factory says why)."""
    return field(default_factory=factory, metadata={"group_of_options": True})


def groups(cls: type) -> list[dataclasses.Field]:
    """The group fields of a composed configuration ([] for a configuration that is one group)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("group_of_options")]


def option_fields(cls: type) -> dict[str, tuple[str | None, dataclasses.Field, Any]]:
    """Every option of a configuration by flat name: (its group's attribute or None, its field, its type)."""
    if not groups(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: (None, f, hints[f.name]) for f in dataclasses.fields(cls)}
    options: dict[str, tuple[str | None, dataclasses.Field, Any]] = {}
    for g in groups(cls):
        kind = type(g.default_factory())
        hints = typing.get_type_hints(kind)
        for f in dataclasses.fields(kind):
            if f.name in options:
                raise TypeError(f"{cls.__name__}: option {f.name} declared in groups {options[f.name][0]} and {g.name}")
            options[f.name] = (g.name, f, hints[f.name])
    return options


def default_values(cls: type) -> dict[str, Any]:
    """Every option's default in ``cls`` (a group's default is the command's: its factory's)."""
    if not groups(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}  # fmt: skip
    return {k: v for g in groups(cls) for k, v in dataclasses.asdict(g.default_factory()).items()}


def flat_options(config: object) -> dict[str, Any]:
    """A configuration's options by flat name, as flags, recipes and ``config.yaml`` spell them."""
    if not groups(type(config)):
        return dataclasses.asdict(config)
    return {k: v for g in groups(type(config)) for k, v in dataclasses.asdict(getattr(config, g.name)).items()}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_text_columns(config: object) -> None:
    """One text, or a pair: what BERT-family encoders take (a third column would be silently dropped)."""
    if config.text_columns and len(config.text_columns) > 2:
        count = len(config.text_columns)
        raise SparseBertError(f"--text-columns takes one or two columns (a text or a pair), got {count}")


def at_least(config: object, names: tuple[str, ...], low: int) -> None:
    """Each named option is at least ``low``; one left unset (None: "the default decides later") passes."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < low:
            raise SparseBertError(f"{flag(name)} must be >= {low}, got {value}")


def positive(config: object, names: tuple[str, ...]) -> None:
    """Each named option is a finite number > 0; one left unset (None) passes."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise SparseBertError(f"{flag(name)} must be a positive number, got {value}")


def check_choices(config: object) -> None:
    """Every option declared with choices holds one of them (lists: every item)."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        for item in value if isinstance(value, list) else [value]:
            if choices and item is not None and item not in choices:
                raise SparseBertError(f"{flag(f.name)} must be one of {', '.join(choices)}; got {item!r}")


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The configuration a parsed command line asks for: its ``--config`` recipe, then its flags.

    With ``--resume`` the interrupted run's options come first (nanoGPT's resume): ``--resume
    --output-dir D`` alone continues the run in D as it was started, whatever the defaults are now; an
    option given again must match it (``api._check_resume``).
    """
    names = option_fields(cls)
    flags = {k: v for k, v in vars(args).items() if k in names}
    config = build_config(cls, args.config, **flags)
    saved = resumed_options(config)
    return build_config(cls, args.config, base=saved, **flags) if saved else config


def saved_options(folder: Path) -> dict[str, Any]:
    """The options a run in ``folder`` was started with (its ``config.yaml``; {} if it has none)."""
    path = folder / "config.yaml"
    return read_yaml_mapping(path, "a run's config.yaml", RESTORE) if path.is_file() else {}


def read_yaml_mapping(path: Path, what: str, way_out: str) -> dict[str, Any]:
    """A YAML mapping read with a one-line error for a file that is empty, not YAML, or not a mapping."""
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(exc, "problem", None) or type(exc).__name__
        raise SparseBertError(f"{path}: not valid YAML ({reason}{where}); {way_out}") from None
    if not isinstance(loaded, dict):
        raise SparseBertError(f"{path}: {'empty' if loaded is None else 'not ' + what}; {way_out}")
    return loaded


def resumed_options(config: object) -> dict[str, Any]:
    """The options saved by the run that ``--resume`` continues ({} if none), read only from a folder that
    sparsebert wrote, less the options that say where and how to start."""
    options = flat_options(config)
    folder = Path(options["output_dir"]) if options.get("resume") and options.get("output_dir") else None
    if folder is None or not is_sparsebert_output(folder):
        return {}
    fields = option_fields(type(config))
    names = set(fields) - {"output_dir", "overwrite", "resume"}
    saved = {key: value for key, value in saved_options(folder).items() if key in names}
    for key, value in saved.items():  # a file cut short can still be YAML: "log_every:" is a null
        try:
            _typed(value, fields[key][2], f"option {key}")
        except SparseBertError as exc:
            raise SparseBertError(f"{folder / 'config.yaml'}: {exc}; {RESTORE}") from None
    return saved


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of ``cls``, from its declaration (type, choices, help, default).

    Every flag defaults to None, so ``build_config`` can tell a given flag from an absent one (flags
    override the recipe, which overrides the defaults).
    """
    sections: dict[str, argparse._ArgumentGroup] = {}
    defaults = default_values(cls)
    for name, (_, f, hint) in option_fields(cls).items():
        section = f.metadata.get("group", "options")
        if section not in sections:
            sections[section] = parser.add_argument_group(section)
        default = defaults[name]
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        kind, help_text = _base_type(hint), f.metadata.get("help", "")
        help_text += f" (default: {shown})" if shown not in (None, False, "") else ""
        kwargs: dict[str, Any] = {"default": None, "help": help_text.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        sections[section].add_argument(flag(name), **kwargs)


def _base_type(hint: Any) -> Any:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _norm(key: str) -> str:
    return key.replace("-", "_")


def build_config(
    cls: type[C], recipe: str | Path | None = None, *, base: dict[str, Any] | None = None, **overrides: Any
) -> C:
    """Defaults, then ``base`` (a resumed run's options), then the YAML recipe, then ``overrides`` whose
    value is not None.

    Every value is checked against its option's declared type first (a YAML ``no`` is a boolean, the
    string ``"no"`` is not; ``2.7`` is no step count), so a bad recipe fails before any work starts.
    """
    hints = {name: hint for name, (_, _, hint) in option_fields(cls).items()}
    values = {key: _typed(value, hints[key], f"saved option {key}") for key, value in (base or {}).items()}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            raise SparseBertError(f"{path}: recipe file not found")
        loaded = read_yaml_mapping(path, "a recipe (a mapping of option: value)", "fix the recipe")
        for key, value in loaded.items():
            if _norm(str(key)) not in hints:
                raise SparseBertError(f"{path}: unknown option {key!r} for this command")
            values[_norm(key)] = _typed(value, hints[_norm(key)], f"{path}: option {key}")
    for key, value in overrides.items():
        if value is None:
            continue
        if _norm(key) not in hints:
            raise SparseBertError(f"unknown option: {key}")
        values[_norm(key)] = _typed(value, hints[_norm(key)], flag(_norm(key)))
    return compose(cls, values)


def compose(cls: type[C], values: dict[str, Any]) -> C:
    """``cls`` with these options (flat names) over its defaults; each group checks its own values."""
    if not groups(cls):
        return cls(**values)
    owner = option_fields(cls)
    parts = {}
    for g in groups(cls):
        mine = {k: v for k, v in values.items() if owner[k][0] == g.name}
        parts[g.name] = dataclasses.replace(g.default_factory(), **mine)
    return cls(**parts)


def _typed(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the type ``hint`` declares, or a one-line error naming ``where``."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        hint = args[0]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [_from_text(v.strip(), item, where) for v in value.split(",")]
        if not isinstance(value, list):
            raise SparseBertError(f"{where}: expected a list or comma-separated text, got {value!r}")
        return [_typed(v, item, where) for v in value]
    if hint is str and isinstance(value, os.PathLike):  # a path from the Python API: folders are options too
        value = os.fspath(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint, True)
    if not ok:
        names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
        raise SparseBertError(f"{where}: expected {names[hint]}, got {value!r}")
    return float(value) if hint is float else value


def _from_text(text: str, kind: type, where: str) -> Any:
    if kind is str:
        return text
    try:
        return kind(text)
    except ValueError:
        raise SparseBertError(f"{where}: {text!r} is not a number") from None


def to_yaml(config: object) -> str:
    return yaml.safe_dump(flat_options(config), sort_keys=False)


def require(config: object, *names: str) -> None:
    """Raise a one-line error naming the missing required options."""
    options = flat_options(config)
    missing = [n for n in names if options[n] in (None, "")]
    if missing:
        raise SparseBertError("missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
