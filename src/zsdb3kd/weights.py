"""Saving and loading model weights as weights, never as pickled Python objects.

Our own format is a ``.safetensors`` file whose metadata says how to rebuild the model::

    {"format": "zsdb3kd", "arch": "lenet5", "num_classes": "10", "input_shape": "1,28,28", ...extra}

so ``load_weights(path)`` needs nothing else. Plain PyTorch ``state_dict`` files
(``.pt``/``.pth``/``.bin``, e.g. from the authors' released code) are read with
``torch.load(weights_only=True)`` and need ``arch``, ``input_shape`` and ``num_classes``
from the caller. A file holding a pickled whole model (``torch.save(model)``) is refused:
unpickling it could run arbitrary code, so we never fall back to ``weights_only=False``.

Every failure (missing file, corrupt header, missing/unexpected keys, shape mismatch,
pickled objects) raises :class:`WeightsError`, a ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .models import MODELS, InputShape, ShapeLike, create_model, parse_input_shape
from .store import atomic_write
from .weightfiles import (
    WeightsError,
    canonicalise_metadata_order,
    is_safetensors,
    read_safetensors_metadata,
    read_safetensors_tensors,
    read_torch_state_dict,
)

__all__ = [
    "FORMAT_TAG",
    "WeightsError",
    "WeightsInfo",
    "file_sha256",
    "load_weights",
    "read_weights_info",
    "save_weights",
]

FORMAT_TAG = "zsdb3kd"
"""Value of the ``format`` metadata key in files written by :func:`save_weights`."""

_RESERVED_KEYS = frozenset({"format", "arch", "num_classes", "input_shape"})
_MAX_LISTED = 5  # mismatching keys quoted in error messages


@dataclass(frozen=True)
class WeightsInfo:
    """What a weights file holds and how to rebuild its model (no tensors)."""

    arch: str
    num_classes: int
    input_shape: InputShape
    sha256: str
    path: Path
    extra: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {exc}") from exc
    return digest.hexdigest()


def save_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    arch: str,
    input_shape: ShapeLike,
    num_classes: int,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``model.state_dict()`` to a ``.safetensors`` file with rebuild metadata.

    The state dict is checked against ``create_model(arch, num_classes, input_shape)``
    first, so a file that could not be loaded back is never written. Tensors are detached,
    copied to CPU and made contiguous; the write is atomic (temporary file in the same
    directory + ``os.replace``) and parent directories are created.

    Args:
        model: the network to save (any device).
        path: destination, conventionally ``*.safetensors``.
        arch: registered architecture name (see ``models.list_models()``).
        input_shape: ``(C, H, W)`` the model was built for.
        num_classes: number of logits.
        extra: further string metadata (e.g. dataset, accuracy); may not override
            ``format``/``arch``/``num_classes``/``input_shape``.

    Returns:
        The path written.
    """
    path = Path(path)
    if arch not in MODELS:
        raise WeightsError(f"cannot save {str(path)!r}: unknown arch {arch!r}; known: {', '.join(MODELS.list())}")
    shape = _as_shape(input_shape, path)
    num_classes = _as_num_classes(num_classes, path)
    own_nc = getattr(model, "num_classes", None)
    own_shape = getattr(model, "input_shape", None)
    if own_nc is not None and own_nc != num_classes:
        raise WeightsError(f"cannot save {str(path)!r}: model.num_classes={own_nc} but num_classes={num_classes}")
    if own_shape is not None and tuple(own_shape) != shape:
        raise WeightsError(f"cannot save {str(path)!r}: model.input_shape={tuple(own_shape)} but input_shape={shape}")

    extra = dict(extra or {})
    bad = sorted(k for k in extra if k in _RESERVED_KEYS)
    if bad:
        raise WeightsError(f"cannot save {str(path)!r}: extra metadata may not set reserved keys {bad}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise WeightsError(f"cannot save {str(path)!r}: extra metadata keys and values must be str")

    # clone: safetensors refuses tensors sharing storage (e.g. tied weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    try:
        reference = create_model(arch, num_classes=num_classes, input_shape=shape)
    except ValueError as exc:
        raise WeightsError(f"cannot save {str(path)!r}: {exc}") from exc
    _check_fits(reference, tensors, path, arch)

    metadata = {
        "format": FORMAT_TAG,
        "arch": arch,
        "num_classes": str(num_classes),
        "input_shape": ",".join(str(d) for d in shape),
        **extra,
    }
    with atomic_write(path) as tmp:  # created with the user's umask, like every other output
        save_file(tensors, str(tmp), metadata=metadata)
        canonicalise_metadata_order(tmp)
    return path


def read_weights_info(
    path: str | os.PathLike[str],
    *,
    arch: str | None = None,
    input_shape: ShapeLike | None = None,
    num_classes: int | None = None,
) -> WeightsInfo:
    """Describe a weights file without building a model or reading its tensors.

    For our ``.safetensors`` files everything comes from the metadata; the optional
    arguments are checked against it (``arch``/``num_classes`` must agree; an explicit
    ``input_shape`` overrides, e.g. to run a size-agnostic ResNet at another resolution).
    Plain ``state_dict`` files carry no metadata, so all three arguments are required.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if is_safetensors(path):
        metadata = read_safetensors_metadata(path)
    else:
        metadata = {}
    return _resolve_info(path, metadata, arch=arch, input_shape=input_shape, num_classes=num_classes)


def load_weights(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    arch: str | None = None,
    input_shape: ShapeLike | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, WeightsInfo]:
    """Rebuild a model from a weights file; returns ``(model in eval mode on device, info)``.

    * ``.safetensors`` (and any file whose header is safetensors): architecture from the
      metadata, see :func:`read_weights_info` for how explicit arguments are checked.
    * ``.pt``/``.pth``/``.bin``/other: a *plain* state dict via
      ``torch.load(weights_only=True)``; ``arch``, ``input_shape`` and ``num_classes`` must
      be given. Checkpoint dicts wrapping the state dict under ``state_dict``/``model``
      and ``module.`` (DataParallel) prefixes are unwrapped. Pickled whole models are
      refused with :class:`WeightsError`.

    The state dict must match the architecture exactly (``strict=True``); otherwise the
    error lists the first few missing, unexpected and wrongly shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if is_safetensors(path):
        metadata = read_safetensors_metadata(path)
        info = _resolve_info(path, metadata, arch=arch, input_shape=input_shape, num_classes=num_classes)
        state = read_safetensors_tensors(path)
    else:
        state = read_torch_state_dict(path)  # first: a pickled model is the more useful error
        info = _resolve_info(path, {}, arch=arch, input_shape=input_shape, num_classes=num_classes)

    try:
        model = create_model(info.arch, num_classes=info.num_classes, input_shape=info.input_shape)
    except ValueError as exc:
        raise WeightsError(f"cannot build {info.arch!r} for {str(path)!r}: {exc}") from exc
    _check_fits(model, state, path, info.arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. dtype that cannot be copied; shapes were checked above
        raise WeightsError(f"cannot load {str(path)!r} into {info.arch!r}: {exc}") from exc
    model.eval()
    return model.to(device), info


# ---------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------


def _as_shape(value: ShapeLike, path: Path) -> InputShape:
    try:
        return parse_input_shape(value)
    except ValueError as exc:
        raise WeightsError(f"{str(path)!r}: {exc}") from exc


def _as_num_classes(value: Any, path: Path) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise WeightsError(f"{str(path)!r}: num_classes must be an int, got {value!r}") from None
    if n < 1 or isinstance(value, bool) or (isinstance(value, float) and value != n):
        raise WeightsError(f"{str(path)!r}: num_classes must be a positive int, got {value!r}")
    return n


def _resolve_info(
    path: Path,
    metadata: Mapping[str, str],
    *,
    arch: str | None,
    input_shape: ShapeLike | None,
    num_classes: int | None,
) -> WeightsInfo:
    """Merge file metadata with explicit arguments; ``arch``/``num_classes`` must agree."""
    meta_arch = metadata.get("arch")
    if meta_arch is not None and arch is not None and arch != meta_arch:
        raise WeightsError(f"{str(path)!r} holds weights for arch {meta_arch!r}, not {arch!r}")
    resolved_arch = arch if arch is not None else meta_arch

    meta_nc = _as_num_classes(metadata["num_classes"], path) if "num_classes" in metadata else None
    given_nc = _as_num_classes(num_classes, path) if num_classes is not None else None
    if meta_nc is not None and given_nc is not None and meta_nc != given_nc:
        raise WeightsError(f"{str(path)!r} holds weights for num_classes={meta_nc}, not {given_nc}")
    resolved_nc = given_nc if given_nc is not None else meta_nc

    if input_shape is not None:
        resolved_shape: InputShape | None = _as_shape(input_shape, path)
    elif "input_shape" in metadata:
        resolved_shape = _as_shape(metadata["input_shape"], path)
    else:
        resolved_shape = None

    given = {"--arch": resolved_arch, "--input-shape": resolved_shape, "--num-classes": resolved_nc}
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        raise WeightsError(
            f"{str(path)!r} has no zsdb3kd metadata (a plain state_dict?); pass {', '.join(missing)} "
            f"(arch=, input_shape=, num_classes= in Python) to say which model it holds; "
            f"known archs: {', '.join(MODELS.list())}"
        )
    assert resolved_arch is not None and resolved_shape is not None and resolved_nc is not None
    if resolved_arch not in MODELS:
        raise WeightsError(f"{str(path)!r}: unknown arch {resolved_arch!r}; known: {', '.join(MODELS.list())}")
    extra = {k: v for k, v in metadata.items() if k not in _RESERVED_KEYS}
    return WeightsInfo(
        arch=resolved_arch,
        num_classes=resolved_nc,
        input_shape=resolved_shape,
        sha256=file_sha256(path),
        path=path,
        extra=extra,
    )


def _check_fits(model: nn.Module, state: Mapping[str, Tensor], path: Path, arch: str) -> None:
    """Raise :class:`WeightsError` naming the first mismatching keys unless ``state`` fits ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        return
    shape = getattr(model, "input_shape", None)
    nc = getattr(model, "num_classes", None)
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{label} ({len(items)}): {json.dumps(items[:_MAX_LISTED])}{more}")
    raise WeightsError(
        f"{str(path)!r} does not fit arch {arch!r} (num_classes={nc}, input_shape={shape}): " + "; ".join(parts)
    )
