"""Typed job configs: one ``@dataclass(kw_only=True)`` per job is both the CLI and the YAML schema.

Each field's docstring (the string literal under it, torchtitan-style) becomes its ``--help``
text, so a flag is documented in exactly one place. Precedence: defaults < ``--config`` YAML <
command-line flags. Validation lives in each config's ``__post_init__``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
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
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML file with any of these options (flags given here win)")
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = docs.get(f.name, "")
        if f.default is not dataclasses.MISSING:
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
    import yaml

    from workers.storage import Storage

    data = yaml.safe_load(Storage().read_text(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def from_values(cls: type[T], values: dict[str, Any]) -> T:
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(_flag(u) for u in unknown)}; see --help")
    hints = typing.get_type_hints(cls)
    coerced = {}
    for name, value in values.items():
        base, _ = _unwrap_optional(hints[name])
        if typing.get_origin(base) in (list, tuple) and isinstance(value, str):
            value = _converter(hints[name], name)[0](value)
        coerced[name] = value
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
    values.update(args)
    return from_values(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def require(condition: bool, flag: str, value: Any, problem: str) -> None:
    """Raise a ConfigError naming the flag and the value unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{_flag(flag)} = {value!r}: {problem}")
