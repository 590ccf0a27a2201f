"""Command-line flags generated from :class:`~zsdb3kd.settings.Settings` classes.

A flag's name, type, choices, help and default all come from the settings field, so the
command line and the config files can never disagree: an unset flag leaves the field at
the settings' own default (argparse never fills in a default of its own), and every
value goes through the same pydantic validation as a TOML value.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any, Iterable, Literal

from pydantic.fields import FieldInfo

from .settings import Settings, validate

#: flag spellings that differ from ``--field-name``
_SPECIAL_NONE = ("none", "null")


def _strip_optional(ann: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = len(args) < len(typing.get_args(ann))
        if len(args) == 1:
            return args[0], optional
        return typing.Union[tuple(args)], optional  # type: ignore[return-value]
    return ann, False


def _describe(ann: Any) -> str:
    ann, _ = _strip_optional(ann)
    origin = typing.get_origin(ann)
    if origin in (tuple, list):
        return "A,B,..."
    if origin is dict:
        return "K=V,..."
    if origin is Literal:
        return "{" + ",".join(map(str, typing.get_args(ann))) + "}"
    if origin in (typing.Union, types.UnionType):
        return "NUMBER"
    return {"str": "TEXT"}.get(getattr(ann, "__name__", ""), getattr(ann, "__name__", "VALUE").upper())


def _parse(text: str, ann: Any) -> Any:
    """A flag's text as the raw value pydantic validates (sequences and mappings split here)."""
    base, optional = _strip_optional(ann)
    if optional and text.strip().lower() in _SPECIAL_NONE:
        return None
    origin = typing.get_origin(base)
    if origin in (tuple, list):
        return [t.strip() for t in text.split(",") if t.strip()]
    if origin is dict:
        out = {}
        for item in filter(None, (t.strip() for t in text.split(","))):
            k, eq, v = item.partition("=")
            if not eq:
                raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v
        return out
    return text


class SettingsFlags:
    """The flags of one settings class on one parser.

    Args:
        cls: the settings class.
        only: fields to expose (default: all but ``exclude``).
        exclude: fields not exposed (they keep their defaults or are given by the caller).
        rename: field -> flag (e.g. ``{"path": "--teacher"}``).
        title: the help section's title.
    """

    def __init__(self, cls: type[Settings], *, only: Iterable[str] | None = None, exclude: Iterable[str] = (),
                 rename: dict[str, str] | None = None, title: str | None = None,
                 required: Iterable[str] = ()) -> None:
        self.cls = cls
        names = list(only) if only is not None else list(cls.model_fields)
        unknown = set(names) - set(cls.model_fields)
        if unknown:
            raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
        self.required = set(required)
        self.fields = sorted((n for n in names if n not in set(exclude)), key=lambda n: n not in self.required)
        self.flags = {n: (rename or {}).get(n, "--" + n.replace("_", "-")) for n in self.fields}
        self.title = title or cls.__doc__.strip().splitlines()[0].rstrip(".") if cls.__doc__ else cls.__name__

    def dest(self, name: str) -> str:
        return f"{self.cls.__name__}__{name}"

    def add(self, parser: argparse.ArgumentParser) -> "SettingsFlags":
        group = parser.add_argument_group(self.title)
        for name in self.fields:
            field: FieldInfo = self.cls.model_fields[name]
            ann = field.annotation
            base, _ = _strip_optional(ann)
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            help_text = (field.description or "").replace("%", "%%")
            if name in self.required:
                help_text += " (required)"
            elif default is not None and default != () and default != {}:
                shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
                help_text += f" (default: {shown})"
            kw: dict[str, Any] = {"dest": self.dest(name), "default": argparse.SUPPRESS, "help": help_text.strip()}
            if not self.flags[name].startswith("-"):  # a positional argument, shown by its name
                group.add_argument(self.dest(name), metavar=self.flags[name], help=kw["help"],
                                   type=lambda text, ann=ann: _parse(text, ann))
                continue
            if base is bool:
                group.add_argument(self.flags[name], action=argparse.BooleanOptionalAction, **kw)
                continue
            if typing.get_origin(base) is Literal:
                kw["choices"] = [str(c) for c in typing.get_args(base)]
            else:
                kw["metavar"] = _describe(ann)
            kw["type"] = lambda text, ann=ann: _parse(text, ann)
            if name in self.required:
                kw["required"] = True
            group.add_argument(self.flags[name], **kw)
        return self

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The fields set on the command line."""
        return {n: getattr(args, self.dest(n)) for n in self.fields if hasattr(args, self.dest(n))}

    def build(self, args: argparse.Namespace, **fixed: Any) -> Settings:
        """The settings: flags given on the command line, then ``fixed``, else defaults."""
        raw = {**self.given(args), **{k: v for k, v in fixed.items() if v is not None}}
        return validate(self.cls, raw, flags=self.flags)
