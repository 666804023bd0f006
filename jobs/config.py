"""Typed job configs: one ``@dataclass(kw_only=True)`` per job is both the CLI and the YAML schema.

Each field's docstring (the string literal under it, torchtitan-style) becomes its ``--help``
text, so a flag is documented in exactly one place. Precedence: defaults < ``--config`` YAML <
command-line flags. Validation lives in each config's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad job argument; the message names the flag and the value."""


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under dataclass fields, for every class in the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(tp: Any, name: str):
    base, _ = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        kind = type(choices[0])
        return kind, [kind(c) for c in choices]
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(base) or (str,)

        def parse_list(text: str) -> list:
            return [inner(part) for part in text.split(",") if part.strip()]

        return parse_list, None
    if base in (int, float, str):
        return base, None
    raise TypeError(f"config field {name!r} has unsupported type {tp!r}")


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    # allow_abbrev=False: "--step 5" is an error, not a silent "--steps 5"
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any of these options (flags given here win)")
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if f.default is not dataclasses.MISSING and "(default" not in help_text:  # the doc may name it already
            help_text += f" (default: {default!r})"
        base, _ = _unwrap_optional(tp)
        if base is bool:
            parser.add_argument(
                _flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
            continue
        conv, choices = _converter(tp, f.name)
        parser.add_argument(_flag(f.name), type=conv, choices=choices, default=argparse.SUPPRESS, help=help_text)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """A ``--config`` file as {option: value}; a missing file or bad YAML is a one-line ConfigError
    (file, line and column of the problem)."""
    import yaml

    from workers.storage import Storage

    try:
        text = Storage().read_text(path)
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"--config {path!r}: no such file") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        raise ConfigError(f"--config {path!r}{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path!r}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def check_value(name: str, value: Any, tp: Any, source: str = "") -> Any:
    """``value`` (from a YAML file) as field ``name``'s type ``tp``, or a ConfigError naming the key.

    Numbers written as strings are read as numbers (as on the command line); a bool is never a number.
    """
    where = f"{source}: " if source else ""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}{name}: null is not allowed, expected {_KIND.get(base, base)}")
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        choices = typing.get_args(base)
        kind = type(choices[0])
        try:
            value = kind(value) if not isinstance(value, bool) and isinstance(value, (int, float, str)) else value
        except ValueError:
            pass
        if value not in choices or isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{where}{name}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(base) or (str,)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{where}{name}: expected a list, got {value!r} ({type(value).__name__})")
        return [check_value(f"{name}[{i}]", v.strip() if isinstance(v, str) else v, inner, source)
                for i, v in enumerate(items) if not (isinstance(v, str) and not v.strip())]
    if base not in _KIND:
        return value
    if isinstance(value, bool):
        if base is bool:
            return value
    elif base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)  # e.g. "run_id: 2024" or "workers: 2"
    elif base in (int, float):
        if isinstance(value, int) or (base is float and isinstance(value, float)):
            return base(value)
        if isinstance(value, str):
            try:
                return base(value.strip())
            except ValueError:
                pass
    raise ConfigError(f"{where}{name}: expected {_KIND[base]}, got {value!r} ({type(value).__name__})")


def from_values(cls: type[T], values: dict[str, Any], source: str = "") -> T:
    """A config from option values; ``source`` (e.g. the YAML file) is named in type errors."""
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, known, n=1)
            hints.append(_flag(u) + (f" (did you mean {_flag(close[0])}?)" if close else ""))
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}unknown option(s) {', '.join(hints)}; see --help")
    hints = typing.get_type_hints(cls)
    coerced = {name: check_value(name, value, hints[name], source) for name, value in values.items()}
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err


def parse_config(cls: type[T], argv: Sequence[str] | None, prog: str) -> T:
    """Parse flags (and an optional ``--config`` YAML) into a validated config instance."""
    parser = build_parser(cls, prog)
    args = vars(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
    config_path = args.pop("config", None)
    values = load_yaml(config_path) if config_path else {}
    values.update(args)  # flags win; the file's values are type-checked in from_values (the flags by argparse)
    return from_values(cls, values, source=f"--config {config_path!r}" if config_path else "")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def require(condition: bool, flag: str, value: Any, problem: str) -> None:
    """Raise a ConfigError naming the flag and the value unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{_flag(flag)} = {value!r}: {problem}")
