"""Open a teacher named by a path or URL, and name it by content."""

from __future__ import annotations

import os
from pathlib import Path

from .base import LabelOracle
from .http import HttpOracle, http_settings_from_env
from .local import TorchOracle
from .onnx import OnnxOracle


def teacher_sha256(spec: str | os.PathLike, oracle: LabelOracle | None = None) -> str | None:
    """What names a teacher: its file's sha256, or the ``model_sha256`` a label server
    reports (``None`` if it reports none). ``oracle``: an open :class:`HttpOracle` on
    ``spec``, to avoid asking the server again."""
    if is_url(spec):
        if oracle is None:
            oracle = HttpOracle(str(spec), **http_settings_from_env())
        return getattr(oracle, "sha256", None)
    from ..weights import file_sha256

    return file_sha256(spec)


def is_url(spec: str | os.PathLike) -> bool:
    """Whether a teacher spec names an HTTP endpoint rather than a file."""
    return isinstance(spec, str) and spec.lower().startswith(("http://", "https://"))


def load_oracle(path: str | os.PathLike, *, device: str = "cpu", budget: int | None = None, arch: str | None = None,
                max_batch: int = 256) -> LabelOracle:
    """Open a teacher as a label-only oracle: ``http(s)://`` via :class:`HttpOracle`, ``.onnx``
    via onnxruntime, anything else as weights."""
    if is_url(path):
        return HttpOracle(str(path), budget=budget, max_batch=max_batch, device=device, **http_settings_from_env())
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return OnnxOracle(path, budget=budget, max_batch=max_batch)
    return TorchOracle.from_file(path, device=device, arch=arch, budget=budget, max_batch=max_batch)
