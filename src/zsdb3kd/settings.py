"""Typed settings: the one source of truth for every option of the library, the TOML run
files and the command line.

Every group of options is a :class:`Settings` subclass (a frozen pydantic model with
``extra="forbid"``): its field defaults, types and descriptions are what the library
uses, what a config file may say and what ``zsdb3kd <command> --help`` shows.
:func:`validate` turns any mapping (a TOML table, parsed flags) into settings in one
pass and reports every problem as a :class:`ConfigError` that names the key, the value
and what was expected, with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from typing import Annotated, Any, Mapping, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

S = TypeVar("S", bound="Settings")


class ConfigError(ValueError):
    """Settings that cannot be used; the message says which key, what it was and what is expected."""


class Settings(BaseModel):
    """Base of every settings group: frozen, unknown keys rejected, defaults validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, protected_namespaces=())

    def key(self) -> str:
        """Content hash of every setting (16 hex digits): names artifacts that depend on them."""
        return content_key(self.model_dump(mode="json"))

    def replace(self: S, **changes: Any) -> S:
        """A validated copy with ``changes`` applied."""
        return validate(type(self), {**self.model_dump(), **changes})


def content_key(*parts: Any, length: int = 16) -> str:
    """A short, stable hash of JSON-serialisable ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def validate(cls: type[S], raw: Mapping[str, Any] | S, where: str = "", flags: Mapping[str, str] | None = None) -> S:
    """``cls`` from ``raw`` or a :class:`ConfigError` naming every bad key.

    ``where`` prefixes key names (e.g. ``"[student]"``); ``flags`` maps field names to the
    command-line flag that set them, so CLI errors name the flag instead of the key."""
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or cls.__name__} must be a table of settings, got {type(raw).__name__}")
    try:
        return cls.model_validate(dict(raw))
    except ValidationError as e:
        raise ConfigError(describe_errors(cls, e, where, flags)) from None


#: keys of earlier versions and their new names (budgets got one vocabulary)
RENAMED = {"budget": "queries_per_pair", "search_budget": "queries_per_search", "noise_budget": "noise_queries",
           "first_budget_factor": "first_round_factor", "options": "method specs such as 'mbd:k=100' in methods"}


def describe_errors(cls: type[BaseModel], error: ValidationError, where: str = "",
                    flags: Mapping[str, str] | None = None) -> str:
    """One readable line per problem in ``error`` (at most five)."""
    lines = []
    for err in error.errors()[:5]:
        loc = [str(p) for p in err["loc"]]
        top = loc[0] if loc else ""
        name = flags.get(top) if flags and top in flags else ".".join(loc)
        prefix = f"{where} {name}".strip() or cls.__name__
        value = err.get("input")
        if err["type"] == "extra_forbidden" and loc[-1] in RENAMED:
            lines.append(f"{prefix}: renamed to {RENAMED[loc[-1]]!r}")
        elif err["type"] == "extra_forbidden":
            known = _field_names(cls, loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
            lines.append(f"{prefix}: unknown key{hint}")
        elif err["type"] in ("model_type", "model_attributes_type", "dict_type"):
            lines.append(f"{prefix}: must be a table of settings ([{name}] in TOML), got {value!r}")
        elif err["type"] == "missing":
            lines.append(f"{prefix}: required, not given")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{prefix}: {msg}" + (f" (got {value!r})" if loc else ""))
    more = len(error.errors()) - len(lines)
    return "; ".join(lines) + (f"; and {more} more" if more > 0 else "")


def _field_names(cls: type[BaseModel], path: list[str]) -> list[str]:
    """Field names of the (nested) model at ``path`` inside ``cls``."""
    model: Any = cls
    for part in path:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def defaults(cls: type[S]) -> S:
    """``cls`` with every default."""
    return cls()


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, and available here (no traceback from deep inside torch later)."""
    if device == "cpu":
        return device
    if not re.fullmatch(r"cuda(:\d+)?", device):
        raise ValueError("must be cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("CUDA is not available here (a CPU-only PyTorch build or no GPU); use cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


#: a device string validated by :func:`check_device`
Device = Annotated[str, AfterValidator(check_device)]
