"""Tensor artifacts (robustness results, pseudo samples, soft labels) as tagged safetensors.

Each file carries a ``format`` tag and a JSON ``provenance`` in its metadata; writes are
atomic (temporary file, then rename) so an interrupted write never leaves a half file.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def environment() -> dict[str, Any]:
    """What a result's exact numbers depend on beyond its settings and seed. PyTorch's CPU
    kernels may sum in another order with another number of threads, so a rerun reproduces
    the numbers bit for bit only with the same versions, device type and thread count."""
    from . import __version__

    return {"zsdb3kd": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads()}


def save_tagged(path: str | os.PathLike, tensors: dict[str, torch.Tensor], fmt: str,
                provenance: dict[str, Any] | None = None, **metadata: str) -> Path:
    """Write ``tensors`` to ``path`` with metadata ``format=fmt`` and ``provenance`` (JSON).

    :func:`environment` is recorded under ``provenance["environment"]`` unless already there;
    the dict is updated in place, so the saved object and the file agree."""
    path = Path(path)
    provenance = {} if provenance is None else provenance
    provenance.setdefault("environment", environment())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": fmt, "provenance": json.dumps(provenance, sort_keys=True, default=str), **metadata}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_tagged(path: str | os.PathLike, fmt: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tagged`; ``what`` names it in errors.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable one
    or one of another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable {what} file: {e}") from e
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a zsdb3kd {what} file (format={meta.get('format')!r})")
    return tensors, json.loads(meta.get("provenance", "{}"))
