"""A teacher stored as an ONNX file, run with onnxruntime on the CPU.

Teachers come as their tools export them, so the graph is read as it is:

* **Input.** The first graph input. Its per-sample dimensions may be ``(C, H, W)`` or any
  other static shape with the same number of values (scikit-learn models take a flat
  ``(N, D)``): images ``(B, C, H, W)`` are reshaped to ``(B, *dims)``. A graph whose own
  shape is not ``(C, H, W)`` needs the image shape declared (``input_shape``).
* **Output.** ``output`` names the one to use; by default the first output that is
  either scores ``(B, K)`` or labels ``(B,)``, so label-first exports (skl2onnx's
  ``output_label``, then a map of probabilities) work. ``num_classes`` comes from a
  scores output; a labels-only output needs it declared.
* **Scores.** Only their argmax leaves the oracle. :meth:`OnnxOracle.scores` (white-box
  baselines only) returns logits: a probability output (``scores="probabilities"``, or
  detected with ``"auto"``: every row non-negative and summing to 1) is turned into
  log-probabilities, which give the same softmax at any temperature.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import torch

from .base import LabelOracle

ScoresKind = Literal["auto", "logits", "probabilities"]


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "N" for d in shape) + ")"


class OnnxOracle(LabelOracle):
    """A label-only view of an ONNX classifier (see the module docstring).

    Args:
        path: the ``.onnx`` file.
        input_shape: ``(C, H, W)`` of one image; required when the graph's own input is not
            a static ``(C, H, W)`` (e.g. a flat ``(N, 64)`` for 8x8 images).
        num_classes: required when the chosen output is labels only.
        output: name of the output to read (default: the first scores or labels output).
        scores: what a scores output holds, for :meth:`scores` (white-box baselines).
        input_scale: the model's inputs are the images (in [0, 1]) times this, e.g. 16 for
            scikit-learn's ``digits`` (pixels 0..16) or 255 for a model trained on 8-bit values.
    """

    def __init__(self, path: str | os.PathLike, *, input_shape=None, num_classes: int | None = None,
                 output: str | None = None, scores: ScoresKind = "auto", input_scale: float = 1.0,
                 **kwargs) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # optional extra
            raise ImportError("ONNX teachers need onnxruntime: pip install 'zsdb3kd[onnx]'") from e
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX teacher not found: {path}")
        if not input_scale > 0:
            raise ValueError(f"input_scale must be > 0, got {input_scale}")
        self.input_scale = float(input_scale)
        if scores not in ("auto", "logits", "probabilities"):
            raise ValueError(f"scores must be auto, logits or probabilities, got {scores!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise ValueError(f"cannot load ONNX teacher {path}: {e}") from e
        inp = self._session.get_inputs()[0]
        self._input_name = inp.name
        dims = list(inp.shape)[1:]
        static = all(isinstance(d, int) and d > 0 for d in dims)
        if input_shape is None:
            if not (len(dims) == 3 and static):
                hint = ""
                if static and len(dims) == 1 and math.isqrt(dims[0]) ** 2 == dims[0]:
                    hint = f" (e.g. 1,{math.isqrt(dims[0])},{math.isqrt(dims[0])} for square gray images)"
                raise ValueError(f"{path}: its input {inp.name!r} has shape {_shape_text(inp.shape)}, not "
                                 f"(N, C, H, W); declare the image shape with --input-shape C,H,W{hint}")
            input_shape = tuple(dims)
        input_shape = tuple(int(s) for s in input_shape)
        if static:
            if math.prod(dims) != math.prod(input_shape):
                raise ValueError(f"{path}: images of shape {input_shape} have {math.prod(input_shape)} values but "
                                 f"the model's input {_shape_text(inp.shape)} takes {math.prod(dims)}")
            self._feed_shape = tuple(dims)
        elif len(dims) == 3:
            self._feed_shape = input_shape
        elif len(dims) == 1:
            self._feed_shape = (math.prod(input_shape),)
        else:
            raise ValueError(f"{path}: cannot map images {input_shape} onto the input {_shape_text(inp.shape)}")
        self._output, self._labels_only, width = self._pick_output(path, output)
        if num_classes is None:
            if width is None:
                raise ValueError(f"{path}: output {self._output!r} gives labels only; declare --num-classes K")
            num_classes = width
        elif width is not None and width != num_classes:
            raise ValueError(f"{path}: output {self._output!r} has {width} scores, not num_classes={num_classes}")
        super().__init__(input_shape, num_classes, **kwargs)
        self.path = path
        self.scores_kind = scores

    def _pick_output(self, path: Path, name: str | None) -> tuple[str, bool, int | None]:
        """(output name, labels only?, number of scores or None)."""
        outs = self._session.get_outputs()
        by_name = {o.name: o for o in outs}
        listing = ", ".join(f"{o.name} {o.type} {_shape_text(o.shape)}" for o in outs)
        if name is not None and name not in by_name:
            raise ValueError(f"{path}: no output named {name!r}; outputs: {listing}")
        for o in ([by_name[name]] if name is not None else outs):
            if not o.type.startswith("tensor("):
                continue
            if len(o.shape) == 2:
                return o.name, False, o.shape[1] if isinstance(o.shape[1], int) else None
            if len(o.shape) == 1 and ("int" in o.type):
                return o.name, True, None
        if name is not None:
            raise ValueError(f"{path}: output {name!r} is neither scores (N, K) nor labels (N,): {listing}")
        raise ValueError(f"{path}: no output gives scores (N, K) or labels (N,); outputs: {listing}; "
                         "choose one with --output NAME")

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().cpu().float().reshape(x.shape[0], *self._feed_shape)
        if self.input_scale != 1.0:
            feed = feed * self.input_scale
        feed = feed.numpy()
        return torch.from_numpy(self._session.run([self._output], {self._input_name: feed})[0])

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        return out.long().reshape(-1) if self._labels_only else out.argmax(dim=1)

    @torch.no_grad()
    def scores(self, x: torch.Tensor, batch: int = 2048) -> torch.Tensor:
        """``(N, K)`` logits (white-box access: for upper-bound baselines only, never counted
        as label queries). Probabilities become log-probabilities."""
        if self._labels_only:
            raise ValueError(f"{self.path}: output {self._output!r} gives labels only; white-box KD needs a scores "
                             "output (choose one with --output NAME)")
        out = torch.cat([self._run(x[i:i + batch]).float() for i in range(0, len(x), batch)])
        kind = self.scores_kind
        if kind == "auto":
            sums = out.sum(dim=1)
            kind = "probabilities" if bool((out >= 0).all() and ((sums - 1).abs() < 1e-3).all()) else "logits"
            self.detected_scores = kind
        return out.clamp_min(1e-12).log() if kind == "probabilities" else out
