"""Reading weight files safely: which format a file is, a safetensors header's metadata
and tensors, and a plain PyTorch ``state_dict`` loaded with ``torch.load(weights_only=True)``
only (a pickled model is refused, never unpickled). Every failure is a
:class:`WeightsError` naming the file. :mod:`zsdb3kd.weights` builds on these."""

from __future__ import annotations

import json
import pickle
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

_TORCH_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt"})
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, unsafe, or does not fit the architecture."""


def is_safetensors(path: Path) -> bool:
    """``.safetensors`` suffix, or (any other suffix than torch's) a safetensors header.

    A safetensors file starts with a little-endian u64 header length followed by a JSON
    object; PyTorch files start with a zip (``PK``) or pickle (``\\x80``) signature.
    """
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return True
    if suffix in _TORCH_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < n <= path.stat().st_size - 8


def canonicalise_metadata_order(path: Path) -> None:
    """Sort the ``__metadata__`` keys of a freshly written safetensors header in place.

    safetensors serialises metadata from a hash map, so the key order (and hence the file's
    SHA-256) varies between runs. Reordering keys keeps the header length, so the header is
    rewritten in place and the same weights + metadata always give the same bytes.
    """
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
        body = raw.rstrip(b" ")  # safetensors pads the header with spaces to 8-byte alignment
        header = json.loads(body)
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) != len(body):  # unexpected serialisation: leave the file as written
            return
        fh.seek(8)
        fh.write(canonical)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header, validating the header itself."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # SafetensorError, OSError, header JSON errors, ...
        raise WeightsError(f"{str(path)!r} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc


def read_safetensors_tensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise WeightsError(f"{str(path)!r} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc


def read_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A plain state dict from a PyTorch file, loaded with ``weights_only=True`` only."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (e.g. {found.group(1)})" if found else ""
        raise WeightsError(
            f"{str(path)!r} contains pickled Python objects{what} (a whole model saved with "
            "torch.save(model)?), refusing to unpickle untrusted code. If you trust the file, "
            "re-save its model.state_dict() where the model's code lives (or, better, "
            "zsdb3kd.weights.save_weights(model, 'model.safetensors', ...)) and load that."
        ) from None
    except Exception as exc:  # RuntimeError (bad zip), EOFError (empty), ...
        raise WeightsError(
            f"cannot read {str(path)!r} as a PyTorch state_dict (corrupt or truncated?): {exc!r}"
        ) from None
    return _as_state_dict(obj, path)


def _as_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": sd}``-style checkpoints and ``module.`` prefixes."""
    if isinstance(obj, Mapping) and not _all_tensors(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not _all_tensors(obj):
        raise WeightsError(
            f"{str(path)!r} does not hold a state_dict (a mapping from parameter names to tensors); "
            f"got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _all_tensors(mapping: Mapping[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())
