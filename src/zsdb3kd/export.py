"""Export a weights file to ONNX, e.g. to serve a teacher as a black box elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .weights import load_weights


def export_onnx(weights: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out`` (ONNX, dynamic batch) for the model in ``weights``; input ``(B, C, H, W)``, output logits."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install 'zsdb3kd[onnx]'") from e
    model, info = load_weights(weights)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(2, *info.input_shape)
    torch.onnx.export(model, (dummy,), str(out), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return out
