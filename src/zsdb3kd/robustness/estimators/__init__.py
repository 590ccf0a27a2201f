"""Boundary-distance estimators, created by name (sample robustness, arXiv 2106.03310 section 3.2).

Every module of this package registers its factories in :data:`ESTIMATORS` when it is
imported, and every module is imported here, so adding an estimator is adding one file.
A *method spec* names a factory and optionally its options, the same way everywhere
(command line, config files, benchmarks): ``"hybrid"``, ``"hybrid:reuse=0.5,k=50"``.

Registered: ``sd`` (0 queries), ``bd``, ``mbd`` (the paper's settings), ``hsja``,
``hsja-sub``, ``hsja-sub-circle`` (most query-efficient up to 1,000 queries per pair)
and ``hybrid`` (most query-efficient beyond).
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from typing import Any

from ..search import Estimator
from .registry import ESTIMATORS


_WORDS = {"None": None, "none": None, "null": None, "True": True, "true": True, "False": False, "false": False}


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:k=v,k2=v2"`` -> ``(name, {k: v, ...})``; values are JSON (numbers, null, true)
    or plain strings."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a method spec must be a non-empty string like 'hybrid' or 'mbd:k=100', got {spec!r}")
    name, _, opts = spec.strip().partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in opts.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method spec {spec!r}: expected key=value after ':', got {item!r}")
        value = value.strip()
        if value in _WORDS:
            options[key.strip()] = _WORDS[value]
            continue
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return name.strip(), options


def format_method(name: str, options: dict[str, Any]) -> str:
    """Inverse of :func:`parse_method` (options sorted)."""
    if not options:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(options.items()))


def create_estimator(spec: str | Estimator, **options: Any) -> Estimator:
    """An estimator from a method spec (or the estimator itself); ``options`` add to the spec's.

    Unknown names and options raise ``ValueError`` naming what is known."""
    if isinstance(spec, Estimator):
        if options:
            raise ValueError("options apply to a method name, not to an estimator object")
        return spec
    name, opts = parse_method(spec)
    factory = ESTIMATORS.get(name)
    try:
        return factory(**{**opts, **options})
    except TypeError as e:
        raise ValueError(f"invalid options {({**opts, **options})} for method {name!r}: {e}") from None


for _mod in pkgutil.iter_modules(__path__):  # every estimator module registers its factories on import
    importlib.import_module(f"{__name__}.{_mod.name}")

from .bd import BoundaryDistance  # noqa: E402
from .hsja import HopSkipJump  # noqa: E402
from .sd import SampleDistance  # noqa: E402
from .signopt import SignOPT  # noqa: E402

__all__ = ["ESTIMATORS", "BoundaryDistance", "Estimator", "HopSkipJump", "SampleDistance", "SignOPT",
           "create_estimator", "format_method", "parse_method"]
