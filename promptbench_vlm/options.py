"""Declared, typed options of learners and methods, checked before any model loads.

Every learner and method declares its options as one frozen dataclass, PEFT-style: a field is an
option with a type, a default and a one-line help (`option(default, "help")`). Values arrive as
strings (``--learner-opt``/``--method-opt KEY=VALUE``), as TOML values (a sweep's ``options``) or
as Python values; `parse_options` checks them all against the declaration the same way:

- an unknown key is refused with "did you mean" and the valid keys (a typo must never run the
  default method and record the typo as if it had been applied);
- each value is converted to the declared type or refused naming the key and the type;
  booleans accept true/false/1/0/yes/no in any case, so ``false``, ``False`` and ``0`` are the
  same ``False``; ``none``/``null`` is None where the type allows it.

What a run records (train.json, checkpoint metadata, result files) is the parsed dataclass as a
dict, never the raw strings. Supported types: bool, int, float, str, ``Literal[...]`` of strings
(a choice), ``list[str]`` (a JSON list or comma-separated from a string), and any of them
``| None``.
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from .errors import UserError
from .names import unknown_name_error

T = TypeVar("T")
TRUE, FALSE, NONE = ("true", "1", "yes"), ("false", "0", "no"), ("none", "null")


def option(default: Any, help: str) -> Any:
    """One declared option: its default and a one-line help (shown by ``list ... --verbose``)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class NoOptions:
    """The declaration of a learner or method that takes no options (zeroshot)."""


@dataclass(frozen=True)
class OptionInfo:
    """One option as shown to a user: name, type in words, default and help."""

    name: str
    type: str
    default: Any
    help: str


def declared(options_class: type) -> list[OptionInfo]:
    """The options `options_class` declares, in declaration order.

    Raises:
        TypeError: `options_class` is not a dataclass (a plug-in's declaration is broken).
    """
    if not dataclasses.is_dataclass(options_class):
        raise TypeError(f"{options_class!r} is not a dataclass; declare options as a @dataclass (see docs/plugins.md)")
    hints = get_type_hints(options_class)
    return [OptionInfo(f.name, type_name(hints[f.name]), f.default, f.metadata.get("help", ""))
            for f in dataclasses.fields(options_class)]


def type_name(annotation: Any) -> str:
    """A declared type in words: ``integer``, ``number or none``, ``one of fomaml, reptile``."""
    choices, optional = _unwrap(annotation)
    if get_origin(choices) is Literal:
        words = "one of " + ", ".join(map(str, get_args(choices)))
    elif get_origin(choices) is list:
        words = "list of strings"
    else:
        words = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(choices, str(choices))
    return f"{words} or none" if optional else words


def parse_options(owner: str, options_class: type[T], given: Mapping[str, Any] | None) -> T:
    """Check `given` against the declaration and return the typed options (defaults filled in).

    Args:
        owner: Who declares them, for messages: ``"method 'promise'"``.
        options_class: The declaration (a dataclass).
        given: Option values by key: strings (command line), TOML or Python values.

    Raises:
        UserError: an unknown key (with the closest valid one and the list) or a value that is
            not of the declared type (naming the key and the type).
    """
    given = dict(given or {})
    infos = {info.name: info for info in declared(options_class)}
    for key in given:
        if key not in infos:
            if not infos:
                raise UserError(f"{owner} takes no options, got '{key}'")
            raise unknown_name_error(f"{owner} option", key, infos)
    hints = get_type_hints(options_class)
    return options_class(**{key: convert(owner, key, value, hints[key]) for key, value in given.items()})


def parse_given(owner: str, options_class: type, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """`given` checked as `parse_options` does, typed, with only the keys given (no defaults
    filled in): what a request records, so that a later default change shows as such."""
    parsed = parse_options(owner, options_class, given)
    return {key: getattr(parsed, key) for key in (given or {})}


def convert(owner: str, key: str, value: Any, annotation: Any) -> Any:
    """`value` as the declared type `annotation`, or a one-line error naming `key` and the type."""
    kind, optional = _unwrap(annotation)
    text = value.strip() if isinstance(value, str) else None
    if value is None or (optional and text is not None and text.lower() in NONE):
        if optional:
            return None
        raise _wrong(owner, key, annotation, value)
    if get_origin(kind) is Literal:
        if text in get_args(kind):
            return text
        raise _wrong(owner, key, annotation, value)
    if get_origin(kind) is list and get_args(kind) == (str,):
        items = value
        if text is not None:
            items = json.loads(text) if text.startswith("[") and _is_json(text) else [t.strip() for t in text.split(",")]
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise _wrong(owner, key, annotation, value)
        return list(items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _wrong(owner, key, annotation, value)
    if kind is str:
        if text is None:
            raise _wrong(owner, key, annotation, value)
        return _json_string(value)
    if kind in (int, float):
        number = value
        if text is not None:
            try:
                number = int(text) if kind is int else float(text)
            except ValueError:
                raise _wrong(owner, key, annotation, value) from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise _wrong(owner, key, annotation, value)
        if kind is int and isinstance(number, float):
            raise _wrong(owner, key, annotation, value)
        return kind(number)
    raise TypeError(f"{owner}: option {key} has type {annotation!r}, which options cannot declare "
                    "(bool, int, float, str, Literal[...] of strings, list[str], or any of them | None)")


def split_pairs(pairs: Iterable[str], flag: str) -> dict[str, str]:
    """``KEY=VALUE`` strings (one ``--flag`` each) as a dict of strings, typed later by `parse_options`.

    Raises:
        UserError: an item without ``=`` or without a key, or a key given twice.
    """
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag} must be KEY=VALUE, got '{pair}'")
        if key in out:
            raise UserError(f"{flag} {key} is given twice ('{out[key]}' and '{value}')")
        out[key] = value
    return out


def describe(options_class: type) -> list[str]:
    """One line per declared option: ``name  type  (default …)  help``; for ``list --verbose``."""
    infos = declared(options_class)
    if not infos:
        return ["(no options)"]
    width = max(len(i.name) for i in infos)
    kinds = max(len(i.type) for i in infos)
    return [f"{i.name:<{width}}  {i.type:<{kinds}}  default {json.dumps(i.default)}  {i.help}" for i in infos]


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The type inside ``X | None`` and whether None is allowed."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(get_args(annotation))
    return annotation, False


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_string(value: str) -> str:
    """A string option as given, or the string inside a JSON string literal (``"a photo of a"``)."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


def _wrong(owner: str, key: str, annotation: Any, value: Any) -> UserError:
    words = type_name(annotation)
    if words.startswith("boolean"):
        words += " (true/false, 1/0, yes/no)"
    article = "" if words.startswith("one of") else "an " if words[0] in "aeiou" else "a "
    return UserError(f"{owner}: option {key} must be {article}{words}, got {value!r}")


__all__ = ["NoOptions", "OptionInfo", "declared", "describe", "option", "parse_given", "parse_options", "split_pairs"]
