"""A teacher stored as an ONNX file, run with onnxruntime on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .base import LabelOracle


class OnnxOracle(LabelOracle):
    """A teacher stored as an ONNX file, run with onnxruntime on the CPU.

    The graph must take one float input ``(B, C, H, W)`` and return scores ``(B, K)``
    (or labels ``(B,)``); only the argmax is returned.
    """

    def __init__(self, path: str | os.PathLike, *, input_shape=None, num_classes: int | None = None, **kwargs) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # optional extra
            raise ImportError("ONNX teachers need onnxruntime: pip install 'zsdb3kd[onnx]'") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX teacher not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"cannot load ONNX teacher {path}: {e}") from e
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        dims = list(inp.shape)[1:]
        if input_shape is None:
            if len(dims) != 3 or not all(isinstance(d, int) for d in dims):
                raise ValueError(f"{path}: input shape {inp.shape} is not static; pass input_shape=(C, H, W)")
            input_shape = tuple(dims)
        if num_classes is None:
            out_dims = self._session.get_outputs()[0].shape
            if len(out_dims) != 2 or not isinstance(out_dims[1], int):
                raise ValueError(f"{path}: cannot infer num_classes from output shape {out_dims}; pass num_classes")
            num_classes = out_dims[1]
        super().__init__(input_shape, num_classes, **kwargs)
        self.path = path

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self._session.run(None, {self._input_name: x.detach().cpu().float().numpy()})[0]
        out = torch.from_numpy(out)
        return out.argmax(dim=1) if out.dim() == 2 else out.long().reshape(-1)


