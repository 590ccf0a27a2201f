"""Open a teacher named by a path or URL (:class:`TeacherSpec`), and name it by content."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from ..settings import Settings
from .base import LabelOracle
from .http import HttpOracle, http_settings_from_env
from .local import TorchOracle
from .onnx import OnnxOracle


def is_url(spec: str | os.PathLike) -> bool:
    """Whether a teacher spec names an HTTP endpoint rather than a file."""
    return isinstance(spec, str) and spec.lower().startswith(("http://", "https://"))


#: images per call to a local PyTorch teacher on a GPU, unless told
GPU_MAX_BATCH = 16_384


class TeacherReading(Settings):
    """Teacher: how to read the black box (everything but where it is)."""

    arch: str | None = Field(None, description="architecture of a plain state-dict teacher (see list-models)")
    input_shape: tuple[int, int, int] | None = Field(
        None, description="C,H,W of one image: for a plain state dict, or an ONNX model whose input is flat (N, D)")
    num_classes: int | None = Field(None, ge=2, description="classes: for a plain state dict or a labels-only ONNX "
                                                            "output")
    output: str | None = Field(None, description="ONNX output to read (default: the first scores or labels output)")
    scores: Literal["auto", "logits", "probabilities"] = Field(
        "auto", description="what an ONNX scores output holds (matters for whitebox-kd only)")
    input_scale: float = Field(1.0, gt=0, description="an ONNX teacher's inputs are the images in [0, 1] times "
                                                         "this (16 for scikit-learn's digits, 255 for 8-bit models)")
    max_batch: int | None = Field(None, ge=1, description="images sent to the teacher at once (default: 256; "
                                                          f"{GPU_MAX_BATCH:,} for a local teacher on a GPU)")
    query_log: str | None = Field(None, description="append-only log of answered queries: a rerun answers "
                                                    "logged images from it instead of paying again")

    def spec(self, path: str | os.PathLike) -> "TeacherSpec":
        """The full spec for the teacher at ``path``."""
        return TeacherSpec(path=str(path), **{k: getattr(self, k) for k in TeacherReading.model_fields})


class TeacherSpec(TeacherReading):
    """Teacher: which black box to query and how to read it."""

    path: str = Field(description="teacher weights (.safetensors, or a plain state-dict .pt with --arch, "
                                  "--input-shape, --num-classes), .onnx, or the http(s):// URL of a label server")

    @field_validator("path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a teacher file or URL")
        return v

    @property
    def is_url(self) -> bool:
        return is_url(self.path)

    def check(self) -> None:
        """Fail before any query if the file is missing (URLs are checked when opened)."""
        if not self.is_url and not Path(self.path).is_file():
            raise FileNotFoundError(f"teacher file not found: {self.path}")


def _spec(spec: str | os.PathLike | TeacherSpec, overrides: dict) -> TeacherSpec:
    if isinstance(spec, TeacherSpec):
        return spec.replace(**overrides) if overrides else spec
    return TeacherSpec(path=str(spec), **overrides)


def default_max_batch(device: str | torch.device) -> int:
    """Images per call to a local PyTorch teacher unless told: few on the CPU (they stay in its
    cache), many on a GPU (a LeNet-5 on an H200 answers 0.73M images/s in calls of 256 and 4.1M
    in calls of 16,384: docs/scale-out.md). URLs and ONNX models get 256."""
    return GPU_MAX_BATCH if torch.device(device).type == "cuda" else 256


def load_oracle(spec: str | os.PathLike | TeacherSpec, *, device: str = "cpu", budget: int | None = None,
                **overrides) -> LabelOracle:
    """Open a teacher as a label-only oracle: ``http(s)://`` via :class:`HttpOracle`, ``.onnx``
    via onnxruntime, anything else as weights. ``overrides`` are :class:`TeacherSpec` fields."""
    s = _spec(spec, {k: v for k, v in overrides.items() if v is not None})
    common = {"budget": budget, "max_batch": s.max_batch or 256}
    if s.query_log is not None:
        common["query_log"] = s.query_log
    if s.is_url:
        return HttpOracle(s.path, device=device, input_shape=s.input_shape, num_classes=s.num_classes, **common,
                          **http_settings_from_env())
    s.check()
    path = Path(s.path)
    if path.suffix.lower() == ".onnx":
        return OnnxOracle(path, input_shape=s.input_shape, num_classes=s.num_classes, output=s.output,
                          scores=s.scores, input_scale=s.input_scale, **common)
    common["max_batch"] = s.max_batch or default_max_batch(device)
    return TorchOracle.from_file(path, device=device, arch=s.arch, input_shape=s.input_shape,
                                 num_classes=s.num_classes, **common)


def teacher_sha256(spec: str | os.PathLike | TeacherSpec, oracle: LabelOracle | None = None) -> str | None:
    """What names a teacher: its file's sha256, or the ``model_sha256`` a label server
    reports (``None`` if it reports none). ``oracle``: an open :class:`HttpOracle` on
    ``spec``, to avoid asking the server again."""
    path = spec.path if isinstance(spec, TeacherSpec) else spec
    if is_url(path):
        if oracle is None:
            oracle = HttpOracle(str(path), **http_settings_from_env())
        return getattr(oracle, "sha256", None)
    from ..weights import file_sha256

    return file_sha256(path)


def teacher_logits(spec: str | os.PathLike | TeacherSpec, x: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The teacher's real logits ``(N, K)`` on ``x``: needs white-box access (weights or an ONNX
    scores output), so it serves upper-bound baselines only. A probability output becomes
    log-probabilities (see :class:`OnnxOracle`)."""
    s = _spec(spec, {})
    if s.is_url:
        raise ValueError("white-box KD reads the teacher's logits: it needs the teacher's file, not a URL")
    s.check()
    if Path(s.path).suffix.lower() == ".onnx":
        return OnnxOracle(s.path, input_shape=s.input_shape, num_classes=s.num_classes, output=s.output,
                          scores=s.scores, input_scale=s.input_scale).scores(x)
    from ..distill import predict
    from ..weights import load_weights

    model, _ = load_weights(s.path, device=device, arch=s.arch, input_shape=s.input_shape, num_classes=s.num_classes)
    return predict(model, x, device=device)
